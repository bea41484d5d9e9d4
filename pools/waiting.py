"""Fair waiting: the waiters' queue of a pool's bag, handoffs to waiters, and permits.

A caller that finds nothing idle and the pool at ``maxconn`` (or the server out of slots,
or a prewarm connect under way it should take) joins a FIFO queue of :class:`Waiter` and
waits, without the lock, on its own signal. The oldest waiter is served first, by whoever
frees something: a returned connection is handed to it (``handoff_locked``), a freed slot
becomes its permit to open one (``grant_permits_locked``: the slot is already counted in
``size``), a closing pool gives it :class:`PoolClosed`.

Invariants (the bag's ``lock`` guards the queue and every handoff):

- A waiter is given exactly one of: a connection (checked out to it, in ``out``), a permit
  (a slot counted in ``size`` and ``opening``), or an error; and it is woken exactly once.
- Handoffs happen under the lock, so a waiter that timed out either got its handoff first
  or leaves the queue empty-handed (it looks under the lock before it leaves).
- A lock-free return publishes to the idle queue, then looks for waiters; a waiter looks at
  the idle queue after it queued (under the lock): one of the two always sees the other.
- A waiter interrupted (any ``BaseException``) while waiting or after its wake gives back
  what was handed to it, once (``_abandon_wait_locked``): a connection goes to the next
  waiter or the idle queue, a permit frees its slot for the next waiter.
- While the server refuses connects for capacity and the pool holds connections
  (``capacity_held``), no permit is granted: waiters wait for a connection the pool holds.

The methods here are the bag's (:class:`Waiting` is a base of :class:`pgregistry.pools.bag.Bag`,
so the hot path pays no extra call or lookup); they use the bag's books.
"""

from __future__ import annotations

import time
from _thread import LockType
from _thread import allocate_lock as _allocate_lock
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import psycopg2.extensions as ext

from .entry import IDLE, IN_USE, Entry
from .errors import PoolError, PoolTimeout
from .stats import Counters, closed_error, timeout_error

__all__ = ["Waiter", "Waiting"]

Connection = ext.connection


class Waiter:
    """A caller waiting for a connection. Given, under the bag's lock, exactly one of: a
    connection, a permit to open one (a slot already counted in ``size``), or an error."""

    __slots__ = ("signal", "conn", "permit", "error")

    def __init__(self) -> None:
        # a bare lock, taken at birth: the giver releases it once to wake this waiter (a
        # Condition per wait costs several times more, on the path every waiter takes)
        self.signal = _allocate_lock()
        self.signal.acquire()
        self.conn: Connection | None = None
        self.permit = False
        self.error: PoolError | None = None

    def wake(self) -> None:
        self.signal.release()


