"""A pool's counters, its stats snapshot, and the text of its errors.

Invariants:
- Every counter of :class:`Counters` changes only under the pool's lock (``Bag.lock``), so a
  snapshot taken under it is consistent; nothing here takes a lock itself.
- Error text and stats never carry a password: they name the pool, its counts, addresses
  (``host/ip:port`` labels) and the first line of the last connect error, which the connector
  has already redacted.
- A timeout error diagnoses itself (HikariCP's ``createTimeoutException``): time waited, the
  pool's size/idle/in-use/waiting counts, the last connect error as its cause.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .addresses import dns_source
from .entry import IDLE, IN_USE, RETURNING, Entry
from .errors import PoolClosed, PoolTimeout, PoolTooManyWaiters

if TYPE_CHECKING:
    from .bag import Bag
    from .connector import Connector

__all__ = [
    "WAIT_BUCKETS_S",
    "CREATE_BUCKETS_S",
    "Counters",
    "address_stats",
    "books_stats_locked",
    "dns_stats",
    "pool_stats",
    "closed_error",
    "summarise_error",
    "timeout_error",
]

# Upper bounds, in seconds, of the checkout-wait histogram (Prometheus style buckets).
WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Upper bounds, in seconds, of the connect-time histogram (a loopback connect takes ~2-5 ms).
CREATE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0)


class Counters:
    """What a pool counts over its life (all changed under the pool's lock)."""

    __slots__ = (
        "opened", "closed_by", "timeouts", "connect_errors", "waits", "wait_total_s",
        "wait_max_s", "wait_counts", "rollbacks", "leaks", "last_connect_error",
        "create_counts", "create_total_s",
    )

    def __init__(self) -> None:
        self.opened = 0
        self.closed_by: dict[str, int] = {}
        self.timeouts = 0
        self.connect_errors = 0
        self.waits = 0
        self.wait_total_s = 0.0
        self.wait_max_s = 0.0
        self.wait_counts = [0] * (len(WAIT_BUCKETS_S) + 1)  # per bucket; the last: beyond
        self.rollbacks = 0
        self.leaks = 0
        self.last_connect_error: BaseException | None = None
        self.create_counts = [0] * (len(CREATE_BUCKETS_S) + 1)  # per bucket; the last: beyond
        self.create_total_s = 0.0

    def created(self, created_s: float) -> None:
        """A connection was opened in ``created_s`` seconds (counted with ``opened``)."""
        self.create_counts[bisect.bisect_left(CREATE_BUCKETS_S, created_s)] += 1
        self.create_total_s += created_s

    def create_histogram(self) -> dict[float, int]:
        """Connect times as cumulative counts per upper bound in seconds."""
        running = 0
        out: dict[float, int] = {}
        for bound, n in zip(CREATE_BUCKETS_S, self.create_counts, strict=False):
            running += n
            out[bound] = running
        out[float("inf")] = running + self.create_counts[-1]
        return out

    def closed(self, reason: str) -> None:
        self.closed_by[reason] = self.closed_by.get(reason, 0) + 1

    def waited(self, waited_s: float) -> None:
        self.waits += 1
        self.wait_counts[bisect.bisect_left(WAIT_BUCKETS_S, waited_s)] += 1
        self.wait_total_s += waited_s
        if waited_s > self.wait_max_s:
            self.wait_max_s = waited_s

    def wait_histogram(self, checkouts: int) -> dict[float, int]:
        """Checkout waits as cumulative counts per upper bound in seconds (Prometheus style):
        checkouts that did not wait count as 0 s."""
        running = max(0, checkouts - self.waits)
        out: dict[float, int] = {}
        for bound, n in zip(WAIT_BUCKETS_S, self.wait_counts, strict=False):
            running += n
            out[bound] = running
        out[float("inf")] = max(checkouts, running + self.wait_counts[-1])
        return out

    def snapshot(self, checkouts: int) -> dict[str, Any]:
        """The counters' part of ``ConnectionPool.stats()``."""
        err = self.last_connect_error
        return {
            "connections_opened": self.opened,
            "connections_closed": sum(self.closed_by.values()),
            "closed_by_reason": dict(self.closed_by),
            "checkouts": checkouts,
            "checkout_timeouts": self.timeouts,
            "connect_errors": self.connect_errors,
            "last_connect_error": summarise_error(err) if err else None,
            "waits": self.waits,
            "wait_total_s": self.wait_total_s,
            "wait_max_s": self.wait_max_s,
            "wait_histogram": self.wait_histogram(checkouts),
            "rollbacks": self.rollbacks,
            "leaks_detected": self.leaks,
            "create_histogram": self.create_histogram(),
            "create_total_s": self.create_total_s,
        }


def timeout_error(
    name: str,
    counts: dict[str, int],
    maxconn: int | float,
    *,
    waited_s: float,
    timeout_s: float,
    max_waiting: int = 0,
    too_many: bool = False,
    last_connect_error: BaseException | None = None,
) -> PoolTimeout:
    """The error of a checkout that got nothing: :class:`PoolTooManyWaiters` past
    ``max_waiting``, else :class:`PoolTimeout`; the last connect error is its cause."""
    figures = (
        f"size={counts['size']}/{maxconn} idle={counts['idle']} "
        f"in_use={counts['in_use']} waiting={counts['waiting']}"
    )
    if too_many:
        msg = f"pool {name!r}: too many callers waiting (max_waiting={max_waiting}); {figures}"
        err: PoolTimeout = PoolTooManyWaiters(msg, pool=name, waited_s=0.0, counts=counts)
    elif timeout_s <= 0:
        msg = f"pool {name!r}: no connection available at once (timeout=0); {figures}"
        err = PoolTimeout(msg, pool=name, waited_s=0.0, counts=counts)
    else:
        msg = (
            f"pool {name!r}: no connection available after waiting {waited_s:.3f} s "
            f"(timeout {timeout_s:g} s); {figures}"
        )
        err = PoolTimeout(msg, pool=name, waited_s=waited_s, counts=counts)
    if last_connect_error is not None:
        err.__cause__ = last_connect_error
        err.args = (f"{msg}; last connect error: {summarise_error(last_connect_error)}",)
    return err


def closed_error(name: str) -> PoolClosed:
    return PoolClosed(f"pool {name!r} is closed", pool=name)


def summarise_error(exc: BaseException) -> str:
    """``Type: first line of the message`` (the connector's errors are already redacted)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def address_stats(
    snapshot: dict[str, dict[str, Any]], entries: Iterable[Entry]
) -> dict[str, dict[str, Any]]:
    """The address book's ``snapshot`` with each address's idle and in-use connections (call
    under the pool's lock, with the books' entries)."""
    for a in snapshot.values():
        a["in_use"] = 0
        a["idle"] = 0
    for e in entries:
        row = snapshot.get(e.address)
        if row is None:
            continue
        if e.state == IDLE:
            row["idle"] += 1
        elif e.state in (IN_USE, RETURNING):
            row["in_use"] += 1
    return snapshot


def dns_stats(connector: Connector, now: float) -> dict[str, dict[str, Any]]:
    """The pool's DNS names (its hosts that need a lookup): the latest answer (addresses,
    the canonical name at the end of its CNAME chain, TTL, staleness, queries, failures, per
    family too, sightings) and its members (the addresses in the book from it) with the
    membership window in force (0 while the topology gives the members)."""
    ports = {t.host.lower(): t.port for t in connector.targets if t.needs_dns}
    if not ports or connector.resolver_or_none is None:
        return {}
    sources = connector.book.sources()
    window = connector.membership_window if connector.members_from == "dns" else 0.0
    out: dict[str, dict[str, Any]] = {}
    for name, ans in connector.resolver_or_none.answers().items():
        if name not in ports:
            continue
        row = ans.stats(now)
        row["members"] = sources.get(dns_source(name, ports[name]), [])
        row["membership_window_s"] = window
        out[name] = row
    return out


def books_stats_locked(bag: Bag) -> dict[str, Any]:
    """The books' part of ``ConnectionPool.stats()``: sizes and counters (under the lock)."""
    out: dict[str, Any] = {
        "name": bag.name,
        "minconn": bag.minconn,
        "maxconn": bag.maxconn,
        "size": bag.size,
        "idle": len(bag.idle),
        "in_use": len(bag.out),
        "opening": bag.opening,
        "waiting": len(bag.waiters),
        "closed": bag.closed,
    }
    out.update(bag.counters.snapshot(bag.checkouts_locked()))
    return out


def pool_stats(bag: Bag, connector: Connector, now: Callable[[], float],
               **rows: Any) -> dict[str, Any]:
    """``ConnectionPool.stats()``: one snapshot under the bag's lock (garbage-collected
    checkouts counted first): the books, placement, ``rows`` (the pool's own: role,
    recycle...), each address's connections, the DNS names, and discovery."""
    with bag.lock:
        if bag.orphans:
            bag.collect_orphans_locked()
        t = now()
        out = books_stats_locked(bag)
        out["placement"] = connector.placement
        out.update(rows)
        out["addresses"] = address_stats(connector.book.snapshot(t), bag.entries.values())
        out["dns"] = dns_stats(connector, t)
        out.update(connector.discovery_stats())
    return out
