"""Opening one connection, and showing connection parameters without their secrets.

The connector owns the libpq parameters of a pool (from ``dsn`` and keywords, keywords win as
in libpq) and opens a psycopg2 connection with them. It never logs or shows a password."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import psycopg2
import psycopg2.extensions

__all__ = ["Connector", "redact_params", "redact_dsn", "parse_conninfo"]

logger = logging.getLogger(__name__)

SECRET_KEYS = frozenset({"password", "sslpassword"})
REDACTED = "***"
DEFAULT_CONNECT_TIMEOUT = 5

# psycopg2.connect() keywords that are not libpq parameters
_PSYCOPG_KEYS = frozenset({"connection_factory", "cursor_factory"})

_URI_PASSWORD = re.compile(r"^(?P<head>[a-z]+://[^:/@]*:)(?P<pw>[^@]*)(?P<tail>@.*)$", re.I)
_KV_PASSWORD = re.compile(r"(?P<key>\b(?:ssl)?password\s*=\s*)(?P<val>'(?:[^'\\]|\\.)*'|\S+)", re.I)


def parse_conninfo(dsn: str | None, kwargs: Mapping[str, Any]) -> dict[str, str]:
    """Merge a DSN (key=value or URI) with keyword parameters; keywords win. Values are strings,
    ``None`` values are dropped. Raises ``ValueError`` (with the DSN redacted) on a bad DSN."""
    params: dict[str, str] = {}
    if dsn:
        try:
            params.update(psycopg2.extensions.parse_dsn(dsn))
        except psycopg2.ProgrammingError as exc:
            raise ValueError(f"invalid dsn {redact_dsn(dsn)!r}: {str(exc).strip()}") from None
    for key, value in kwargs.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = str(value)
    return params


def redact_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` with every secret replaced by ``***``."""
    return {k: (REDACTED if k in SECRET_KEYS and v else v) for k, v in params.items()}


def redact_dsn(dsn: str) -> str:
    """A DSN string (URI or key=value) with its password replaced by ``***``."""
    m = _URI_PASSWORD.match(dsn)
    if m:
        dsn = f"{m['head']}{REDACTED}{m['tail']}"
    dsn = re.sub(r"([?&](?:ssl)?password=)[^&]*", rf"\g<1>{REDACTED}", dsn, flags=re.I)
    return _KV_PASSWORD.sub(lambda m: f"{m['key']}{REDACTED}", dsn)


def describe(params: Mapping[str, Any]) -> str:
    """A short, secret-free ``key=value`` rendering of connection parameters."""
    shown = redact_params(params)
    return " ".join(f"{k}={v}" for k, v in shown.items())


class Connector:
    """Opens connections with one pool's parameters.

    ``params`` are libpq parameters; ``connect_kwargs`` may also hold psycopg2's
    ``connection_factory`` and ``cursor_factory``."""

    def __init__(self, dsn: str | None = None, **connect_kwargs: Any) -> None:
        extra = {k: connect_kwargs.pop(k) for k in list(connect_kwargs) if k in _PSYCOPG_KEYS}
        if "async_" in connect_kwargs or "async" in connect_kwargs:
            raise ValueError("asynchronous connections cannot be pooled")
        self.params: dict[str, str] = parse_conninfo(dsn, connect_kwargs)
        self.params.setdefault("connect_timeout", str(DEFAULT_CONNECT_TIMEOUT))
        self._factory_kwargs = {k: v for k, v in extra.items() if v is not None}

    @property
    def host_label(self) -> str:
        """Where connections go, for logs and stats: ``host:port`` (or the socket directory)."""
        host = self.params.get("host") or self.params.get("hostaddr") or "localhost"
        port = self.params.get("port") or "5432"
        return f"{host}:{port}"

    def connect(self, **overrides: str) -> psycopg2.extensions.connection:
        """Open one connection (blocking, bounded by libpq's ``connect_timeout``)."""
        params = {**self.params, **overrides} if overrides else self.params
        conn: psycopg2.extensions.connection = psycopg2.connect(  # type: ignore[call-overload]
            **params, **self._factory_kwargs
        )
        return conn

    def describe(self) -> str:
        return describe(self.params)

    def __repr__(self) -> str:
        return f"Connector({self.describe()})"
