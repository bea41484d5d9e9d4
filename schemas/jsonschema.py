"""The JSON Schema of the YAML file, generated from the models, for editors.

A YAML file points at the shipped copy with a first-line comment::

    # yaml-language-server: $schema=../schemas/pgregistry.schema.json

The schema describes the file as written, not the loaded model: ``defaults`` and every pool
share one pool schema, pool names are property names, and any value may also be a string with
a ``${VAR}`` reference (expanded when the file is loaded).

Regenerate the shipped file after changing a model::

    python -m schemas --write      # or --check (exit status 1 when out of date)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .models import POOL_NAME_PATTERN, RegistryConfig

__all__ = ["SCHEMA_FILE", "json_schema", "json_schema_text", "main"]

#: The generated schema, shipped inside the package.
SCHEMA_FILE = Path(__file__).with_name("pgregistry.schema.json")

_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_REFERENCE = {
    "type": "string",
    "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}",
    "description": "A ${VAR} or ${VAR:-default} reference, expanded when the file is loaded.",
}
_ANNOTATIONS = ("title", "description", "default", "examples", "deprecated")
_POOL_DESCRIPTION = (
    "Settings of one pool: ConnectionPool keywords, libpq connection parameters (or a dsn), "
    "and at most one password source (password_env, password_file, password_provider or, "
    "discouraged, password)."
)


def _accepts_any_string(schema: dict[str, Any]) -> bool:
    if schema.get("type") == "string":
        return not any(key in schema for key in ("enum", "const", "pattern"))
    return any(_accepts_any_string(member) for member in schema.get("anyOf", ()))


def _with_references(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` that also accepts a string holding a ``${VAR}`` reference."""
    if "items" in schema and isinstance(schema["items"], dict):
        schema["items"] = _with_references(schema["items"])
    if _accepts_any_string(schema):
        return schema
    outer = {key: schema.pop(key) for key in _ANNOTATIONS if key in schema}
    members = schema.pop("anyOf", None) or [schema]
    if any(member.get("type") == "array" for member in members):
        members.append({"type": "string", "description": "Items separated by commas."})
    else:
        members.append({"$ref": "#/$defs/EnvReference"})
    return {**outer, "anyOf": members}


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the YAML file, as a new dict."""
    generated = copy.deepcopy(RegistryConfig.model_json_schema(mode="validation"))
    defs: dict[str, Any] = generated.pop("$defs")
    defs.pop("PoolDefaults", None)
    defs["PoolConfig"]["description"] = _POOL_DESCRIPTION
    for definition in defs.values():
        definition["properties"] = {
            name: _with_references(prop) for name, prop in definition["properties"].items()
        }
    defs["EnvReference"] = dict(_REFERENCE)
    properties = generated["properties"]
    properties["version"] = _with_references(properties["version"])
    # a section written with nothing under it (`pools:`) is null in YAML: the same as absent
    properties["dns"] = {
        "description": properties["dns"].get("description", ""),
        "anyOf": [{"$ref": "#/$defs/DnsConfig"}, {"type": "null"}],
        "default": None,
    }
    properties["defaults"] = {
        "description": "Keys applied to every pool; a pool's own keys win.",
        "anyOf": [{"$ref": "#/$defs/PoolConfig"}, {"type": "null"}],
    }
    properties["pools"] = {
        "description": "The pools, by name (a letter, then letters, digits, '_', '.', '-').",
        "type": ["object", "null"],
        "propertyNames": {"pattern": POOL_NAME_PATTERN},
        "additionalProperties": {"$ref": "#/$defs/PoolConfig"},
        "default": {},
    }
    return {
        "$schema": _DIALECT,
        "title": "pgregistry configuration",
        "description": "Named PostgreSQL connection pools (pgregistry), version 1 of the file "
                       "format.",
        "type": "object",
        "properties": properties,
        "required": generated.get("required", ["version"]),
        # top-level x-... keys hold YAML anchors to reuse (as in docker-compose files)
        "patternProperties": {"^x-": {}},
        "additionalProperties": False,
        "$defs": defs,
    }


def json_schema_text() -> str:
    """The schema as the shipped file holds it."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas",
                                     description="Print, write or check the JSON Schema.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"write {SCHEMA_FILE.name}")
    group.add_argument("--check", action="store_true",
                       help=f"exit 1 when {SCHEMA_FILE.name} is out of date")
    args = parser.parse_args(argv)
    text = json_schema_text()
    if args.write:
        SCHEMA_FILE.write_text(text, encoding="utf-8")
        return 0
    if args.check:
        current = SCHEMA_FILE.read_text(encoding="utf-8") if SCHEMA_FILE.exists() else ""
        if current != text:
            sys.stderr.write(f"{SCHEMA_FILE} is out of date: python -m schemas --write\n")
            return 1
        return 0
    sys.stdout.write(text)
    return 0

