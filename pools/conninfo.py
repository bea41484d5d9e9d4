"""A pool's connection parameters: a DSN merged with keywords as libpq merges them, the hosts
they name (``host=a,b port=1,2``, ``PGHOST``/``PGPORT`` when absent), and their rendering without
secrets. Pure: no I/O.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions

from .resolver import is_ip_literal, is_socket_path

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "REDACTED",
    "SECRET_KEYS",
    "TARGET_SESSION_ATTRS",
    "Target",
    "describe",
    "parse_conninfo",
    "parse_targets",
    "redact_params",
]

SECRET_KEYS = frozenset({"password", "sslpassword"})
REDACTED = "***"
DEFAULT_CONNECT_TIMEOUT = 5
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")

# psycopg2.connect() keywords that are not libpq parameters
_PSYCOPG_KEYS = frozenset({"connection_factory", "cursor_factory"})
# parameters the connector sets per attempt
_PER_ATTEMPT = frozenset({"host", "hostaddr", "port", "connect_timeout", "target_session_attrs",
                          "load_balance_hosts"})



def parse_conninfo(dsn: str | None, kwargs: Mapping[str, Any]) -> dict[str, str]:
    """Merge a DSN (key=value or URI) with keyword parameters; keywords win. Values are strings,
    ``None`` values are dropped. Raises ``ValueError`` on a bad DSN; neither the DSN nor
    libpq's message (which quotes parts of it, a password too) is shown."""
    params: dict[str, str] = {}
    if dsn:
        try:
            params.update(psycopg2.extensions.parse_dsn(dsn))
        except psycopg2.ProgrammingError:
            raise ValueError("invalid dsn: libpq cannot parse it (the dsn and libpq's message "
                             "are not shown: they may hold a password; `pgregistry check` on "
                             "a YAML file points at the mistake)") from None
    for key, value in kwargs.items():
        if value is None:
            params.pop(key, None)
        else:
            params["dbname" if key == "database" else key] = str(value)
    if "database" in params:
        params.setdefault("dbname", params.pop("database"))
    return params


def redact_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` with every secret replaced by ``***``."""
    return {k: (REDACTED if k in SECRET_KEYS and v else v) for k, v in params.items()}


def describe(params: Mapping[str, Any]) -> str:
    """A short, secret-free ``key=value`` rendering of connection parameters."""
    shown = redact_params(params)
    return " ".join(f"{k}={v}" for k, v in shown.items())


@dataclass(frozen=True)
class Target:
    """One host of the connection string: a name to resolve, an IP literal, a socket
    directory, or '' (libpq's default); with its port and an optional user-given hostaddr."""

    host: str
    port: str
    hostaddr: str | None = None

    @property
    def needs_dns(self) -> bool:
        return (
            self.hostaddr is None
            and bool(self.host)
            and not is_ip_literal(self.host)
            and not is_socket_path(self.host)
        )

    @property
    def label(self) -> str:
        return f"{self.host or 'default'}:{self.port}"


def parse_targets(params: Mapping[str, str]) -> list[Target]:
    hosts_s = params.get("host") or os.environ.get("PGHOST") or ""
    ports_s = params.get("port") or os.environ.get("PGPORT") or "5432"
    addrs_s = params.get("hostaddr") or os.environ.get("PGHOSTADDR") or ""
    addrs = [a.strip() for a in addrs_s.split(",")] if addrs_s else []
    hosts = [h.strip() for h in hosts_s.split(",")] if hosts_s else [""] * max(1, len(addrs))
    ports = [p.strip() or "5432" for p in ports_s.split(",")]
    if len(ports) == 1:
        ports *= len(hosts)
    if len(ports) != len(hosts):
        raise ValueError(f"{len(ports)} ports for {len(hosts)} hosts: give one, or one per host")
    if addrs and len(addrs) != len(hosts):
        raise ValueError(f"{len(addrs)} hostaddrs for {len(hosts)} hosts: give one per host")
    return [
        Target(h, p, (addrs[i] or None) if addrs else None)
        for i, (h, p) in enumerate(zip(hosts, ports, strict=True))
    ]
