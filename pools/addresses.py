"""The addresses one pool connects to: where its connections are, which addresses are banned,
and the order in which a new connection tries them.

An address is one ``ip:port`` (or a Unix socket directory) reached under one host name. Its
connection count drives placement: ``least_connections`` (the default) tries the address with
the fewest connections of this pool first, ties at random; ``random`` shuffles. An address that
refuses or times out is banned for a backoff that doubles on each failure in a row (capped); a
banned address is tried only after every healthy one, least recently failed first, so a pool
whose addresses are all banned still tries rather than failing without trying.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Address", "AddressBook", "PLACEMENTS", "address_label"]

PLACEMENTS = ("least_connections", "random")


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

    @property
    def load(self) -> int:
        return self.conns + self.opening


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
        self._by_host: dict[tuple[str, str], list[str]] = {}

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

    def sync(self, host: str, port: str, ips: Iterable[str | None]) -> tuple[list[str], list[str]]:
        """Make ``ips`` the active addresses of ``host:port``. Returns (added, removed) labels."""
        labels = []
        added: list[str] = []
        with self._lock:
            for ip in ips:
                label = address_label(ip, host, port)
                labels.append(label)
                a = self._by_label.get(label)
                if a is None:
                    self._by_label[label] = Address(label, host, ip, port)
                    added.append(label)
                elif not a.active:
                    a.active = True
                    added.append(label)
            old = self._by_host.get((host, port), [])
            # an address another name still lists stays (two names, one server)
            elsewhere = {lb for key, lbs in self._by_host.items() if key != (host, port)
                         for lb in lbs}
            removed = [lb for lb in old if lb not in labels and lb not in elsewhere]
            for lb in old:
                a = self._by_label.get(lb)
                if lb not in labels and lb in elsewhere and a is not None and a.host == host:
                    # reached under another name from now on (host= for TLS and pg_hba)
                    a.host = next(k[0] for k, lbs in self._by_host.items()
                                  if k != (host, port) and lb in lbs)
            for lb in removed:
                a = self._by_label[lb]
                a.active = False
                if a.load == 0:
                    del self._by_label[lb]
            if labels:
                self._by_host[(host, port)] = labels
            else:
                self._by_host.pop((host, port), None)
        return added, removed

    def get(self, label: str) -> Address | None:
        with self._lock:
            return self._by_label.get(label)

    # -- placement --------------------------------------------------------------------------

    def order(self, now: float, prefer: str | None = None) -> list[Address]:
        """Active addresses in the order a new connection tries them."""
        with self._lock:
            active = [a for a in self._by_label.values() if a.active]
            healthy = [a for a in active if a.banned_until <= now]
            banned = sorted(
                (a for a in active if a.banned_until > now), key=lambda a: a.last_failure_at
            )
            self._rng.shuffle(healthy)  # ties at random
            if self.placement == "least_connections":
                healthy.sort(key=lambda a: a.load)  # stable: shuffled within equal loads
            if prefer is not None:
                healthy.sort(key=lambda a: a.label != prefer)
            return healthy + banned

    def balance(
        self, now: float, discount: Mapping[str, int] | None = None
    ) -> tuple[str, str, int] | None:
        """(most loaded, least loaded, difference) over healthy active addresses, when the
        spread is uneven by more than one; else None. ``discount`` takes connections already on
        their way out off their address's load."""
        discount = discount or {}
        with self._lock:
            healthy = [a for a in self._by_label.values() if a.active and a.banned_until <= now]
            if len(healthy) < 2:
                return None
            self._rng.shuffle(healthy)
            loads = {a.label: a.load - discount.get(a.label, 0) for a in healthy}
            hi = max(loads, key=loads.__getitem__)
            lo = min(loads, key=loads.__getitem__)
            diff = loads[hi] - loads[lo]
            return (hi, lo, diff) if diff > 1 else None

    # -- bookkeeping ------------------------------------------------------------------------

    def reserve(self, a: Address) -> None:
        with self._lock:
            a.opening += 1

    def opened(self, a: Address) -> None:
        with self._lock:
            a.opening -= 1
            a.conns += 1
            a.connects += 1
            a.failures = 0
            a.banned_until = 0.0
            a.ban_reason = None

    def failed(self, a: Address, now: float, reason: str, error: str, *, ban: bool) -> float:
        """Record a failed connect. Returns the ban in seconds (0: not banned)."""
        with self._lock:
            a.opening -= 1
            a.connect_failures += 1
            a.last_failure_at = now
            a.last_error = error
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
            return all(a.banned_until > now for a in active)

    def unreserve(self, a: Address) -> None:
        """A connect given up before it was attempted."""
        with self._lock:
            a.opening -= 1
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
                }
                for a in self._by_label.values()
            }

    def labels(self, active_only: bool = True) -> list[str]:
        with self._lock:
            return [lb for lb, a in self._by_label.items() if a.active or not active_only]
