"""The records behind :class:`pgregistry.testing.dns.DnsServer`: names with addresses,
CNAMEs or rotating targets, delayed updates (DNS lag) on a clock, failure modes per name and
query type, and the log of what was asked. No network here: the server answers from a
:class:`Zone` (see ``dns.py`` for the whole API)."""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ..pools.clock import Clock

__all__ = ["MODES", "Query", "Reply", "Zone", "normalize_name"]

log = logging.getLogger(__name__)

MODES = ("normal", "servfail", "nxdomain", "refused", "silent")
_MAX_CHAIN = 8  # CNAME hops followed in one reply (a loop answers SERVFAIL)


def normalize_name(name: str) -> str:
    """A DNS name as the zone keeps it: lower case, without the trailing dot."""
    return name.rstrip(".").lower()


_normalize = normalize_name


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"DNS mode must be one of {MODES}, not {mode!r}")
    return mode


def _check_ttl(ttl: int) -> int:
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl < 2**31:
        raise ValueError(f"a TTL is whole seconds in 0..2**31-1, not {ttl!r}")
    return ttl


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass
class _Entry:
    """The records of one name: addresses, or a CNAME, or a rotation (never two kinds)."""

    a: list[str] = field(default_factory=list)
    aaaa: list[str] = field(default_factory=list)
    a_ttl: int = 1
    aaaa_ttl: int = 1
    cname: str | None = None
    rotating: list[str] = field(default_factory=list)  # names (CNAME) or IP literals (A/AAAA)
    per_query: int = 1
    ttl: int = 1  # of the CNAME / rotated records

    def copy(self) -> _Entry:
        return _Entry(list(self.a), list(self.aaaa), self.a_ttl, self.aaaa_ttl, self.cname,
                      list(self.rotating), self.per_query, self.ttl)


class Query(NamedTuple):
    """One query as the server saw and answered it."""

    name: str  # as asked, lower case, no trailing dot
    qtype: str  # "A", "AAAA", ...
    at: float  # the server's clock
    chain: tuple[str, ...]  # CNAME targets followed, in order
    addresses: tuple[str, ...]  # the A/AAAA addresses answered
    rcode: str  # "NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", or "DROPPED"


@dataclass
class Reply:
    mode: str
    cnames: list[tuple[str, str, int]] = field(default_factory=list)  # (owner, target, ttl)
    owner: str = ""  # the name the addresses belong to
    a: list[str] = field(default_factory=list)
    aaaa: list[str] = field(default_factory=list)
    a_ttl: int = 1
    aaaa_ttl: int = 1
    found: bool = False


class _MonotonicClock:
    """The process's monotonic clock (without importing the pools package)."""

    def monotonic(self) -> float:
        return time.monotonic()


_Change = Callable[[dict[str, _Entry]], None]


