"""Maintenance: what the supervisor does for one pool (prewarm, reaping, expiry, leak checks).

``step(now)`` is one maintenance step, run by the supervisor: start a DNS refresh when due
(the addresses that left it are retired when it lands), close what is due, check roles and
leaks, then start at most one connect (toward ``minconn``, or to even the spread over
addresses), and say when to run next. The step itself never blocks: the refresh, the connect
and the closes it decides on run on the supervisor's I/O workers (``submit``), and each one
asks for the next step when it lands. Callers never wait for it.

Invariants:
- Maintenance only closes IDLE entries, and takes them out of the idle queue (under the lock)
  before deciding (HikariCP's reserve-before-reap), so it never races a checkout; survivors go
  back in their reuse order, before anything returned meanwhile.
- Reaping never takes the pool below ``minconn`` for idleness; expiry and a shrink may.
- One connect at a time per pool (prewarm or a rebalancing move), never while a caller
  connects (it would only compete with it; the caller's open completing asks for the next
  step); a failed prewarm backs off exponentially (jittered), up to ``reconnect_backoff_max``.
- One DNS refresh at a time per pool; while it runs its deadline is not the step's.
- A deadline that a state change moves earlier is told to the supervisor by that change
  (``deadline_moved``): a caller's connect growing the pool above ``minconn``, a checkout with
  leak detection on, a new DNS answer. Lifetimes of checked-out connections are in the step's
  next deadline too, so a return needs to tell nothing.
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
        submit: Callable[[str, Callable[[], None]], None],
        wake: Callable[[], None],
        wake_by: Callable[[float], None],
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
        self.submit = submit  # blocking work, keyed by host, off the supervisor's thread
        self.wake = wake  # a step as soon as possible
        self.wake_by = wake_by  # a step by this deadline (cheap when it is not earlier)
        self.refreshing = False  # a DNS refresh job is under way
        self.idle_timeout = idle_timeout
        self.reap_idle_interval = reap_idle_interval
        self.next_reap_at = now + reap_idle_interval if reap_idle_interval else math.inf
        self.leak_threshold = leak_threshold
        self.backoff_initial = backoff_initial
        self.backoff_max = max(backoff_max, backoff_initial)
        self.backoff_s = 0.0
        self.backoff_until = 0.0
        self.pid = os.getpid()
        opener.on_opened = self._opened
        opener.after_connect = self._after_connect

    def _opened(self) -> None:
        """A connection opened (any thread): the backoff is over; above ``minconn`` the reap
        deadline may now be earlier than the step's."""
        self.reset_backoff()
        bag = self.bag
        if self.reap_idle_interval and bag.size > bag.minconn:
            self.wake_by(self.next_reap_at)

    def _after_connect(self) -> None:
        """After any connect attempt (any thread): addresses DNS stopped naming are retired,
        and a new answer's refresh deadline is told to the supervisor."""
        self.placement.retire_removed()
        due = self.connector.refresh_due()
        if due is not None:
            self.wake_by(due)

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
        if due is not None and now >= due and not self.refreshing:
            self.refreshing = True
            self.submit("dns " + self.connector.host_label, self._refresh)
        self.placement.retire_removed()  # members that left (DNS, the topology, set_members)
        reap_idle = bool(self.reap_idle_interval) and now >= self.next_reap_at
        if reap_idle:
            self.next_reap_at = now + self.reap_idle_interval
        self.reap(now, reap_idle=reap_idle)

        if self.roles is not None:
            self.roles.check(now)
        leak_due = self.check_leaks(now)
        if not self.maybe_prewarm(now):
            self.placement.maybe_rebalance(now)

        with bag.lock:
            if bag.closed:
                return None
            nxt = now + RECHECK_INTERVAL_S
            if bag.size < bag.minconn and bag.opening == 0:
                # (while a connect runs, its completion asks for the next step)
                nxt = min(nxt, max(now, self.backoff_until))
            for e in list(bag.entries.values()):
                # idle ones expire here; a checked-out one may come back before its expiry
                if now < e.expires_at < nxt:
                    nxt = e.expires_at
            if bag.idle and now >= min(e.expires_at for e in list(bag.idle)):
                nxt = now  # (expired meanwhile: reaped at once)
            if self.reap_idle_interval and bag.size > bag.minconn:
                nxt = min(nxt, self.next_reap_at)
            if self.roles is not None and bag.idle:
                nxt = min(nxt, self.roles.next_check_at)
        due = self.connector.refresh_due()
        if due is not None and not self.refreshing:
            nxt = min(nxt, max(now, due))
        nxt = min(nxt, leak_due, self.placement.next_due(now))
        return nxt

    def _refresh(self) -> None:
        """The DNS refresh job (an I/O worker): refresh due names, retire addresses that left,
        then ask for the next step."""
        try:
            self.connector.refresh(self.connector.clock.monotonic())
            self.placement.retire_removed()
        finally:
            self.refreshing = False
            self.wake()

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
                elif bag.live_locked() > bag.maxconn:  # (those closing already go)
                    reason = "resize"
                elif (
                    reap_idle
                    and idle_timeout is not None
                    and now - e.last_used_at >= idle_timeout
                    and bag.live_locked() > bag.minconn
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

    def resize(self, maxconn: int | float, minconn: int, now: float) -> None:
        """The pool's new sizes (checked by the caller): waiters are served at once, surplus
        idle connections closed now (checked-out ones on return), then a step."""
        bag = self.bag
        with bag.lock:
            bag.maxconn = maxconn
            bag.minconn = minconn
            if not bag.closed:
                bag.cap = maxconn
            bag.grant_permits_locked()
        logger.info("pool %s: resized to minconn=%s maxconn=%s", bag.name, minconn, maxconn)
        self.reap(now, reap_idle=False)
        self.wake()

    def maybe_prewarm(self, now: float) -> bool:
        """Start one connect (on an I/O worker) if the pool is below ``minconn`` and not
        backing off, and no connect is under way. Returns whether it started one."""
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
        self.submit(self.connector.host_label, self._prewarm_one)
        return True

    def _prewarm_one(self) -> None:
        """The prewarm job (an I/O worker): open one connection into the slot reserved, or
        back off; then ask for the next step."""
        bag = self.bag
        try:
            try:
                e, conn = self.opener.open()
            finally:
                with bag.lock:
                    bag.prewarming -= 1
        except PoolError as exc:
            grown = max(self.backoff_initial, self.backoff_s * 2)
            self.backoff_s = min(self.backoff_max, grown)
            now = self.connector.clock.monotonic()
            self.backoff_until = now + self.backoff_s * self.rng.uniform(0.9, 1.1)
            logger.warning(
                "pool %s: prewarm failed, retrying in %.1f s: %s",
                bag.name, self.backoff_s, exc,
            )
        else:
            bag.join(e, conn)
        finally:
            self.wake()

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
            threshold = self.leak_threshold
            if threshold:
                self.wake_by(e.checked_out_at + threshold)

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
