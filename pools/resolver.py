"""Host name resolution with dnspython: explicit settings, a TTL-aware cache on the injected
clock, and stale-if-error.

A pool asks :meth:`HostResolver.addresses` at connect time (answered from the cache; only a
name never resolved, or whose answer is past its grace period, is queried there). The
supervisor calls :meth:`HostResolver.refresh` before an answer expires, so checkouts do not wait
on DNS. When a refresh fails (timeout, SERVFAIL, NXDOMAIN, ...) the last good answer keeps
serving for ``stale_grace`` seconds past its expiry, with a warning and a counter.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import dns.exception
import dns.name
import dns.resolver

from .clock import REAL_CLOCK, Clock
from .errors import PoolError

__all__ = ["DnsSettings", "HostResolver", "ResolutionError", "Answer", "is_ip_literal"]

logger = logging.getLogger(__name__)


class ResolutionError(PoolError):
    """A host name could not be resolved. Says the name, the nameservers asked and what they
    answered."""

    def __init__(self, message: str, *, name: str, nameservers: str, answer: str) -> None:
        super().__init__(message, name=name, nameservers=nameservers, answer=answer)
        self.name = name
        self.nameservers = nameservers
        self.answer = answer


@dataclass(frozen=True)
class DnsSettings:
    """How names are resolved; the same keys as the YAML file's ``dns:`` section.

    ``nameservers`` empty: the system's resolver configuration (``/etc/resolv.conf``, and
    ``/etc/hosts`` through the system's own lookup for names it does not know)."""

    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 2.0  # one try at one nameserver
    lifetime: float = 5.0  # the whole lookup
    search: tuple[str, ...] = ()  # search domains: off unless configured
    min_ttl: float = 1.0
    max_ttl: float = 300.0
    stale_grace: float = 300.0  # serve a failed name's last answer this long past its expiry
    refresh_ahead: float = 0.8  # refresh at this fraction of the TTL
    families: tuple[str, ...] = ("ipv4", "ipv6")

    @classmethod
    def from_mapping(cls, value: DnsSettings | Mapping[str, Any] | None) -> DnsSettings:
        if value is None:
            return cls()
        if isinstance(value, DnsSettings):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown dns setting(s) {unknown}; known: {sorted(known)}")
        kw: dict[str, Any] = {}
        for key, v in value.items():
            if key in ("nameservers", "search", "families"):
                kw[key] = tuple(v) if not isinstance(v, str) else (v,)
            else:
                kw[key] = v
        return cls(**kw)

    def __post_init__(self) -> None:
        for ns in self.nameservers:
            if not is_ip_literal(ns):
                raise ValueError(f"dns nameservers must be IP addresses, got {ns!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"dns port must be 1..65535, got {self.port}")
        if self.timeout <= 0 or self.lifetime <= 0:
            raise ValueError("dns timeout and lifetime must be > 0")
        if self.min_ttl < 0 or self.max_ttl < self.min_ttl:
            raise ValueError("dns ttl bounds: need 0 <= min_ttl <= max_ttl")
        if self.stale_grace < 0:
            raise ValueError("dns stale_grace must be >= 0")
        if not 0 < self.refresh_ahead <= 1:
            raise ValueError("dns refresh_ahead must be in (0, 1]")
        bad = set(self.families) - {"ipv4", "ipv6"}
        if bad or not self.families:
            raise ValueError(f"dns families: 'ipv4' and/or 'ipv6', got {list(self.families)}")

    def describe_nameservers(self) -> str:
        if not self.nameservers:
            return "the system resolver"
        return ", ".join(f"{ns}:{self.port}" for ns in self.nameservers)


@dataclass
class Answer:
    """The cached answer for one name. Times are on the resolver's clock."""

    name: str
    addresses: tuple[str, ...]
    ttl: float
    fetched_at: float
    expires_at: float
    refresh_at: float
    stale: bool = False  # a refresh failed; serving the last good answer
    last_error: str | None = None
    failures: int = 0  # consecutive failed refreshes
    queries: int = 0
    stale_served: int = 0
    refresh_failures: int = 0
    # past the grace with refreshes still failing: no addresses to serve, this error instead
    # (kept, so stats still show the name and connects fail fast until the next retry)
    error: ResolutionError | None = None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def is_socket_path(host: str) -> bool:
    return host.startswith("/") or host.startswith("@")


class HostResolver:
    """Resolves and caches host names for one pool (or several that share it)."""

    def __init__(self, settings: DnsSettings | Mapping[str, Any] | None = None,
                 clock: Clock = REAL_CLOCK) -> None:
        self.settings = DnsSettings.from_mapping(settings)
        self.clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, Answer] = {}
        self._dns = self._make_resolver()

    def _make_resolver(self) -> dns.resolver.Resolver | None:
        s = self.settings
        if s.nameservers:
            r = dns.resolver.Resolver(configure=False)
            r.port = s.port  # before nameservers: dnspython binds the port when they are set
            r.nameservers = list(s.nameservers)
        else:
            try:
                r = dns.resolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration:
                return None  # the system's lookup only (getaddrinfo)
            if s.port != 53:
                r.port = s.port
                r.nameservers = list(r.nameservers)
        r.timeout = s.timeout
        r.lifetime = s.lifetime
        r.search = [dns.name.from_text(d) for d in s.search]
        r.use_search_by_default = bool(s.search)
        r.cache = None
        return r

    def after_fork(self) -> None:
        self._lock = threading.Lock()

    # -- reading ----------------------------------------------------------------------------

    def cached(self, name: str) -> Answer | None:
        with self._lock:
            return self._cache.get(name.lower())

    def answers(self) -> dict[str, Answer]:
        with self._lock:
            return dict(self._cache)

    def addresses(self, name: str) -> tuple[str, ...]:
        """The addresses of ``name`` from the cache. Queried now only when the name was never
        resolved, or its answer expired without a refresh (no supervisor ran). Raises
        :class:`ResolutionError` when there is nothing to serve."""
        now = self.clock.monotonic()
        ans = self.cached(name)
        if ans is not None:
            if ans.error is not None:
                if now < ans.refresh_at:
                    raise ans.error  # gone past its grace; not asked again before the retry
            elif now < ans.expires_at:
                return ans.addresses
            elif ans.stale and now < ans.expires_at + self.settings.stale_grace:
                return ans.addresses  # refreshing fails; the supervisor keeps trying
        return self.refresh(name).addresses

    def expedite(self, name: str, now: float) -> None:
        """Have the supervisor refresh ``name`` at its next step instead of at its TTL."""
        with self._lock:
            ans = self._cache.get(name.lower())
            if ans is not None and ans.refresh_at > now:
                ans.refresh_at = now

    def refresh_due(self, now: float) -> float | None:
        """The earliest time a cached answer wants refreshing (None: nothing cached)."""
        with self._lock:
            if not self._cache:
                return None
            return min(a.refresh_at for a in self._cache.values())

    def due_names(self, now: float) -> list[str]:
        with self._lock:
            return [n for n, a in self._cache.items() if now >= a.refresh_at]

    # -- querying ---------------------------------------------------------------------------

    def refresh(self, name: str) -> Answer:
        """Query ``name`` now. On failure keep serving the last good answer within its grace
        period (marked stale); with nothing to serve, raise :class:`ResolutionError`."""
        key = name.lower()
        now = self.clock.monotonic()
        try:
            addresses, ttl = self._query(name)
        except ResolutionError as exc:
            return self._failed(key, now, exc)
        ttl = min(max(ttl, self.settings.min_ttl), self.settings.max_ttl)
        with self._lock:
            old = self._cache.get(key)
            ans = Answer(
                name=key,
                addresses=addresses,
                ttl=ttl,
                fetched_at=now,
                expires_at=now + ttl,
                refresh_at=now + ttl * self.settings.refresh_ahead,
            )
            if old is not None:
                ans.queries = old.queries
                ans.stale_served = old.stale_served
                ans.refresh_failures = old.refresh_failures
            ans.queries += 1
            self._cache[key] = ans
        if old is not None and old.stale:
            logger.info("dns: %s answers again: %s", name, ", ".join(addresses))
        if old is None or set(old.addresses) != set(addresses):
            logger.info("dns: %s -> %s (ttl %.0f s)", name, ", ".join(addresses), ttl)
        return ans

    def _failed(self, key: str, now: float, exc: ResolutionError) -> Answer:
        grace = self.settings.stale_grace
        with self._lock:
            old = self._cache.get(key)
            if old is None:
                raise exc
            if now >= old.expires_at + grace:
                if old.error is None:
                    logger.warning(
                        "dns: %s: the last answer expired %.0f s ago and refreshing fails (%s):"
                        " no more new connections to it until DNS answers",
                        key, now - old.expires_at, exc.answer,
                    )
                old.addresses = ()
                old.error = exc
                old.failures += 1
                old.refresh_failures += 1
                old.queries += 1
                old.stale = True
                old.last_error = exc.answer
                old.refresh_at = now + min(30.0, 2.0 ** min(old.failures - 1, 5))
                raise exc
            old.failures += 1
            old.refresh_failures += 1
            old.queries += 1
            old.stale = True
            old.stale_served += 1
            old.last_error = exc.answer
            # retry soon, backing off: 1, 2, 4 ... 30 s, never past the end of the grace
            retry = min(30.0, 2.0 ** (old.failures - 1))
            old.refresh_at = min(now + retry, old.expires_at + grace)
        logger.warning(
            "dns: refreshing %s failed (%s); serving the last answer (%s) for up to %.0f s more",
            key, exc.answer, ", ".join(old.addresses), old.expires_at + grace - now,
        )
        return old

    def _query(self, name: str) -> tuple[tuple[str, ...], float]:
        r = self._dns
        if r is None or (not self.settings.nameservers and name.lower() in _hosts_file_names()):
            return self._query_system(name)  # the system's order: files before DNS
        s = self.settings
        rdtypes = [t for f, t in (("ipv4", "A"), ("ipv6", "AAAA")) if f in s.families]
        found: list[str] = []
        ttls: list[float] = []
        deadline = self.clock.monotonic() + s.lifetime
        nxdomain = None
        for rdtype in rdtypes:
            remaining = max(0.1, deadline - self.clock.monotonic())
            try:
                ans = r.resolve(name, rdtype, search=bool(s.search), lifetime=remaining)
            except dns.resolver.NoAnswer:
                continue  # the name exists, without records of this type
            except dns.resolver.NXDOMAIN as exc:
                nxdomain = exc
                break
            except dns.resolver.LifetimeTimeout:
                raise self._error(name, f"no answer within {s.lifetime:g} s") from None
            except dns.resolver.NoNameservers as exc:
                raise self._error(name, _rcodes(exc)) from None
            except dns.exception.DNSException as exc:
                raise self._error(name, f"{type(exc).__name__}: {exc}") from None
            rrset = ans.rrset
            if rrset is None:
                continue
            found.extend(rd.address for rd in rrset)
            ttls.append(float(rrset.ttl))
        if nxdomain is not None or not found:
            if not s.nameservers:
                try:
                    return self._query_system(name)  # /etc/hosts and friends
                except ResolutionError:
                    pass
            what = "NXDOMAIN (no such name)" if nxdomain is not None else (
                f"no {' or '.join(rdtypes)} records")
            raise self._error(name, what)
        return tuple(dict.fromkeys(found)), min(ttls)

    def _query_system(self, name: str) -> tuple[tuple[str, ...], float]:
        fams = self.settings.families
        family = (socket.AF_UNSPEC if len(fams) == 2 else
                  socket.AF_INET if fams == ("ipv4",) else socket.AF_INET6)
        try:
            infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise self._error(name, f"system lookup failed: {exc.strerror}") from None
        addrs = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        # the system lookup gives no TTL: hold it for the minimum, re-asked often
        return addrs, max(self.settings.min_ttl, 5.0)

    def _error(self, name: str, answer: str) -> ResolutionError:
        ns = self.settings.describe_nameservers()
        return ResolutionError(
            f"cannot resolve {name!r}: {answer} (asked {ns})",
            name=name, nameservers=ns, answer=answer,
        )


_hosts_names: frozenset[str] | None = None


def _hosts_file_names() -> frozenset[str]:
    """Names in /etc/hosts (read once), plus localhost: the system resolves them without DNS."""
    global _hosts_names
    if _hosts_names is None:
        names = {"localhost"}
        try:
            with open("/etc/hosts", encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields_ = line.split("#", 1)[0].split()
                    names.update(n.lower() for n in fields_[1:])
        except OSError:
            pass
        _hosts_names = frozenset(names)
    return _hosts_names


def _rcodes(exc: dns.resolver.NoNameservers) -> str:
    """'SERVFAIL', 'REFUSED', ... from dnspython's NoNameservers, without its traceback."""
    errors = exc.kwargs.get("errors") or []
    said = []
    for err in errors:
        # (server, tcp, port, error-or-message, response)
        what = err[3] if len(err) > 3 else err
        said.append(str(what))
    text = "; ".join(dict.fromkeys(said)) or "all nameservers failed"
    return text.replace("answered ", "")