class Zone:
    """Names and their records, answered as a DNS server would (see ``dns.py``).

    ``clock``: times delayed updates (default: the process's monotonic clock). ``seed`` /
    ``rng``: the random picks of rotating names."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        seed: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.clock: Clock = clock if clock is not None else _MonotonicClock()
        self._rng = rng if rng is not None else random.Random(seed)
        self._lock = threading.Lock()
        self._records: dict[str, _Entry] = {}
        self._mode = "normal"
        self._name_modes: dict[tuple[str, str | None], str] = {}
        self._delays: dict[str, float] = {}
        self._pending: list[tuple[float, int, str, str, _Change]] = []  # due, seq, name, what
        self._seq = 0
        self._log: list[Query] = []

    def reseed(self, seed: int) -> None:
        """Restart the random picks of rotating names from ``seed``."""
        with self._lock:
            self._rng.seed(seed)


    # -- records --------------------------------------------------------------------------------

    @staticmethod
    def _ips(ips: Iterable[str], version: int) -> list[str]:
        if isinstance(ips, str):
            raise TypeError(f"addresses must be a list of strings, not the string {ips!r}")
        out = []
        for ip in ips:
            parsed = ipaddress.ip_address(ip)
            if parsed.version != version:
                raise ValueError(f"{ip} is not an IPv{version} address")
            out.append(str(parsed))
        return out

    def set_a(self, name: str, ips: Iterable[str], ttl: int = 1) -> None:
        """Replace the A records of ``name`` (its AAAA records stay; a CNAME or rotation on
        the name is replaced). ``ttl`` in whole seconds."""
        checked, ttl = self._ips(ips, 4), _check_ttl(ttl)

        def change(records: dict[str, _Entry]) -> None:
            entry = self._address_entry(records, name)
            entry.a, entry.a_ttl = checked, ttl

        self._change(name, f"A {checked} ttl {ttl}", change)

    def set_aaaa(self, name: str, ips: Iterable[str], ttl: int = 1) -> None:
        """Replace the AAAA records of ``name`` (its A records stay; a CNAME or rotation on
        the name is replaced). ``ttl`` in whole seconds."""
        checked, ttl = self._ips(ips, 6), _check_ttl(ttl)

        def change(records: dict[str, _Entry]) -> None:
            entry = self._address_entry(records, name)
            entry.aaaa, entry.aaaa_ttl = checked, ttl

        self._change(name, f"AAAA {checked} ttl {ttl}", change)

    def set_records(self, name: str, ips: Iterable[str], ttl: int = 1) -> None:
        """Replace every record of ``name``: A for IPv4 literals, AAAA for IPv6."""
        if isinstance(ips, str):
            raise TypeError(f"addresses must be a list of strings, not the string {ips!r}")
        parsed = [ipaddress.ip_address(ip) for ip in ips]
        ttl = _check_ttl(ttl)
        entry = _Entry(
            a=[str(p) for p in parsed if p.version == 4],
            aaaa=[str(p) for p in parsed if p.version == 6],
            a_ttl=ttl,
            aaaa_ttl=ttl,
        )

        def change(records: dict[str, _Entry]) -> None:
            records[_normalize(name)] = entry.copy()

        self._change(name, f"records {[str(p) for p in parsed]} ttl {ttl}", change)

    def set_cname(self, name: str, target: str, ttl: int = 1) -> None:
        """Make ``name`` a CNAME to ``target`` (replacing any records of ``name``). A query for
        ``name`` is answered with the CNAME (this ``ttl``) and then ``target``'s own records
        with their own TTLs; ``target`` may itself be a CNAME or a rotating name. A target the
        server does not know answers NXDOMAIN after the CNAME."""
        target_n, ttl = _normalize(target), _check_ttl(ttl)
        if not target_n or _is_ip(target_n):
            raise ValueError(f"a CNAME target is a host name, not {target!r}")

        def change(records: dict[str, _Entry]) -> None:
            records[_normalize(name)] = _Entry(cname=target_n, ttl=ttl)

        self._change(name, f"CNAME {target_n} ttl {ttl}", change)

    def set_rotating(
        self, name: str, targets: Iterable[str], ttl: int = 1, per_query: int = 1
    ) -> None:
        """Make ``name`` answer ``per_query`` targets picked at random (without repeats) on
        every query, as Aurora's reader and custom endpoints do (``per_query=1``, ``ttl=1``).

        ``targets`` are all host names (the answer is a CNAME to the pick, then the pick's own
        records, so ``per_query`` must be 1) or all IP literals (the answer is the picked
        addresses of the asked family, each with ``ttl``). Raises ``ValueError`` for an empty
        or mixed set, or ``per_query`` outside ``1..len(targets)``."""
        if isinstance(targets, str):
            raise TypeError(f"targets must be a list of strings, not the string {targets!r}")
        picks = list(dict.fromkeys(_normalize(t) for t in targets))
        ttl = _check_ttl(ttl)
        if not picks:
            raise ValueError(f"rotating name {name!r}: no targets")
        ips = [_is_ip(t) for t in picks]
        if any(ips) and not all(ips):
            raise ValueError(f"rotating name {name!r}: targets are all names or all IPs")
        if all(ips):
            picks = [str(ipaddress.ip_address(t)) for t in picks]
        elif per_query != 1:
            raise ValueError("a rotating CNAME answers one target per query (per_query=1)")
        if not 1 <= per_query <= len(picks):
            raise ValueError(f"per_query must be in 1..{len(picks)}, got {per_query}")

        def change(records: dict[str, _Entry]) -> None:
            records[_normalize(name)] = _Entry(rotating=list(picks), per_query=per_query,
                                               ttl=ttl)

        self._change(name, f"rotating {picks} x{per_query} ttl {ttl}", change)

    def remove(self, name: str) -> None:
        """Forget ``name``: it answers NXDOMAIN again (after any delay of its updates)."""

        def change(records: dict[str, _Entry]) -> None:
            records.pop(_normalize(name), None)

        self._change(name, "removed", change)

    def records(self, name: str) -> list[str]:
        """The A then AAAA addresses ``name`` can be answered with now: its own, or those at
        the end of its CNAME chain, or for a rotating name those of all its targets. Pending
        (delayed) changes are not included until they take effect."""
        with self._lock:
            self._apply_due()
            out: list[str] = []
            self._collect(_normalize(name), out, 0)
            return list(dict.fromkeys(out))

    def targets(self, name: str) -> list[str]:
        """The CNAME target of ``name``, or its rotating set; [] for an address name or an
        unknown one."""
        with self._lock:
            self._apply_due()
            entry = self._records.get(_normalize(name))
            if entry is None:
                return []
            return [entry.cname] if entry.cname is not None else list(entry.rotating)

    @staticmethod
    def _address_entry(records: dict[str, _Entry], name: str) -> _Entry:
        key = _normalize(name)
        entry = records.get(key)
        if entry is None or entry.cname is not None or entry.rotating:
            entry = records[key] = _Entry()
        return entry

    def _collect(self, key: str, out: list[str], depth: int) -> None:
        entry = self._records.get(key)
        if entry is None or depth > _MAX_CHAIN:
            return
        if entry.cname is not None:
            self._collect(entry.cname, out, depth + 1)
        elif entry.rotating:
            for target in entry.rotating:
                if _is_ip(target):
                    out.append(target)
                else:
                    self._collect(target, out, depth + 1)
        else:
            out.extend([*entry.a, *entry.aaaa])

    # -- DNS lag --------------------------------------------------------------------------------

    def delay_updates(self, name: str, seconds: float) -> None:
        """From now on, every change to ``name`` takes effect ``seconds`` later on the
        server's clock (0: at once again; changes already pending keep their time). Changes to
        one name always take effect in the order they were made."""
        if seconds < 0:
            raise ValueError(f"a delay is >= 0 seconds, not {seconds!r}")
        with self._lock:
            if seconds:
                self._delays[_normalize(name)] = float(seconds)
            else:
                self._delays.pop(_normalize(name), None)

    def pending(self, name: str | None = None) -> list[tuple[float, str, str]]:
        """Changes not yet in effect: (due on the server's clock, name, what), soonest first."""
        with self._lock:
            self._apply_due()
            key = None if name is None else _normalize(name)
            return [(due, n, what) for due, _seq, n, what, _fn in sorted(self._pending)
                    if key is None or n == key]

    def apply_pending(self, name: str | None = None) -> int:
        """Put pending changes (of ``name``, or all) into effect now. Returns how many."""
        key = None if name is None else _normalize(name)
        with self._lock:
            todo = [p for p in sorted(self._pending) if key is None or p[2] == key]
            self._pending = [p for p in self._pending if p not in todo]
            for _due, _seq, n, what, fn in todo:
                fn(self._records)
                log.debug("dns: %s: %s (applied early)", n, what)
            return len(todo)

    def _change(self, name: str, what: str, fn: _Change) -> None:
        key = _normalize(name)
        if not key:
            raise ValueError("a DNS name must not be empty")
        with self._lock:
            self._apply_due()
            now = self.clock.monotonic()
            due = now + self._delays.get(key, 0.0)
            queued = [p[0] for p in self._pending if p[2] == key]
            if queued:
                due = max(due, *queued)  # never overtake an earlier change to the name
            if due <= now:
                fn(self._records)
                return
            self._seq += 1
            self._pending.append((due, self._seq, key, what, fn))
            log.debug("dns: %s: %s in %.1f s", key, what, due - now)

    def _apply_due(self) -> None:
        """Apply the changes whose time has come (under the lock)."""
        if not self._pending:
            return
        now = self.clock.monotonic()
        due = sorted(p for p in self._pending if p[0] <= now)
        if not due:
            return
        self._pending = [p for p in self._pending if p[0] > now]
        for _due, _seq, n, what, fn in due:
            fn(self._records)
            log.debug("dns: %s: %s (delayed change took effect)", n, what)

    # -- failure modes --------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self.set_mode(mode)

    def set_mode(self, mode: str, name: str | None = None, qtype: str | None = None) -> None:
        """Set the mode of every query, or with ``name`` the mode of that name only (also when
        it is reached through a CNAME), or with ``name`` and ``qtype`` ("AAAA") of that name's
        queries of that type only."""
        _check_mode(mode)
        if qtype is not None and name is None:
            raise ValueError("a per-type mode needs a name")
        with self._lock:
            if name is None:
                self._mode = mode
            else:
                self._name_modes[(_normalize(name), qtype and qtype.upper())] = mode

    def clear_mode(self, name: str | None = None, qtype: str | None = None) -> None:
        """Drop the override of ``name`` (and ``qtype``); without a name, back to "normal" with
        no overrides."""
        with self._lock:
            if name is None:
                self._mode = "normal"
                self._name_modes.clear()
            else:
                self._name_modes.pop((_normalize(name), qtype and qtype.upper()), None)

    # -- queries --------------------------------------------------------------------------------

    @property
    def queries(self) -> list[tuple[str, str]]:
        """(qname without trailing dot, lower case; qtype name) of every query received."""
        with self._lock:
            return [(q.name, q.qtype) for q in self._log]

    @property
    def query_log(self) -> list[Query]:
        """Every query received, with what it was answered (see :class:`Query`)."""
        with self._lock:
            return list(self._log)

    def clear_queries(self) -> None:
        with self._lock:
            self._log.clear()

    def _name_mode(self, key: str, qtype: str) -> str | None:
        return self._name_modes.get((key, qtype), self._name_modes.get((key, None)))

    def _answer(self, qname: str, qtype: str) -> Reply:
        """Record the query and work out its answer: the mode that applies, the CNAMEs followed
        and the addresses at the end (a snapshot, taken under the lock)."""
        with self._lock:
            self._apply_due()
            now = self.clock.monotonic()
            mode = self._name_mode(qname, qtype) or self._mode
            reply = Reply(mode=mode)
            if mode == "normal":
                self._follow(qname, qtype, reply)
            rcode = ("DROPPED" if reply.mode == "silent" else
                     reply.mode.upper() if reply.mode != "normal" else
                     "NOERROR" if reply.found else "NXDOMAIN")
            addresses = tuple(
                (reply.a if qtype in ("A", "ANY") else [])
                + (reply.aaaa if qtype in ("AAAA", "ANY") else [])
            ) if reply.mode == "normal" else ()
            chain = tuple(t for _o, t, _ttl in reply.cnames)
            self._log.append(Query(qname, qtype, now, chain, addresses, rcode))
            return reply

    def _follow(self, key: str, qtype: str, reply: Reply) -> None:
        for _ in range(_MAX_CHAIN + 1):
            entry = self._records.get(key)
            if entry is None:
                return  # NXDOMAIN (after the CNAMEs so far)
            target = entry.cname
            if entry.rotating:
                picks = self._rng.sample(entry.rotating, entry.per_query)
                if _is_ip(picks[0]):
                    reply.found, reply.owner = True, key
                    reply.a = [ip for ip in picks if ":" not in ip]
                    reply.aaaa = [ip for ip in picks if ":" in ip]
                    reply.a_ttl = reply.aaaa_ttl = entry.ttl
                    return
                target = picks[0]
            if target is None:
                reply.found, reply.owner = True, key
                reply.a, reply.aaaa = list(entry.a), list(entry.aaaa)
                reply.a_ttl, reply.aaaa_ttl = entry.a_ttl, entry.aaaa_ttl
                return
            reply.cnames.append((key, target, entry.ttl))
            key = target
            mode = self._name_mode(key, qtype)
            if mode is not None and mode != "normal":
                reply.mode = mode  # the chain reaches a failing name
                return
        reply.mode = "servfail"  # a CNAME loop

