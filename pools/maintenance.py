"""Maintenance: what the supervisor does for one pool (prewarm, reaping, expiry, leak checks).

``step(now)`` is one maintenance step, run by the supervisor: refresh DNS when due (and retire
the addresses that left it), close what is due, check roles and leaks, then open at most one
connection (toward ``minconn``, or to even the spread over addresses), and say when to run next.
Callers never wait for it.

Invariants:
- Maintenance only closes IDLE entries, and takes them out of the idle queue (under the lock)
  before deciding (HikariCP's reserve-before-reap), so it never races a checkout; survivors go
  back in their reuse order, before anything returned meanwhile.
- Reaping never takes the pool below ``minconn`` for idleness; expiry and a shrink may.
- Prewarm opens one connection per step, never while a caller connects (it would only compete
  with it; the caller's open completing asks for the next step), and backs off exponentially
  (jittered) after a failure, up to ``reconnect_backoff_max``.
- Leak warnings come once per checkout, with the stack that checked the connection out.
- After a fork the parent's pool is not the child's to maintain (``pid``).
"""

from __future__ import annotations

import logging
import math
import os
import random
import traceback
from collections.abc import Callable

import psycopg2.extensions as ext

from .bag import Bag
from .connector import Connector
from .entry import IDLE, Entry
from .errors import PoolError
from .opening import Opener
from .placement import Placement
from .roles import RoleGuard

__all__ = ["Maintenance", "RECHECK_INTERVAL_S"]

logger = logging.getLogger(__name__)

Connection = ext.connection

RECHECK_INTERVAL_S = 60.0  # maintenance looks at every pool at least this often


