"""Health of pools and addresses from their ``stats()``: ok, degraded or failing, with the last
error; what ``pgregistry stats`` prints and turns into its exit status.

A connection still opening is not open: ``open = size - opening`` (for an address,
``connections - opening``).

- address: *failing* when banned, or when nothing is open to it and its last connect failed;
  *left DNS* when its name no longer answers with it; *ok* otherwise.
- pool: *failing* when not one connection is open (its last error: the last connect error, a
  failed probe, or a DNS error); *degraded* when it serves but some address is failing or fewer
  than ``minconn`` connections are open; *ok* otherwise.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AddressHealth", "PoolHealth", "EXIT_CODES", "exit_code", "format_table",
           "pool_health"]

OK, DEGRADED, FAILING = "ok", "degraded", "failing"

#: ``pgregistry stats`` exit status: 0 every pool ok, 2 some degraded (none failing),
#: 3 some failing (1 is a refused file).
EXIT_CODES = {OK: 0, DEGRADED: 2, FAILING: 3}


@dataclass(frozen=True)
class AddressHealth:
    label: str
    state: str
    open: int
    opening: int
    in_use: int
    idle: int
    failures: int
    error: str | None


@dataclass(frozen=True)
class PoolHealth:
    name: str
    state: str
    open: int
    opening: int
    in_use: int
    idle: int
    minconn: int
    connect_errors: int
    error: str | None
    addresses: list[AddressHealth] = field(default_factory=list)


def _address_health(label: str, a: Mapping[str, Any]) -> AddressHealth:
    opening = int(a.get("opening", 0))
    open_ = max(0, int(a.get("connections", 0)) - opening)
    failures = int(a.get("connect_failures", 0))
    error = a.get("last_error")
    if a.get("banned"):
        state = FAILING
        error = error or a.get("ban_reason")
    elif not a.get("active", True):
        state = "left DNS"
    elif open_ == 0 and failures and error:
        state = FAILING
    else:
        state = OK
    return AddressHealth(label, state, open_, opening, int(a.get("in_use", 0)),
                         int(a.get("idle", 0)), failures, str(error) if error else None)


def pool_health(name: str, s: Mapping[str, Any], probe_error: str | None = None) -> PoolHealth:
    """The health of one pool from its ``stats()`` (and the error of a checkout that was
    tried, if it failed)."""
    opening = int(s.get("opening", 0))
    open_ = max(0, int(s.get("size", 0)) - opening)
    addresses = [_address_health(label, a)
                 for label, a in sorted((s.get("addresses") or {}).items())]
    dns_errors = [str(d["last_error"]) for d in (s.get("dns") or {}).values()
                  if d.get("last_error")]
    error = probe_error or s.get("last_connect_error") or (dns_errors[0] if dns_errors else None)
    if s.get("closed"):
        state = FAILING
        error = error or "closed"
    elif open_ == 0:
        state = FAILING
        error = error or ("still connecting" if opening else "no connection open")
    elif any(a.state == FAILING for a in addresses) or open_ < int(s.get("minconn", 0)):
        state = DEGRADED
        failing = [a for a in addresses if a.state == FAILING]
        error = failing[0].error if failing and failing[0].error else error
    else:
        state = OK
        error = None
    return PoolHealth(name, state, open_, opening, int(s.get("in_use", 0)), int(s.get("idle", 0)),
                      int(s.get("minconn", 0)), int(s.get("connect_errors", 0)),
                      str(error) if error else None, addresses)


def exit_code(pools: list[PoolHealth]) -> int:
    """The worst state's exit status (0 when there are no pools)."""
    return max((EXIT_CODES.get(p.state, 0) for p in pools), default=0)


def format_table(pools: list[PoolHealth]) -> str:
    """Pools and their addresses as a plain-text table, the last error under each row that
    has one."""
    header = ("pool", "address", "state", "open", "opening", "in use", "idle", "failures")
    rows: list[tuple[str, ...]] = [header]
    errors: dict[int, str] = {}
    for p in pools:
        rows.append((p.name, "", p.state, str(p.open), str(p.opening), str(p.in_use),
                     str(p.idle), str(p.connect_errors)))
        if p.error:
            errors[len(rows) - 1] = p.error
        for a in p.addresses:
            rows.append(("", a.label, a.state, str(a.open), str(a.opening), str(a.in_use),
                         str(a.idle), str(a.failures)))
            if a.error and a.state != OK:
                errors[len(rows) - 1] = a.error
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if index in errors:
            text = " ".join(errors[index].split())
            lines.append(f"    last error: {text[:300]}")
    return "\n".join(lines)