class Waiting:
    """The waiting half of the bag (see the module docstring); every ``*_locked`` method runs
    under the bag's ``lock``."""

    if TYPE_CHECKING:  # the bag's books (pgregistry.pools.bag.Bag)
        name: str
        lock: LockType
        idle: deque[Entry]
        out: set[Entry]
        entries: dict[int, Entry]
        waiters: deque[Waiter]
        size: int
        opening: int
        maxconn: int | float
        max_waiting: int
        capacity_until: float
        counters: Counters
        now: Callable[[], float]
        take: Callable[[], Entry]

        def counts_locked(self) -> dict[str, int]: ...

    def take_or_none(self) -> Entry | None:
        try:
            return self.take()
        except IndexError:
            return None

    def capacity_held(self) -> bool:
        """The server refused a connect for capacity lately (see ``capacity_until``): new
        connects wait for a connection the pool holds instead, while it holds one."""
        return self.capacity_until > time.monotonic() and len(self.entries) > 0

    def _may_wait_for_capacity(self, exc: BaseException, deadline: float) -> bool:
        cause = getattr(exc, "capacity", False)
        return bool(cause) and time.monotonic() < deadline and len(self.entries) > 0

    def _enqueue_locked(self, budget: float, t0: float) -> Waiter:
        """Join the waiters' queue (or raise at once: no wait allowed, or too many waiting)."""
        if budget <= 0:
            self.counters.timeouts += 1
            raise self.timeout_error_locked(0.0, budget)
        if self.max_waiting and len(self.waiters) >= self.max_waiting:
            self.counters.timeouts += 1
            raise self.timeout_error_locked(0.0, budget, too_many=True)
        w = Waiter()
        self.waiters.append(w)
        # a lock-free return may have published just before we queued: serve the queue
        if self.idle:
            self.dispatch_locked()
        return w

    def _await(self, w: Waiter, deadline: float | None, budget: float,
               t0: float) -> Connection | None:
        """Wait, without the lock, until ``deadline`` for a handoff to ``w``. Returns the
        connection, or None with a permit to open one; raises on timeout. An interrupt while
        waiting gives back whatever was handed over."""
        try:
            remaining = (deadline or t0) - time.monotonic()
            if remaining > 0:
                w.signal.acquire(True, remaining)  # released once, by whoever serves us
        except BaseException:
            with self.lock:
                self._abandon_wait_locked(w)
            raise
        with self.lock:
            try:
                waited = time.monotonic() - t0
                self.counters.waited(waited)
                if w.error is not None:
                    raise w.error
                if w.conn is not None or w.permit:
                    return w.conn
                # Timed out with nothing handed over: leave the queue (nothing can be handed
                # to us any more, since handoffs happen under the lock we hold).
                self.waiters.remove(w)
                self.counters.timeouts += 1
                raise self.timeout_error_locked(waited, budget)
            except BaseException:
                self._abandon_wait_locked(w)
                raise

    def _abandon_wait_locked(self, w: Waiter) -> None:
        """A waiter leaves (interrupted): what was handed to it goes back, once."""
        conn, w.conn = w.conn, None
        permit, w.permit = w.permit, False
        if conn is not None:
            e = self.entries.get(id(conn))
            if e is not None and e in self.out:
                self.out.discard(e)
                e.uses -= 1  # it never reached its caller
                self.release_new_locked(e, conn)
        elif permit:
            self.size -= 1
            self.opening -= 1
            self.grant_permits_locked()
        elif w in self.waiters:
            self.waiters.remove(w)

    def dispatch_locked(self) -> None:
        """Hand idle connections to waiters, oldest first, while there are both."""
        while self.waiters:
            e = self.take_or_none()
            if e is None:
                return
            conn = e.conn
            assert conn is not None
            self.handoff_locked(e, conn)

    def handoff_locked(self, e: Entry, conn: Connection) -> None:
        """Check ``e`` out to the oldest waiter."""
        w = self.waiters.popleft()
        e.conn = None
        e.state = IN_USE
        e.checked_out_at = self.now()
        e.uses += 1
        self.out.add(e)
        w.conn = conn
        w.wake()

    def grant_permits_locked(self) -> None:
        """Free slots go to the oldest waiters, as permits to open a connection (not while
        the server is out of slots and the pool holds connections to wait for)."""
        while self.waiters and self.size < self.maxconn and not self.capacity_held():
            w = self.waiters.popleft()
            self.size += 1
            self.opening += 1
            w.permit = True
            w.wake()

    def fail_waiters_locked(self) -> None:
        """The pool closed: every waiter gets :class:`PoolClosed`."""
        while self.waiters:
            w = self.waiters.popleft()
            w.error = closed_error(self.name)
            w.wake()

    def release_new_locked(self, e: Entry, conn: Connection) -> None:
        """A connection joins the idle queue (opened by maintenance, or given back by a
        waiter that left): to a waiter if one waits."""
        if self.waiters:
            self.handoff_locked(e, conn)
        else:
            e.state = IDLE
            e.conn = conn
            self.idle.append(e)

    def timeout_error_locked(
        self, waited: float, timeout: float, too_many: bool = False
    ) -> PoolTimeout:
        return timeout_error(
            self.name, self.counts_locked(), self.maxconn, waited_s=waited, timeout_s=timeout,
            max_waiting=self.max_waiting, too_many=too_many,
            last_connect_error=self.counters.last_connect_error,
        )
