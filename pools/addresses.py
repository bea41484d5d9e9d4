"""The addresses one pool connects to: where its connections are, which addresses are banned,
and the order in which a new connection tries them.

An address is one ``ip:port`` (or a Unix socket directory) reached under one host name. Its
connection count drives placement: ``least_connections`` (the default) tries the address with
the fewest connections of this pool first, ties at random; ``random`` shuffles. An address that
refuses or times out is banned for a backoff that doubles on each failure in a row (capped); a
banned address is tried only after every healthy one, least recently failed first, so a pool
whose addresses are all banned still tries rather than failing without trying.

A refusal that says something about the server or the settings rather than the network
(capacity: the server is out of connection slots; auth: the credentials were refused) puts the
address on *hold* instead: a doubling backoff shared by every caller of the pool, during which
no login is attempted there and callers get the remembered error at once. When the period is
over, exactly one caller probes (its attempt is the only login); its failure doubles the
period, its success clears the hold. Hammering a full server or a wrong password with one login
per checkout is what trips lockout policies and intrusion alarms (PostgreSQL logs one FATAL
line per refused login).

Which addresses are the pool's **members** (the active ones) is said by named sources: each
source (one per DNS target, ``dns:<host>:<port>``; the cluster's topology; a user's list) sets
its whole list with :meth:`AddressBook.set_members`, and an address is a member while any source
lists it. An address no source lists any more becomes inactive: no new connections; its open
ones are retired by the pool (the labels come back as "removed").

For DNS, :meth:`AddressBook.observe` turns a name's answers into its members: every address
an answer named within ``window`` seconds (a name that rotates, like Aurora's reader endpoint
answering ONE instance per query, is the union of its answers, not the latest one), except one
that has failed (connect refused, timed out, wrong role) since it was last named. So a rotation
never removes an address by itself; an address leaves when DNS stopped naming it for the
window, or when its connections fail and DNS no longer names it. ``window=0`` follows each
answer exactly.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "Address",
    "AddressBook",
    "HOLD_KINDS",
    "Hold",
    "Member",
    "PLACEMENTS",
    "DEFAULT_MEMBERSHIP_WINDOW_S",
    "address_label",
    "check_membership_window",
    "dns_source",
]

PLACEMENTS = ("least_connections", "random")
# failure kinds (see connector.classify) that put an address on hold rather than banning it
HOLD_KINDS = frozenset({"capacity", "auth"})

# How long an address of a rotating DNS name stays a member after an answer last named it
# (``dns_membership_window``). Sized for the worst case the pool expects: a 15-instance
# endpoint answering ONE instance per query, sampled once a second (its 1 s TTL; the supervisor
# samples at 0.8 of it, so this is conservative). A given member is missed by one sample with
# p = 14/15, by all samples of a 300 s window with p = (14/15)**300 = 1.0e-9. Over an hour
# about 3600 such windows start (one after each sighting, 15 members sighted 240 times each),
# so a member is dropped by chance about 3.7e-6 times an hour: once in ~30 years. (180 s
# would drop one every ~3 days, 120 s about once an hour.) A dropped member costs only its
# connections being retired; it comes back at its next sighting.
DEFAULT_MEMBERSHIP_WINDOW_S = 300.0


def check_membership_window(window: float) -> float:
    """``dns_membership_window``: seconds in 0..3600 (0 follows each DNS answer exactly).
    Raises ``ValueError``."""
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not (
            0 <= window <= 3600):
        raise ValueError(f"dns_membership_window must be seconds in 0..3600, got {window!r}")
    return float(window)


class Member(NamedTuple):
    """One member address as a source gives it: ``host`` (libpq's ``host=``: TLS, pg_hba),
    ``ip`` (pinned with ``hostaddr=``; None for a socket directory or libpq's default) and
    ``port``."""

    host: str
    ip: str | None
    port: str


def dns_source(host: str, port: str) -> str:
    """The source name of the members a DNS target gives: ``dns:<host>:<port>``."""
    return f"dns:{host.lower()}:{port}"


def address_label(ip: str | None, host: str, port: str) -> str:
    """``127.0.0.12:5432``, ``[::1]:5432``, or the socket directory / host for unpinned ones."""
    where = ip if ip is not None else (host or "default")
    if ":" in where and not where.startswith("/"):
        where = f"[{where}]"
    return f"{where}:{port}"


@dataclass
class Address:
    label: str
    host: str  # the name libpq sees as host= (TLS, pg_hba); may be empty (libpq's default)
    ip: str | None  # pinned with hostaddr=; None for sockets and the default
    port: str
    active: bool = True  # in the latest answer for its host
    conns: int = 0  # open connections of this pool
    opening: int = 0  # connects under way
    failures: int = 0  # failures in a row
    connect_failures: int = 0  # all failures
    connects: int = 0  # successful connects
    banned_until: float = 0.0
    last_failure_at: float = -math.inf
    last_error: str | None = None
    ban_reason: str | None = None
    hold_kind: str | None = None  # "capacity" or "auth" while on hold (see HOLD_KINDS)
    hold_until: float = 0.0
    hold_s: float = 0.0  # the current period (doubling)
    hold_error: str | None = None  # the remembered error, raised to callers meanwhile
    probing: bool = False  # one caller is trying the held address right now
    lag_s: float | None = None  # replication lag last measured (None: not measured)
    lagging: bool = False  # over the pool's max_replica_lag: no new connections while so

    @property
    def load(self) -> int:
        return self.conns + self.opening


@dataclass(frozen=True)
class Hold:
    """An address on hold: what was refused, the server's words, and when it is tried again
    (``retry_in_s`` from now; 0: a probe is under way)."""

    label: str
    kind: str
    error: str
    retry_in_s: float


class AddressBook:
    """Per-address state of one pool. Its own small lock; it never calls back into the pool."""

    def __init__(
        self,
        *,
        placement: str = "least_connections",
        ban_initial: float = 1.0,
        ban_max: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if ban_initial < 0 or ban_max < ban_initial:
            raise ValueError("address bans: need 0 <= ban_initial <= ban_max")
        self.placement = placement
        self.ban_initial = ban_initial
        self.ban_max = ban_max
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._by_label: dict[str, Address] = {}
        self._sources: dict[str, dict[str, str]] = {}  # source -> {label: host it gives}

    def set_placement(self, placement: str) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.placement = placement

    def set_bans(self, ban_initial: float, ban_max: float) -> None:
        if ban_initial < 0 or ban_max < ban_initial:
            raise ValueError("address bans: need 0 <= ban_initial <= ban_max")
        self.ban_initial, self.ban_max = ban_initial, ban_max

    def after_fork(self) -> None:
        """In a forked child: no connections are ours; health is kept."""
        self._lock = threading.Lock()
        for a in self._by_label.values():
            a.conns = a.opening = 0
        for a in [a for a in self._by_label.values() if not a.active]:
            del self._by_label[a.label]

    # -- the set of addresses ---------------------------------------------------------------

    def set_members(
        self, source: str, members: Iterable[Member | tuple[str, str | None, str]]
    ) -> tuple[list[str], list[str]]:
        """Make ``members`` (``Member(host, ip, port)`` or such tuples) everything ``source``
        lists: an empty list withdraws the source. Returns (added, removed) labels: added are
        new members of the pool, removed are addresses no source lists any more (the pool
        retires their connections). An address two sources list (two names, one server) keeps
        the host it was first reached under, and moves to the other's when its source drops
        it (``host=`` for TLS and pg_hba)."""
        added: list[str] = []
        with self._lock:
            listing: dict[str, str] = {}  # label -> host
            for host, ip, port in members:
                label = address_label(ip, host, str(port))
                if label in listing:
                    continue
                listing[label] = host
                a = self._by_label.get(label)
                if a is None:
                    self._by_label[label] = Address(label, host, ip, str(port))
                    added.append(label)
                elif not a.active:
                    a.active = True
                    a.host = host
                    added.append(label)
            old = self._sources.get(source, {})
            if listing:
                self._sources[source] = listing
            else:
                self._sources.pop(source, None)
            elsewhere: dict[str, str] = {}
            for src, lbs in self._sources.items():
                if src != source:
                    for lb, host in lbs.items():
                        elsewhere.setdefault(lb, host)
            removed = [lb for lb in old if lb not in listing and lb not in elsewhere]
            for lb, host in old.items():
                a = self._by_label.get(lb)
                if lb not in listing and lb in elsewhere and a is not None and a.host == host:
                    a.host = elsewhere[lb]  # reached under the other name from now on
            for lb in removed:
                a = self._by_label[lb]
                a.active = False
                if a.load == 0:
                    del self._by_label[lb]
        return added, removed

    def sources(self) -> dict[str, list[str]]:
        """{source: the labels it lists}."""
        with self._lock:
            return {src: list(labels) for src, labels in self._sources.items()}

    def listed(self, source: str) -> list[str]:
        """The labels ``source`` lists."""
        with self._lock:
            return list(self._sources.get(source, {}))

    def sync(self, host: str, port: str, ips: Iterable[str | None]) -> tuple[list[str], list[str]]:
        """Make ``ips`` the members of ``host:port``'s DNS source (following this answer
        exactly). Returns (added, removed) labels."""
        return self.set_members(dns_source(host, port), [Member(host, ip, port) for ip in ips])

    def observe(
        self,
        host: str,
        port: str,
        answer: Iterable[str],
        seen: Mapping[str, float],
        now: float,
        window: float,
    ) -> tuple[list[str], list[str]]:
        """Set the members of ``host:port``'s DNS source from its answers: the ``answer``
        (the latest one's addresses), plus every address in ``seen`` ({ip: when an answer last
        named it}, on the pool's clock) named less than ``window`` seconds before ``now`` and
        not failed since. Returns (added, removed) labels, as :meth:`set_members`."""
        latest = list(dict.fromkeys(answer))
        members = list(latest)
        with self._lock:
            for ip, at in seen.items():
                if ip in latest or now - at >= window:
                    continue
                a = self._by_label.get(address_label(ip, host, port))
                if a is not None and a.failures > 0 and a.last_failure_at >= at:
                    continue  # failing since DNS last named it: it leaves
                members.append(ip)
        return self.set_members(dns_source(host, port), [Member(host, ip, port) for ip in members])

    def get(self, label: str) -> Address | None:
        with self._lock:
            return self._by_label.get(label)

    # -- placement --------------------------------------------------------------------------

    def order(self, now: float, prefer: str | None = None) -> list[Address]:
        """Active addresses in the order a new connection tries them."""
        with self._lock:
            active = [a for a in self._by_label.values() if a.active]
            healthy = [a for a in active
                       if a.banned_until <= now and a.hold_until <= now and not a.lagging]
            # replicas over the lag limit: only when no other answers, least lagging first
            lagging = sorted((a for a in active
                              if a.banned_until <= now and a.hold_until <= now and a.lagging),
                             key=lambda a: a.lag_s or 0.0)
            banned = sorted(
                (a for a in active if a.banned_until > now or a.hold_until > now),
                key=lambda a: a.last_failure_at,
            )
            self._rng.shuffle(healthy)  # ties at random
            if self.placement == "least_connections":
                healthy.sort(key=lambda a: a.load)  # stable: shuffled within equal loads
            if prefer is not None:
                healthy.sort(key=lambda a: a.label != prefer)
            return healthy + lagging + banned

    def balance(
        self, now: float, discount: Mapping[str, int] | None = None
    ) -> tuple[str, str, int] | None:
        """(most loaded, least loaded, difference) over healthy active addresses, when the
        spread is uneven by more than one; else None. ``discount`` takes connections already on
        their way out off their address's load. An address whose last connect failed (its ban
        over, no success since) is not healthy here: new connections still try it in
        placement order, but nothing is moved toward it until one succeeds (a member that
        refuses would otherwise draw a move at the end of every ban)."""
        discount = discount or {}
        with self._lock:
            healthy = [a for a in self._by_label.values()
                       if a.active and a.banned_until <= now and a.failures == 0
                       and not a.lagging]
            if len(healthy) < 2:
                return None
            self._rng.shuffle(healthy)
            loads = {a.label: a.load - discount.get(a.label, 0) for a in healthy}
            hi = max(loads, key=loads.__getitem__)
            lo = min(loads, key=loads.__getitem__)
            diff = loads[hi] - loads[lo]
            return (hi, lo, diff) if diff > 1 else None

    # -- bookkeeping ------------------------------------------------------------------------

    def reserve(self, a: Address, now: float | None = None) -> Hold | None:
        """Count a connect about to start on ``a``. With ``now``, an address on hold is not
        reserved: the hold is returned instead (no login may be tried), unless its period is
        over and no probe runs, in which case this connect becomes the probe."""
        with self._lock:
            if now is not None and a.hold_kind is not None:
                if a.probing or now < a.hold_until:
                    return Hold(a.label, a.hold_kind, a.hold_error or a.hold_kind,
                                0.0 if a.probing else a.hold_until - now)
                a.probing = True
            a.opening += 1
            return None

    def opened(self, a: Address) -> None:
        with self._lock:
            a.opening -= 1
            a.conns += 1
            a.connects += 1
            a.failures = 0
            a.banned_until = 0.0
            a.ban_reason = None
            self._clear_hold(a)

    @staticmethod
    def _clear_hold(a: Address) -> None:
        a.hold_kind = a.hold_error = None
        a.hold_until = a.hold_s = 0.0
        a.probing = False

    def clear_holds(self, kind: str | None = None) -> int:
        """Forget the holds (of ``kind``, or all): new credentials clear the auth holds.
        Returns how many were cleared."""
        with self._lock:
            held = [a for a in self._by_label.values()
                    if a.hold_kind is not None and kind in (None, a.hold_kind)]
            for a in held:
                self._clear_hold(a)
            return len(held)

    def failed(self, a: Address, now: float, reason: str, error: str, *, ban: bool) -> float:
        """Record a failed connect. Returns the ban (or, for a kind in ``HOLD_KINDS``, the
        hold) in seconds when one starts now; 0 when none starts (not banned, or a ban or hold
        already running: warn once per period)."""
        with self._lock:
            a.opening -= 1
            a.connect_failures += 1
            a.last_failure_at = now
            a.last_error = error
            probe, a.probing = a.probing, False
            if reason in HOLD_KINDS:
                return self._hold_locked(a, now, reason, error, probe)
            if not ban:
                return 0.0
            if a.banned_until > now:
                # tried while banned (every address was): the ban stands, it does not grow;
                # a ban grows once per period, however many callers failed at once
                self._forget_if_unused(a)
                return 0.0
            a.failures += 1
            ban_s = min(self.ban_max, self.ban_initial * 2.0 ** (a.failures - 1))
            ban_s *= self._rng.uniform(0.9, 1.1)
            a.banned_until = now + ban_s
            a.ban_reason = reason
            self._forget_if_unused(a)
            return ban_s

    def _hold_locked(self, a: Address, now: float, kind: str, error: str, probe: bool) -> float:
        if a.hold_kind == kind and not probe and now < a.hold_until:
            return 0.0  # one of a burst that started before the hold: the period stands
        if a.hold_kind == kind:
            period = min(self.ban_max, max(self.ban_initial, a.hold_s * 2))
        else:
            period = self.ban_initial
        a.hold_kind, a.hold_error, a.hold_s = kind, error, period
        a.hold_until = now + period * self._rng.uniform(0.9, 1.1)
        self._forget_if_unused(a)
        return period

    def mark(self, label: str, now: float, reason: str) -> bool:
        """Ban an address for something learned outside a connect (a demoted writer). Returns
        whether it was not already banned for that reason."""
        with self._lock:
            a = self._by_label.get(label)
            if a is None:
                return False
            first = not (a.banned_until > now and a.ban_reason == reason)
            if first:
                a.failures += 1
                ban_s = min(self.ban_max, self.ban_initial * 2.0 ** (a.failures - 1))
                a.banned_until = now + ban_s * self._rng.uniform(0.9, 1.1)
                a.ban_reason = reason
                a.last_failure_at = now
                a.last_error = reason
            return first

    def all_banned(self, now: float) -> bool:
        """True when no active address can be tried right now (or none is known)."""
        with self._lock:
            active = [a for a in self._by_label.values() if a.active]
            return all(a.banned_until > now or a.hold_until > now for a in active)

    def held(self, now: float) -> list[Hold]:
        """The active addresses on hold right now."""
        with self._lock:
            return [Hold(a.label, a.hold_kind, a.hold_error or a.hold_kind,
                         max(0.0, a.hold_until - now))
                    for a in self._by_label.values()
                    if a.active and a.hold_kind is not None and a.hold_until > now]

    def set_lag(self, label: str, lag_s: float | None, lagging: bool) -> bool:
        """Record an address's measured replication lag; returns whether it just became
        lagging."""
        with self._lock:
            a = self._by_label.get(label)
            if a is None:
                return False
            became = lagging and not a.lagging
            a.lag_s, a.lagging = lag_s, lagging
            return became

    def unreserve(self, a: Address) -> None:
        """A connect given up before it was attempted (or interrupted)."""
        with self._lock:
            a.opening -= 1
            a.probing = False
            self._forget_if_unused(a)

    def closed(self, label: str) -> None:
        with self._lock:
            a = self._by_label.get(label)
            if a is None:
                return
            a.conns -= 1
            self._forget_if_unused(a)

    def _forget_if_unused(self, a: Address) -> None:
        if not a.active and a.load == 0:
            self._by_label.pop(a.label, None)

    # -- reading ----------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                a.label: {
                    "host": a.host,
                    "active": a.active,
                    "connections": a.conns,
                    "opening": a.opening,
                    "connects": a.connects,
                    "connect_failures": a.connect_failures,
                    "banned": a.banned_until > now,
                    "banned_until": a.banned_until if a.banned_until > now else None,
                    "banned_for_s": max(0.0, a.banned_until - now),
                    "ban_reason": a.ban_reason if a.banned_until > now else None,
                    "last_error": a.last_error,
                    "hold": a.hold_kind,
                    "hold_for_s": max(0.0, a.hold_until - now) if a.hold_kind else 0.0,
                    "replica_lag_s": a.lag_s,
                    "lagging": a.lagging,
                }
                for a in self._by_label.values()
            }

    def labels(self, active_only: bool = True) -> list[str]:
        with self._lock:
            return [lb for lb, a in self._by_label.items() if a.active or not active_only]
