"""Placement over addresses: retiring the connections of addresses that left, and rebalancing.

Invariants:
- A retired address's idle connections close now; its checked-out ones are doomed (soft
  expiry, HikariCP's way): they close when they come back and are never handed out again, even
  by a checkout racing the doom (``doom`` sets ``fresh_until`` to -inf before anything else).
- Rebalancing makes before it breaks: a connection opens on the least loaded healthy address
  before one on the most loaded closes (an idle one is reserved first, out of the idle queue,
  so no checkout takes it meanwhile; a busy one is doomed). At most ``rebalance_fraction`` of
  the pool moves per ``rebalance_interval``; a failed open puts the reserved one back.
- Only maintenance decides a move (on the supervisor), one at a time; the move's connect and
  close run on an I/O worker. Retiring may come from any thread.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable

import psycopg2.extensions as ext

from .bag import Bag
from .connector import Connector
from .entry import IDLE, IN_USE, RETURNING, Entry
from .errors import PoolError
from .opening import Opener

__all__ = ["Placement", "doom"]

logger = logging.getLogger(__name__)

Connection = ext.connection


def doom(e: Entry, reason: str) -> None:
    """Soft expiry: the connection closes when it comes back (and is never handed out
    again, even by a checkout racing this)."""
    e.doom_reason = reason
    e.expires_at = -math.inf
    e.fresh_until = -math.inf


class Placement:
    """Where a pool's connections sit, over the connector's addresses.

    :param rebalance_fraction: the share of the pool (0, 1] that may move per interval; live.
    :param rebalance_interval: seconds of one rebalancing tick; live.
    """

    def __init__(
        self,
        bag: Bag,
        opener: Opener,
        connector: Connector,
        *,
        wake: Callable[[], None],
        submit: Callable[[str, Callable[[], None]], None],
        rebalance_fraction: float,
        rebalance_interval: float,
    ) -> None:
        self.bag = bag
        self.opener = opener
        self.connector = connector
        self.wake = wake
        self.submit = submit  # blocking work, off the supervisor's thread
        self.moving = False  # a move's connect is under way (one at a time)
        self.rebalance_fraction = rebalance_fraction
        self.rebalance_interval = rebalance_interval
        self.tick_end = 0.0
        self.moves_this_tick = 0

    def retire_removed(self) -> None:
        """Retire the addresses that left the pool's members: DNS stopped naming them
        (``dns_change``), or the Aurora topology did (``topology_change``: a reader that left or
        became the writer, the old writer)."""
        removed = self.connector.take_removed()
        if removed:
            self.retire(removed, "topology_change" if self.connector.members_from == "topology"
                        else "dns_change")

    def retire(self, labels: list[str], reason: str) -> None:
        """Connections to these addresses: idle ones closed now, checked-out ones on return."""
        gone = set(labels)
        bag = self.bag
        doomed: list[tuple[Entry, Connection]] = []
        n_busy = 0
        with bag.lock:
            drained = bag.drain_idle_locked()
            for e in drained:
                if e.address in gone:
                    doomed.append((e, bag.forget_locked(e)))
            bag.refill_idle_locked([e for e in drained if e.state == IDLE])
            for e in list(bag.entries.values()):
                # checked out (or being checked out this instant): closed when returned
                if e.address in gone and e.doom_reason is None:
                    doom(e, reason)
                    n_busy += 1
        why = "left DNS" if reason == "dns_change" else f"retired ({reason})"
        logger.info(
            "pool %s: address(es) %s %s: closing %d idle connection(s), %d more on return",
            bag.name, ", ".join(sorted(gone)), why, len(doomed), n_busy,
        )
        for e, conn in doomed:
            self.opener.close(e, conn, reason)
        if doomed:
            self.wake()

    def next_due(self, now: float) -> float:
        """When a tick whose moves ran out ends (inf: nothing waits for it)."""
        return max(now, self.tick_end) if self.moves_this_tick else math.inf

    def maybe_rebalance(self, now: float) -> bool:
        """Move one connection from the most to the least loaded healthy address when the
        spread is uneven by more than one: the decision here, the connect and the close on an
        I/O worker. Returns whether it started something."""
        if self.moving or self.connector.placement != "least_connections":
            return False
        if now >= self.tick_end:
            self.tick_end = now + self.rebalance_interval
            self.moves_this_tick = 0
        bag = self.bag
        with bag.lock:
            if bag.closed or not bag.entries or bag.opening:
                return False
            limit = max(1, math.ceil(self.rebalance_fraction * bag.size))
            if self.moves_this_tick >= limit:
                return False
            leaving = Counter(e.address for e in bag.entries.values() if e.doom_reason)
        found = self.connector.book.balance(now, discount=leaving)
        if found is None:
            return False
        hi, lo, _ = found
        victim_conn: Connection | None = None
        with bag.lock:
            if bag.closed:
                return False
            victim = next((e for e in list(bag.idle) if e.address == hi), None)
            if victim is not None:
                # reserve it: out of the idle queue, so no checkout can take it meanwhile
                try:
                    bag.idle.remove(victim)
                except ValueError:
                    return False  # a checkout took it this instant: next time
                victim.state = RETURNING
            else:
                busy = next((e for e in bag.entries.values() if e.address == hi
                             and e.state == IN_USE and e.doom_reason is None), None)
                if busy is None:
                    return False
                doom(busy, "rebalance")  # closes when it comes back
            self.moves_this_tick += 1
            if bag.size < bag.maxconn:
                bag.size += 1
                bag.opening += 1
            elif victim is not None:  # no room to make before break: break, then make
                victim_conn = bag.forget_locked(victim)  # (its slot counted until closed)
            else:
                return True  # at maxconn with nothing idle: the return makes room
        self.moving = True
        if victim is not None and victim_conn is not None:
            broken, conn = victim, victim_conn
            self.submit(self.connector.host_label,
                        lambda: self._break_then_make(broken, conn, hi, lo))
        else:
            self.submit(self.connector.host_label, lambda: self._move(victim, hi, lo))
        return True

    def _break_then_make(self, victim: Entry, conn: Connection, hi: str, lo: str) -> None:
        """The move job at ``maxconn`` (an I/O worker): close ``victim`` first (its slot
        stays counted until the close returns, so the pool never has more than ``maxconn``
        sockets), then open on ``lo`` if the slot is still free (a waiter comes first)."""
        reserved = False
        try:
            self.opener.close(victim, conn, "rebalance")
            with self.bag.lock:
                reserved = self.bag.reserve_locked()
        finally:
            if not reserved:
                self.moving = False
                self.wake()
        if reserved:
            self._move(None, hi, lo)

    def _move(self, victim: Entry | None, hi: str, lo: str) -> None:
        """The move job (an I/O worker): open one connection on ``lo`` into the slot reserved,
        then close the reserved ``victim`` (still RETURNING, out of the idle queue); if the
        open fails, the victim goes back to idle. Then asks for the next step."""
        bag = self.bag
        try:
            try:
                e, conn = self.opener.open(prefer=lo)
            except PoolError as exc:
                logger.warning("pool %s: rebalancing toward %s failed: %s", bag.name, lo, exc)
                if victim is not None:  # still good: back to idle
                    with bag.lock:
                        bag.release_new_locked(victim, victim.conn)  # type: ignore[arg-type]
                return
            bag.join(e, conn)
            if victim is not None:
                with bag.lock:
                    victim_conn = bag.forget_locked(victim)
                self.opener.close(victim, victim_conn, "rebalance")
            logger.debug("pool %s: moved a connection from %s to %s", bag.name, hi, e.address)
        finally:
            self.moving = False
            self.wake()
