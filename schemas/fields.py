"""The field types of the YAML file's models: numbers that refuse booleans, text that takes
numbers (YAML reads ``dbname: 2024`` as one), lists given as one string, ports, IP addresses,
libpq's enumerations; each with the validator that gives its error message. Pure.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, WithJsonSchema

__all__ = [
    "Flag", "Float", "Int", "IpAddress", "NonNegFloat", "NonNegInt", "PosFloat", "Port",
    "RDS_ENDPOINT", "Replication", "Secret", "Text", "TlsVersion", "check_hostaddr",
    "check_instance_host_pattern", "check_require_auth", "digits_to_int", "split_list",
]


def _not_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


def _number_to_text(value: object) -> object:
    """YAML reads ``dbname: 2024`` as a number; a text parameter takes it as text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def digits_to_int(value: object) -> object:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return value


def split_list(value: object) -> object:
    """A list given as one string (typically from ``${VAR}``): comma- or space-separated."""
    if isinstance(value, str):
        return tuple(part for part in re.split(r"[\s,]+", value) if part)
    return value


def _check_ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(
            "not an IP address (nameservers are IP addresses, not host names)") from None
    return value


RDS_ENDPOINT = re.compile(
    r"^[a-z0-9-]+\.cluster-(?:ro-|custom-)?[a-z0-9]+\.[a-z0-9-]+\.rds\.amazonaws\.com(?:\.cn)?\.?$",
    re.IGNORECASE,
)


def check_instance_host_pattern(value: str) -> str:
    labels = value.rstrip(".").split(".")
    if value.count("?") != 1 or "?" not in labels:
        raise ValueError("needs exactly one '?' as a whole DNS label (the instance id), e.g. "
                         "'?.abc123.eu-west-1.rds.amazonaws.com'")
    if any(not re.fullmatch(r"[A-Za-z0-9-]{1,63}", lb) for lb in labels if lb != "?"):
        raise ValueError("is not a host name with '?' for the instance id")
    return value


def check_hostaddr(value: str) -> str:
    for part in value.split(","):
        part = part.strip()
        if part:
            try:
                ipaddress.ip_address(part)
            except ValueError:
                raise ValueError(
                    "hostaddr takes IP addresses (comma-separated); put host names in host"
                ) from None
    return value


def _check_port(value: object) -> object:
    message = "port must be a number from 1 to 65535, or a comma-separated list of them"
    if isinstance(value, bool):
        raise ValueError(message)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            value = int(text)
        else:
            parts = [part.strip() for part in text.split(",")]
            if len(parts) < 2 or not all(
                part == "" or (part.isdigit() and 1 <= int(part) <= 65535) for part in parts
            ):
                raise ValueError(message)
            return ",".join(parts)
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise ValueError(message)
        return value
    raise ValueError(message)


_AUTH_METHODS = frozenset({"password", "md5", "gss", "sspi", "scram-sha-256", "oauth", "none"})


def check_require_auth(value: str) -> str:
    methods = [part.strip() for part in value.split(",")]
    negated = {method.startswith("!") for method in methods}
    if not value.strip() or len(negated) > 1 or not all(
        method.lstrip("!") in _AUTH_METHODS for method in methods
    ):
        raise ValueError(
            "require_auth is a comma-separated list of password, md5, gss, sspi, "
            "scram-sha-256, oauth, none (all of them negated with '!', or none)"
        )
    return value


def _replication_text(value: object) -> object:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value.strip().lower()
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
# Limits inside the Annotated (before the validator) so that they reach the JSON Schema of an
# optional field as minimum/exclusiveMinimum.
NonNegInt = Annotated[int, Field(ge=0), BeforeValidator(_not_bool)]
NonNegFloat = Annotated[float, Field(ge=0), BeforeValidator(_not_bool)]
PosFloat = Annotated[float, Field(gt=0), BeforeValidator(_not_bool)]
# YAML reads `dbname: 2024` as a number; a text field takes it as text, and says so in its
# JSON Schema (string or integer), so that editors and `check` agree.
Text = Annotated[str, BeforeValidator(_number_to_text),
                 WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}]})]
Secret = Annotated[SecretStr, BeforeValidator(_number_to_text),
                   WithJsonSchema({"anyOf": [{"type": "string", "format": "password",
                                              "writeOnly": True}, {"type": "integer"}]})]
Flag = Annotated[int, Field(ge=0, le=1)]
Port = Annotated[
    Annotated[int, Field(ge=1, le=65535)] | Annotated[str, Field(pattern=r"^[0-9,]*$")],
    BeforeValidator(_check_port),
]
Replication = Annotated[
    Literal["true", "on", "yes", "1", "database", "false", "off", "no", "0"],
    BeforeValidator(_replication_text),
]
IpAddress = Annotated[str, AfterValidator(_check_ip)]
TlsVersion = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
