"""Cross-field checks of the YAML file's models: pure functions (:func:`pool_issues`,
:func:`dns_issues`, :func:`fallback_issues`) that return :class:`Issue` values; the models'
validators raise them as one :class:`CrossFieldError`, which the loader unpacks into one
problem per issue. No I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .dsn import DsnError, dsn_has_password, parse_dsn
from .fields import RDS_ENDPOINT

if TYPE_CHECKING:
    from .models import DnsConfig, _PoolFields

__all__ = ["CrossFieldError", "Issue", "dns_issues", "fallback_issues", "pool_issues"]


@dataclass(frozen=True)
class Issue:
    """One cross-field problem: ``path`` (relative to the model that found it) names the key
    to point at, ``()`` for the model itself; ``related`` names the sibling keys involved."""

    path: tuple[str, ...]
    message: str
    related: tuple[str, ...] = ()


class CrossFieldError(ValueError):
    """The cross-field issues of one model, raised by its validator (pydantic wraps it in a
    ``value_error`` whose ``ctx["error"]`` is this exception)."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = tuple(issues)
        super().__init__("; ".join(issue.message for issue in self.issues))


def _count(value: object) -> int:
    return len(value.split(",")) if isinstance(value, str) else 1


def pool_issues(pool: _PoolFields) -> list[Issue]:
    """Cross-field problems of one pool (defaults already merged). Pure: no I/O."""
    issues: list[Issue] = []
    if not (pool.dsn or pool.host or pool.hostaddr or pool.service):
        issues.append(Issue((), "nowhere to connect: set dsn or host (or hostaddr, or service)",
                            ("dsn", "host", "hostaddr", "service")))
    if pool.minconn > pool.maxconn:
        issues.append(Issue(("minconn",), f"minconn ({pool.minconn}) is more than maxconn "
                                         f"({pool.maxconn})", ("maxconn",)))
    if pool.address_ban > pool.address_ban_max:
        issues.append(Issue(("address_ban_max",), f"address_ban_max ({pool.address_ban_max:g}) "
                                                  f"is less than address_ban "
                                                  f"({pool.address_ban:g})", ("address_ban",)))
    if pool.reconnect_backoff > pool.reconnect_backoff_max:
        issues.append(Issue(("reconnect_backoff_max",),
                            f"reconnect_backoff_max ({pool.reconnect_backoff_max:g}) is less "
                            f"than reconnect_backoff ({pool.reconnect_backoff:g})",
                            ("reconnect_backoff",)))
    sources = [key for key in ("password_env", "password_file", "password_provider")
               if getattr(pool, key) is not None]
    if len(sources) > 1:
        issues.append(Issue((sources[1],), "set only one of password, password_env, "
                                           "password_file and password_provider",
                            (sources[0],)))
    has_secret = pool.password is not None or pool.password_provider is not None
    if pool.dsn is not None and has_secret and dsn_has_password(pool.dsn):
        source = ("password_env" if pool.password_env is not None else
                  "password_file" if pool.password_file is not None else
                  "password_provider" if pool.password_provider is not None else "password")
        issues.append(Issue((source,), f"two passwords: the dsn has one and {source} gives "
                                       "another; keep one", ("dsn",)))
    issues += _host_list_issues(pool)
    if pool.discovery == "aurora" and pool.instance_host_pattern is None:
        host = pool.host
        if host is None and pool.dsn is not None:
            try:
                host = parse_dsn(pool.dsn).get("host")
            except DsnError:
                host = None  # reported on its own
        if host is not None and not RDS_ENDPOINT.match(host):
            issues.append(Issue(("discovery",), "discovery: aurora with a host that is not an "
                                "RDS endpoint name needs instance_host_pattern (an instance "
                                "endpoint with '?' for the instance id)",
                                ("instance_host_pattern",)))
    return issues


def _host_list_issues(pool: _PoolFields) -> list[Issue]:
    """The host, port and hostaddr lists the pool ends up with, from its keys and its dsn
    together (keys win), as the connector reads them: one port or one per host, one hostaddr
    per host; without host, each hostaddr is a host (libpq's rule)."""
    params: dict[str, str] = {}
    if pool.dsn is not None:
        try:
            params = parse_dsn(pool.dsn)
        except DsnError:
            params = {}  # reported on its own
    values = {name: getattr(pool, name) if getattr(pool, name) is not None else params.get(name)
              for name in ("host", "port", "hostaddr")}
    from_dsn = [name for name in values if getattr(pool, name) is None and name in params]
    given = [name for name in values if values[name] is not None]
    note = ("" if not from_dsn else " (in the dsn)" if set(given) <= set(from_dsn)
            else " (dsn and pool keys together)")
    host, port, hostaddr = values["host"], values["port"], values["hostaddr"]
    hosts = _count(host) if host else _count(hostaddr) if hostaddr else 1
    issues = []
    if port is not None and _count(port) not in (1, hosts):
        issues.append(Issue(("port",) if pool.port is not None else ("dsn",),
                            f"{_count(port)} ports for {hosts} hosts{note}: give one port, or "
                            "one per host", ("host",)))
    if host and hostaddr and _count(hostaddr) != hosts:
        issues.append(Issue(("hostaddr",) if pool.hostaddr is not None else ("dsn",),
                            f"{_count(hostaddr)} hostaddr entries for {hosts} hosts{note}: give "
                            "one per host", ("host",)))
    return issues


def dns_issues(dns: DnsConfig) -> list[Issue]:
    """Cross-field problems of the ``dns:`` section. Pure."""
    if dns.max_ttl < dns.min_ttl:
        return [Issue(("max_ttl",), f"max_ttl ({dns.max_ttl:g}) is less than min_ttl "
                                    f"({dns.min_ttl:g})", ("min_ttl",))]
    return []


def fallback_issues(fallbacks: Mapping[str, str | None]) -> list[Issue]:
    """Problems of the pools' ``fallback`` keys (pool name -> fallback); paths are from the
    top of the file. Pure."""
    issues: list[Issue] = []
    for name, fallback in fallbacks.items():
        path = ("pools", name, "fallback")
        if fallback is None:
            continue
        if fallback == name:
            issues.append(Issue(path, f"pool {name!r} cannot be its own fallback"))
        elif fallback not in fallbacks:
            known = ", ".join(repr(n) for n in fallbacks if n != name) or "none"
            issues.append(Issue(path, f"fallback pool {fallback!r} does not exist "
                                      f"(other pools: {known})"))
    return issues
