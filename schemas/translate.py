"""pydantic's validation errors turned into :class:`Problem` values a person can act on.

The loader (:mod:`.loading`) validates the prepared file with pydantic; this mixin maps each
error back to the key path and YAML position it is about, rewrites pydantic's wording where it
helps (a missing key, an unknown key with "did you mean", a mapping expected), reports an error
of ``defaults:`` once (not once per pool that inherits it), and re-runs the cross-field checks
of a model whose fields did not all validate. Values are shown redacted (:func:`show`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from ._yaml import Path
from .dsn import REDACTED, redact_dsn
from .dsn_check import similar_key
from .models import (
    LOAD_BALANCE_HOSTS_REASON,
    POOL_KEYS,
    SECRET_KEYS,
    CrossFieldError,
    DnsConfig,
    PoolConfig,
    RegistryConfig,
)

__all__ = ["PydanticErrors", "dotted", "kind", "show"]

_TOP_KEYS = tuple(RegistryConfig.model_fields)
_DNS_KEYS = tuple(DnsConfig.model_fields)
_POOL_KEYS = tuple(sorted(POOL_KEYS))
_MAPPING_ERRORS = frozenset({"model_type", "model_attributes_type", "dict_type", "mapping_type"})


def dotted(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def show(path: Path, value: object) -> str:
    """A value for display: secrets as ``***``, DSNs redacted, long text shortened."""
    keys = {part for part in path if isinstance(part, str)}
    if keys & SECRET_KEYS:
        return REDACTED
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if "dsn" in keys:
            value = redact_dsn(value)
        text = repr(value)
        return text if len(text) <= 100 else text[:96] + "...'"
    if isinstance(value, Mapping):
        return "{...}"
    if isinstance(value, (list, tuple)):
        return "[...]"
    return f"<{type(value).__name__}>"

class PydanticErrors:
    """The pydantic half of a load: needs the loader's problem list (:meth:`add`), what it
    already reported, where pools inherited keys from, and the origin notes."""

    inherited: dict[str, set[str]]
    #: cross-field issues whose keys all come from defaults: (where, message, value) -> pools
    from_defaults: dict[tuple[Path, str, str | None], list[str]]

    def add(self, path: Path, message: str, value: str | None = None,
            at: Path | None = None, offset: int | None = None) -> None:
        raise NotImplementedError

    def already_reported(self, path: Path) -> bool:
        raise NotImplementedError

    def origin_note(self, path: Path, keys: Iterable[str] = ()) -> str:
        raise NotImplementedError

    def translate(self, exc: ValidationError, prepared: dict[str, Any]) -> None:
        pools = prepared.get("pools")
        inherited_anywhere = set().union(*self.inherited.values()) if self.inherited else set()
        errors = exc.errors(include_url=False)
        # Keys with a field error, per model: its cross-field checks did not run.
        broken: dict[Path, set[str]] = {}
        for error in errors:
            path, _, _ = self.locate(prepared, error)
            model = _model_path(path)
            if model is not None and len(path) > len(model) and isinstance(path[len(model)], str):
                broken.setdefault(model, set()).add(str(path[len(model)]))
        error_paths = [self.locate(prepared, error)[0] for error in errors]
        for error in errors:
            path, value, found = self.locate(prepared, error)
            error_type = error["type"]
            if error_type == "too_short" and any(
                    len(other) > len(path) and other[:len(path)] == path for other in error_paths):
                continue  # "too few items" only because some items were refused
            ctx = error.get("ctx") or {}
            cause = ctx.get("error")
            if isinstance(cause, CrossFieldError):
                self.add_issues(prepared, path, cause)
                continue
            if self.already_reported(path):
                continue
            if "[key]" in error["loc"]:
                value = error.get("input")
            message = self.message(path, error_type, str(error["msg"]), error.get("input"), ctx)
            # An error in defaults is reported once, there (the same error in every pool
            # that inherits the key is then skipped as already reported).
            if (len(path) == 2 and path[0] == "defaults" and path[1] in inherited_anywhere
                    and isinstance(pools, dict) and error_type != "extra_forbidden"):
                users = [name for name, keys in self.inherited.items() if path[1] in keys]
                message += f" (inherited by pool{'s' if len(users) != 1 else ''} " \
                           f"{', '.join(users)})"
            shown = show(path, value) if found and error_type not in (
                "missing", "extra_forbidden") and error_type not in _MAPPING_ERRORS else None
            self.add(path, message + self.origin_note(path), shown)
        for model, keys in broken.items():
            self.recheck(prepared, model, keys)
        for (where, message, shown), users in self.from_defaults.items():
            self.add(where, f"{message} (inherited by pool{'s' if len(users) != 1 else ''} "
                            f"{', '.join(users)})", shown)
        self.from_defaults = {}

    def add_issues(self, prepared: dict[str, Any], path: Path, error: CrossFieldError,
                   skip: set[str] | None = None) -> None:
        for issue in error.issues:
            if skip and skip & {*issue.path[:1], *issue.related}:
                continue
            issue_path = (*path, *issue.path)
            if self.already_reported(issue_path):
                continue
            shown = None
            if issue.path:
                present, item = _lookup(prepared, issue_path)
                shown = show(issue_path, item) if present else None
            if self.inherited_issue(path, issue.path, issue.related):
                # every key involved comes from defaults: one problem there, for all pools
                where = ("defaults", *issue.path)
                self.from_defaults.setdefault((where, issue.message, shown), []).append(
                    str(path[1]))
                continue
            self.add(issue_path, issue.message + self.origin_note(issue_path, issue.related),
                     shown)

    def inherited_issue(self, model: Path, keys: tuple[str, ...],
                        related: tuple[str, ...]) -> bool:
        """True when ``model`` is a pool and every key of an issue came from defaults."""
        if len(model) != 2 or model[0] != "pools" or not keys:
            return False
        inherited = self.inherited.get(str(model[1]), set())
        return all(key in inherited for key in (*keys[:1], *related))

    def recheck(self, prepared: dict[str, Any], model: Path, broken: set[str]) -> None:
        """Run the cross-field checks of a model whose fields did not all validate, without
        the broken keys; report the issues that do not involve them."""
        present, data = _lookup(prepared, model)
        if not present or not isinstance(data, dict):
            return
        cls = DnsConfig if model == ("dns",) else PoolConfig
        try:
            cls.model_validate({k: v for k, v in data.items() if k not in broken})
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                cause = (error.get("ctx") or {}).get("error")
                if isinstance(cause, CrossFieldError) and not error["loc"]:
                    self.add_issues(prepared, model, cause, broken)

    def locate(self, prepared: dict[str, Any], error: Any) -> tuple[Path, Any, bool]:
        """The data path of a pydantic error (its ``loc`` may end in schema tags such as
        ``[key]`` or a union member), the value there, and whether the value exists."""
        current: Any = prepared
        path: list[str | int] = []
        for part in error["loc"]:
            present, child = _child(current, part)
            if not present:
                if error["type"] == "missing" and isinstance(part, str):
                    path.append(part)
                    return tuple(path), None, False
                break
            current = child
            path.append(part)
        return tuple(path), current, True

    def message(self, path: Path, error_type: str, msg: str, value: object,
                ctx: Mapping[str, Any]) -> str:
        key = path[-1] if path else ""
        if error_type == "missing":
            return f"missing required key {key!r}"
        if error_type == "extra_forbidden":
            return self.unknown_key(path)
        if error_type in _MAPPING_ERRORS:
            return f"expected a mapping, not {kind(value)}"
        if error_type == "too_short" and isinstance(ctx.get("min_length"), int):
            count = ctx["min_length"]
            return f"must have at least {count} item{'s' if count != 1 else ''}"
        if error_type == "string_pattern_mismatch":
            if len(path) == 2 and path[0] == "pools":
                return ("invalid pool name: it must start with a letter and have only letters, "
                        "digits, '_', '.' and '-' (at most 63 characters)")
            if key == "password_env":
                return ("not an environment variable name (letters, digits and '_', not "
                        "starting with a digit)")
        if error_type == "value_error" and msg.startswith("Value error, "):
            return msg[len("Value error, "):]
        return msg

    def unknown_key(self, path: Path) -> str:
        key = str(path[-1])
        parent = path[:-1]
        if key == "load_balance_hosts":
            return LOAD_BALANCE_HOSTS_REASON
        if parent == ():
            known, where = _TOP_KEYS, "at the top level"
        elif parent == ("dns",):
            known, where = _DNS_KEYS, "in dns"
        elif parent == ("defaults",) or (len(parent) == 2 and parent[0] == "pools"):
            known, where = _POOL_KEYS, "for a pool"
        else:
            known, where = (), "here"
        message = f"unknown key {key!r} {where}"
        close = similar_key(key, tuple(known))
        if close:
            return f"{message}; did you mean {close!r}?"
        if parent == () and key in POOL_KEYS:
            return f"{message}; pool settings go under 'defaults' or under a pool in 'pools'"
        if parent == () and key in _DNS_KEYS:
            return f"{message}; resolver settings go under 'dns'"
        if parent != ("dns",) and key in _DNS_KEYS and key not in POOL_KEYS:
            return f"{message}; resolver settings go under the top-level 'dns'"
        close = similar_key(key, _DNS_KEYS) if parent != ("dns",) else None
        if close:
            return (f"{message}; did you mean {close!r}? (a resolver setting: it goes under "
                    "the top-level 'dns')")
        return message


def _model_path(path: Path) -> Path | None:
    """The path of the pool or dns model that ``path`` is in."""
    if len(path) >= 2 and path[0] == "pools":
        return path[:2]
    if path[:1] == ("dns",):
        return ("dns",)
    return None


def _child(data: Any, part: object) -> tuple[bool, Any]:
    """``data[part]`` for a key of a dict or an index of a list: (found, value)."""
    if isinstance(data, dict) and isinstance(part, str) and part in data:
        return True, data[part]
    if isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
        return True, data[part]
    return False, None


def _lookup(data: Any, path: Path) -> tuple[bool, Any]:
    current = data
    for part in path:
        present, current = _child(current, part)
        if not present:
            return False, None
    return True, current