class Maintenance:
    """One pool's maintenance (see the module docstring). Settings are live.

    :param idle_timeout: seconds a connection above ``minconn`` may sit idle (None: forever).
    :param reap_idle_interval: seconds between idle reaps (0: never).
    :param leak_threshold: seconds a checkout may last before a leak warning (None: off).
    :param backoff_initial: seconds of the first prewarm retry delay; doubles per failure...
    :param backoff_max: ... up to this.
    """

    def __init__(
        self,
        bag: Bag,
        opener: Opener,
        placement: Placement,
        roles: RoleGuard | None,
        connector: Connector,
        rng: random.Random,
        *,
        now: float,
        idle_timeout: float | None,
        reap_idle_interval: float,
        leak_threshold: float | None,
        backoff_initial: float,
        backoff_max: float,
    ) -> None:
        self.bag = bag
        self.opener = opener
        self.placement = placement
        self.roles = roles
        self.connector = connector
        self.rng = rng
        self.idle_timeout = idle_timeout
        self.reap_idle_interval = reap_idle_interval
        self.next_reap_at = now + reap_idle_interval if reap_idle_interval else math.inf
        self.leak_threshold = leak_threshold
        self.backoff_initial = backoff_initial
        self.backoff_max = max(backoff_max, backoff_initial)
        self.backoff_s = 0.0
        self.backoff_until = 0.0
        self.pid = os.getpid()
        opener.on_opened = self.reset_backoff

    def reset_backoff(self) -> None:
        self.backoff_s = 0.0
        self.backoff_until = 0.0

    def set_reap_idle_interval(self, interval: float, now: float) -> None:
        self.reap_idle_interval = interval
        self.next_reap_at = now + interval if interval else math.inf

    # -- the step ---------------------------------------------------------------------------

    def step(self, now: float) -> float | None:
        """One maintenance step. Returns when to run next (None: never again)."""
        bag = self.bag
        if bag.closed:
            return None
        if os.getpid() != self.pid:  # forked: the parent's connections are not ours to touch
            return None
        due = self.connector.refresh_due()
        if due is not None and now >= due:
            self.connector.refresh(now)
        self.placement.retire_removed()  # members that left (DNS, the topology, set_members)
        reap_idle = bool(self.reap_idle_interval) and now >= self.next_reap_at
        if reap_idle:
            self.next_reap_at = now + self.reap_idle_interval
        self.reap(now, reap_idle=reap_idle)

        if self.roles is not None:
            self.roles.check(now)
        leak_due = self.check_leaks(now)
        opened = self.maybe_prewarm(now)
        busy = opened or self.placement.maybe_rebalance(now)

        with bag.lock:
            if bag.closed:
                return None
            nxt = now + RECHECK_INTERVAL_S
            if busy:
                nxt = now  # more to do: again, after whatever else is due
            if bag.size < bag.minconn and bag.opening == 0:
                # (while a caller connects, its completion asks for the next step)
                nxt = min(nxt, max(now, self.backoff_until))
            for e in list(bag.idle):
                if e.expires_at < nxt:
                    nxt = e.expires_at
            if self.reap_idle_interval and bag.size > bag.minconn:
                nxt = min(nxt, self.next_reap_at)
            if self.roles is not None and bag.idle:
                nxt = min(nxt, self.roles.next_check_at)
        due = self.connector.refresh_due()
        if due is not None:
            nxt = min(nxt, max(now, due))
        nxt = min(nxt, leak_due, self.placement.next_due(now))
        return nxt

    # -- reaping and expiry -----------------------------------------------------------------

    def reap(self, now: float, *, reap_idle: bool) -> int:
        """Close idle connections past their lifetime, surplus above ``maxconn`` and (with
        ``reap_idle``) those idle too long above ``minconn``. Returns how many were closed."""
        bag = self.bag
        doomed: list[tuple[Entry, Connection, str]] = []
        with bag.lock:
            if bag.orphans:
                bag.collect_orphans_locked()
            if not bag.idle:
                return 0
            drained = bag.drain_idle_locked()
            idle_timeout = self.idle_timeout
            # oldest-idle first, so reaping takes those the pool needs least
            for e in sorted(drained, key=lambda x: x.last_used_at):
                if now >= e.expires_at:
                    reason: str | None = e.doom_reason or "lifetime"
                elif bag.size > bag.maxconn:
                    reason = "resize"
                elif (
                    reap_idle
                    and idle_timeout is not None
                    and now - e.last_used_at >= idle_timeout
                    and bag.size > bag.minconn
                ):
                    reason = "idle"
                else:
                    reason = None
                if reason is not None:
                    doomed.append((e, bag.forget_locked(e), reason))
            # the survivors go back in their reuse order
            bag.refill_idle_locked([x for x in drained if x.state == IDLE])
        for e, conn, reason in doomed:
            self.opener.close(e, conn, reason)
        return len(doomed)

    # -- prewarm ----------------------------------------------------------------------------

    def maybe_prewarm(self, now: float) -> bool:
        """Open one connection if the pool is below ``minconn`` and not backing off, and no
        caller is opening one right now."""
        bag = self.bag
        with bag.lock:
            need = (not bag.closed and bag.size < bag.minconn
                    and now >= self.backoff_until and bag.opening == 0
                    and not bag.sync_prewarm)
            if need:
                bag.size += 1
                bag.opening += 1
                bag.prewarming += 1
        if not need:
            return False
        try:
            try:
                e, conn = self.opener.open()
            finally:
                with bag.lock:
                    bag.prewarming -= 1
        except PoolError as exc:
            grown = max(self.backoff_initial, self.backoff_s * 2)
            self.backoff_s = min(self.backoff_max, grown)
            self.backoff_until = now + self.backoff_s * self.rng.uniform(0.9, 1.1)
            logger.warning(
                "pool %s: prewarm failed, retrying in %.1f s: %s",
                bag.name, self.backoff_s, exc,
            )
            return False
        bag.join(e, conn)
        return True

    def prewarm_now(self, close: Callable[[], None]) -> None:
        """Open ``minconn`` connections in this thread (``background_prewarm=False``); the
        supervisor keeps out of it (its prewarm step skips while this runs). On failure the
        pool is closed (``close``) and the error raised."""
        bag = self.bag
        bag.sync_prewarm = True
        try:
            for _ in range(bag.minconn):
                with bag.lock:
                    if bag.size >= bag.minconn:
                        break
                    bag.size += 1
                    bag.opening += 1
                try:
                    e, conn = self.opener.open()
                except PoolError:
                    close()
                    raise
                with bag.lock:
                    bag.release_new_locked(e, conn)
        finally:
            bag.sync_prewarm = False

    # -- leaks ------------------------------------------------------------------------------

    def note_checkout(self, conn: Connection) -> None:
        """Leak detection: remember where this checkout happened (the caller's stack)."""
        e = self.bag.entries.get(id(conn))
        if e is not None:
            e.checkout_stack = "".join(traceback.format_stack(limit=16)[:-3])
            e.leak_warned = False

    def check_leaks(self, now: float) -> float:
        """Warn, once per checkout, about connections held longer than the threshold, with
        the stack that checked them out. Returns when to look again."""
        threshold = self.leak_threshold
        nxt = math.inf
        if not threshold:
            return nxt
        bag = self.bag
        for e in list(bag.out):
            if e.checkout_stack is None or e.leak_warned:
                continue
            due = e.checked_out_at + threshold
            if now >= due:
                e.leak_warned = True
                with bag.lock:
                    bag.counters.leaks += 1
                logger.warning(
                    "pool %s: connection pid=%s to %s has been checked out for %.1f s "
                    "(leak_detection_threshold %g s); it was checked out at:\n%s",
                    bag.name, e.backend_pid, e.address, now - e.checked_out_at, threshold,
                    e.checkout_stack.rstrip(),
                )
            else:
                nxt = min(nxt, due)
        return nxt
