"""Host name resolution with dnspython: explicit settings, a TTL-aware cache on the injected
clock, stale-if-error, and the sightings that membership of rotating names is built from.

A pool asks :meth:`HostResolver.answer` (or :meth:`~HostResolver.addresses`) at connect time
(answered from the cache; only a name never resolved, or whose answer is past its grace period,
is queried there). The supervisor calls :meth:`HostResolver.refresh` before an answer expires,
so checkouts do not wait on DNS. When a refresh fails (timeout, SERVFAIL, NXDOMAIN, ...) the last
good answer keeps serving for ``stale_grace`` seconds past its expiry, with a warning and a
counter.

What DNS really answers, and what this module does about it:

- **CNAME chains.** Aurora's endpoints are CNAMEs (the reader endpoint: TTL 1 s) to an instance
  endpoint (one A record, TTL 5 s). An answer is cached for the smallest TTL along its chain
  (dnspython's ``Answer.chaining_result.minimum_ttl``; ``Answer.rrset.ttl`` is the last
  record's only), and the chain's end is kept as the answer's ``canonical_name``.
- **Rotating answers.** Aurora's reader and custom endpoints answer ONE instance per query,
  at random; other round-robin setups answer a different subset each time. Every address an
  answer names is remembered with the time it was last named (``Answer.seen``), so a pool can
  take the union over a window as the name's members (:meth:`AddressBook.observe`) instead of
  following each answer. The supervisor samples the name at its TTL (``refresh_ahead`` of it).
- **One family failing.** A and AAAA are asked one after the other; a family that times out or
  fails (a resolver that drops AAAA, or answers it SERVFAIL) does not discard the other's
  answer: it is counted per name (``Answer.family_failures``) and warned once. The second family
  gets only a short slice of the lookup's ``lifetime`` (:func:`second_family_slice`), so a
  dropped AAAA costs at most that, not the whole lifetime.
- **Special names.** ``localhost`` and ``*.localhost`` (RFC 6761) are loopback and never asked
  of DNS, even with ``nameservers`` configured: they answer what the system gives for
  ``localhost`` (``/etc/hosts``), or ``127.0.0.1``/``::1``. Other ``/etc/hosts`` names go to
  the system's lookup only when no ``nameservers`` are configured (the system's order: files
  before DNS); with ``nameservers``, only those nameservers are asked.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import dns.exception
import dns.name
import dns.resolver

from .clock import REAL_CLOCK, Clock
from .errors import PoolError

__all__ = [
    "DnsSettings",
    "HostResolver",
    "ResolutionError",
    "Answer",
    "is_ip_literal",
    "is_loopback_name",
    "second_family_slice",
]

logger = logging.getLogger(__name__)

SEEN_HISTORY_S = 3600.0  # sightings older than this are forgotten (the longest useful window)
_RDTYPE_FAMILY = {"A": "ipv4", "AAAA": "ipv6"}


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
    # the end of the CNAME chain of the latest answer (the name itself when there is none)
    canonical_name: str = ""
    # every address an answer named, with when it was last named (the resolver's clock) and
    # under which canonical name: what membership of a rotating name is built from
    seen: dict[str, float] = field(default_factory=dict)
    seen_as: dict[str, str] = field(default_factory=dict)
    changes: int = 0  # refreshes whose address set differed from the one before
    family_failures: dict[str, int] = field(default_factory=dict)  # "AAAA" -> count
    family_error: str | None = None  # the last failure of one family while the other answered

    def stats(self, now: float) -> dict[str, Any]:
        """What ``stats()["dns"]`` shows for this name (times in seconds, relative to now)."""
        return {
            "addresses": list(self.addresses),
            "canonical_name": self.canonical_name,
            "ttl_s": self.ttl,
            "expires_in_s": self.expires_at - now,
            "stale": self.stale,
            "queries": self.queries,
            "answer_changes": self.changes,
            "seen": {ip: {"seen_s_ago": max(0.0, now - at), "as": self.seen_as.get(ip, "")}
                     for ip, at in self.seen.items()},
            "refresh_failures": self.refresh_failures,
            "stale_served": self.stale_served,
            "last_error": self.last_error,
            "family_failures": dict(self.family_failures),
            "family_error": self.family_error,
        }


@dataclass(frozen=True)
class _Lookup:
    """What one query of a name found."""

    addresses: tuple[str, ...]
    ttl: float
    canonical_name: str
    family_errors: dict[str, str] = field(default_factory=dict)  # rdtype -> what went wrong


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def is_loopback_name(host: str) -> bool:
    """``localhost`` and any name under ``.localhost`` (RFC 6761, section 6.3): loopback."""
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


def second_family_slice(lifetime: float) -> float:
    """Seconds of a lookup's ``lifetime`` kept for the second address family (AAAA after A):
    a fifth of it, between 0.1 and 1 s (1 s of dnspython's default 5 s). The first family gets
    the rest; the second gets this slice when the first answered (the rest when it failed)."""
    return min(1.0, max(0.1, lifetime / 5.0))


def is_socket_path(host: str) -> bool:
    return host.startswith("/") or host.startswith("@")


class HostResolver:
    """Resolves and caches host names for one pool (or several that share it).

    ``settings``: a :class:`DnsSettings` or the YAML ``dns:`` mapping (None: the system's
    configuration). ``clock``: TTLs, grace periods and sightings are on it."""

    def __init__(self, settings: DnsSettings | Mapping[str, Any] | None = None,
                 clock: Clock = REAL_CLOCK) -> None:
        self.settings = DnsSettings.from_mapping(settings)
        self.clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, Answer] = {}
        self._family_warned: set[tuple[str, str]] = set()
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

    def answer(self, name: str) -> Answer:
        """The answer for ``name`` from the cache. Queried now only when the name was never
        resolved, or its answer expired without a refresh (no supervisor ran). Raises
        :class:`ResolutionError` when there is nothing to serve."""
        now = self.clock.monotonic()
        ans = self.cached(name)
        if ans is not None:
            if ans.error is not None:
                if now < ans.refresh_at:
                    raise ans.error  # gone past its grace; not asked again before the retry
            elif now < ans.expires_at:
                return ans
            elif ans.stale and now < ans.expires_at + self.settings.stale_grace:
                return ans  # refreshing fails; the supervisor keeps trying
        return self.refresh(name)

    def addresses(self, name: str) -> tuple[str, ...]:
        """The addresses of the latest answer for ``name`` (see :meth:`answer`)."""
        return self.answer(name).addresses

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
            found = self._query(name)
        except ResolutionError as exc:
            return self._failed(key, now, exc)
        addresses = found.addresses
        ttl = min(max(found.ttl, self.settings.min_ttl), self.settings.max_ttl)
        with self._lock:
            old = self._cache.get(key)
            ans = Answer(
                name=key,
                addresses=addresses,
                ttl=ttl,
                fetched_at=now,
                expires_at=now + ttl,
                refresh_at=now + ttl * self.settings.refresh_ahead,
                canonical_name=found.canonical_name,
            )
            if old is not None:
                ans.queries = old.queries
                ans.stale_served = old.stale_served
                ans.refresh_failures = old.refresh_failures
                ans.changes = old.changes + (set(old.addresses) != set(addresses))
                ans.family_failures = dict(old.family_failures)
                ans.family_error = old.family_error
                horizon = now - SEEN_HISTORY_S
                ans.seen = {ip: at for ip, at in old.seen.items() if at > horizon}
                ans.seen_as = {ip: n for ip, n in old.seen_as.items() if ip in ans.seen}
            for ip in addresses:
                ans.seen[ip] = now
                ans.seen_as[ip] = found.canonical_name
            ans.queries += 1
            for rdtype, error in found.family_errors.items():
                ans.family_failures[rdtype] = ans.family_failures.get(rdtype, 0) + 1
                ans.family_error = f"{rdtype}: {error}"
            warn = [(key, t) for t in found.family_errors if (key, t) not in self._family_warned]
            self._family_warned.update(warn)
            recovered = [t for (n, t) in self._family_warned
                         if n == key and t not in found.family_errors]
            for rdtype in recovered:
                self._family_warned.discard((key, rdtype))
            self._cache[key] = ans
        for _key, rdtype in warn:
            logger.warning(
                "dns: %s: the %s query failed (%s); using the other family's answer (%s)."
                " Counted in stats; not warned again until it answers",
                name, rdtype, found.family_errors[rdtype], ", ".join(addresses),
            )
        if old is not None and old.stale:
            logger.info("dns: %s answers again: %s", name, ", ".join(addresses))
        if old is None or set(old.addresses) != set(addresses):
            via = (f" via {found.canonical_name}"
                   if found.canonical_name and found.canonical_name != key else "")
            # a rotating name changes at every refresh: DEBUG after the first answer
            log = logger.info if old is None or old.changes < 2 else logger.debug
            log("dns: %s -> %s%s (ttl %.0f s)", name, ", ".join(addresses), via, ttl)
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

    def _query(self, name: str) -> _Lookup:
        if is_loopback_name(name):
            return self._query_loopback(name)
        r = self._dns
        if r is None or (not self.settings.nameservers and name.lower() in _hosts_file_names()):
            return self._query_system(name)  # the system's order: files before DNS
        s = self.settings
        rdtypes = [t for f, t in (("ipv4", "A"), ("ipv6", "AAAA")) if f in s.families]
        found: list[str] = []
        ttls: list[float] = []
        canonical = ""
        errors: dict[str, str] = {}
        timed_out: list[str] = []
        # the lookup's budget is wall time (the network's), never the injected clock's
        deadline = time.monotonic() + s.lifetime
        slice_s = second_family_slice(s.lifetime) if len(rdtypes) > 1 else 0.0
        nxdomain = False
        for i, rdtype in enumerate(rdtypes):
            remaining = deadline - time.monotonic()
            if i == 0:
                budget = remaining - slice_s  # keep the second family its slice
            elif found:
                budget = min(remaining, slice_s)  # the first answered: a short slice only
            else:
                budget = remaining
            budget = max(0.05, budget)
            try:
                ans = r.resolve(name, rdtype, search=bool(s.search), lifetime=budget)
            except dns.resolver.NoAnswer:
                continue  # the name exists, without records of this type
            except dns.resolver.NXDOMAIN:
                nxdomain = True
                break
            except dns.resolver.LifetimeTimeout:
                errors[rdtype] = f"no answer within {budget:.2g} s"
                timed_out.append(rdtype)
                continue
            except dns.resolver.NoNameservers as exc:
                errors[rdtype] = _rcodes(exc)
                continue
            except dns.exception.DNSException as exc:
                errors[rdtype] = f"{type(exc).__name__}: {exc}"
                continue
            rrset = ans.rrset
            if rrset is None:
                continue
            found.extend(rd.address for rd in rrset)
            # the smallest TTL along the CNAME chain, not only the last record's
            ttls.append(float(ans.chaining_result.minimum_ttl))
            if not canonical or rdtype == "A":
                canonical = ans.canonical_name.to_text(omit_final_dot=True).lower()
        if nxdomain or not found:
            if not s.nameservers:
                try:
                    return self._query_system(name)  # /etc/hosts and friends
                except ResolutionError:
                    pass
            if nxdomain:
                raise self._error(name, "NXDOMAIN (no such name)")
            if errors and len(timed_out) == len(errors) == len(rdtypes):
                raise self._error(name, f"no answer within {s.lifetime:g} s")
            if errors:
                raise self._error(name, "; ".join(
                    e if len(errors) == 1 else f"{t}: {e}" for t, e in errors.items()))
            raise self._error(name, f"no {' or '.join(rdtypes)} records")
        return _Lookup(tuple(dict.fromkeys(found)), min(ttls), canonical or name.lower(),
                       errors)

    def _query_loopback(self, name: str) -> _Lookup:
        """``localhost`` and ``*.localhost``: what the system says ``localhost`` is (never DNS),
        or the loopback addresses when it says nothing."""
        fams = self.settings.families
        try:
            addrs = self._query_system("localhost").addresses
        except ResolutionError:
            addrs = ()
        if not addrs:
            addrs = tuple(ip for ip, fam in (("127.0.0.1", "ipv4"), ("::1", "ipv6"))
                          if fam in fams)
        return _Lookup(addrs, self.settings.max_ttl, name.lower())

    def _query_system(self, name: str) -> _Lookup:
        fams = self.settings.families
        family = (socket.AF_UNSPEC if len(fams) == 2 else
                  socket.AF_INET if fams == ("ipv4",) else socket.AF_INET6)
        try:
            infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise self._error(name, f"system lookup failed: {exc.strerror}") from None
        addrs = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        # the system lookup gives no TTL: hold it for the minimum, re-asked often
        return _Lookup(addrs, max(self.settings.min_ttl, 5.0), name.lower())

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
