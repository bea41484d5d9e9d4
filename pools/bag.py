"""The bag: a pool's books of connections, its lock-free checkout/return and its waiters.

(The name and the role are HikariCP's ``ConcurrentBag``: entries and their states,
borrow/requite/reserve; it does no I/O of its own and knows nothing of servers.)

The hot path takes no lock. An idle connection is checked out with an atomic ``popleft`` (or
``pop``, LIFO) of the idle deque and given back with an atomic ``append``; an entry popped is
its taker's alone. Ownership is membership of the checked-out set ``out``, and the atomic
removal from it on return makes a second return of the same connection fail, even a concurrent
one. A connection used in the last ``validation_bypass`` seconds and not expired is handed out
after a single comparison (``Entry.fresh_until``).

Everything else sits behind one lock, ``lock``, held for bookkeeping only: connections are
opened, pinged, rolled back and closed outside it, by the bag's hooks (set once by the pool:
``vet`` checks a popped entry, ``open_for_caller`` opens one for a caller, ``restore`` cleans a
returned one, ``close_conn`` closes one that left the books). A caller that finds nothing idle
opens a connection itself while the pool is below ``maxconn`` (or takes a prewarm connection
already under way); at ``maxconn`` it waits in a fair FIFO queue (the waiting half of the bag,
its handoffs and permits, and their invariants: :mod:`pgregistry.pools.waiting`).

The books (under ``lock``): ``size`` counts the slots ``maxconn`` bounds (connections open,
opening or closing: :mod:`pgregistry.pools.slots`). Every entry is in exactly one of ``idle``,
``out`` or in the hands of one thread (being opened, vetted, returned or closed, state
RETURNING); ``entries`` holds every open connection by ``id``, whose weak reference frees the
slot of a checked-out connection that was garbage-collected (``orphans``).

Interrupts (KeyboardInterrupt, SystemExit, any ``BaseException``) leave the books exact:
whatever this thread owns when one lands (a popped entry, a reserved slot (:class:`Slot`), a
waiter's handoff, a returned connection being cleaned) is given back, or discarded when its
state is unknown (a ping, a rollback or a close cut short), and the interrupt propagates. The
pool's lock is only ever taken with ``with`` (an asynchronous exception cannot land between
acquiring it and the block that releases it), and the counting that must not be torn runs in
plain attribute arithmetic, where CPython delivers no asynchronous exception.

One deadline per call: a checkout's ``timeout`` is fixed when it starts and bounds its wait,
every ping and its connect together; its errors say how long the caller waited.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from _thread import allocate_lock as _allocate_lock
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions as ext

from .entry import CLOSED, IDLE, IN_USE, RETURNING, Entry
from .errors import BadConnectionError, PoolError
from .slots import Slot, Slots
from .stats import Counters, closed_error
from .timing import Timings
from .waiting import Waiter, Waiting

__all__ = ["Bag", "Slot", "Waiter"]  # (Waiter: from .waiting)

logger = logging.getLogger(__name__)

Connection = ext.connection


def _no_vet(e: Entry, conn: Connection, budget_s: float | None) -> bool:
    return True


class Bag(Slots, Waiting):
    """The books and the hot path of one pool (see the module docstring for the invariants).

    Its fields are the pool's shared state: the pool's collaborators (maintenance,
    placement, roles) receive the bag and change the books only under ``lock`` and through
    the ``*_locked`` methods."""

    def __init__(
        self,
        name: str,
        *,
        minconn: int,
        maxconn: int | float,
        timeout: float,
        max_waiting: int,
        fifo: bool,
        now: Callable[[], float],
    ) -> None:
        self.name = name
        self.lock = _allocate_lock()
        self.now = now  # the hot path's clock (the builtin time.monotonic for the real clock)
        self.idle: deque[Entry] = deque()
        self.take: Callable[[], Entry] = self.idle.popleft if fifo else self.idle.pop
        self.fifo = fifo
        self.out: set[Entry] = set()  # checked out (membership is the ownership test)
        self.entries: dict[int, Entry] = {}
        self.waiters: deque[Waiter] = deque()
        self.size = 0  # open + opening + closing: the number maxconn bounds
        self.opening = 0
        # id(entry) -> entry: out of the books, its socket not closed yet (see close_finished)
        self.closing: dict[int, Entry] = {}
        self.prewarming = 0  # of opening: connects by maintenance, for the pool
        self.sync_prewarm = False  # the constructor is opening minconn itself
        self.closed = False
        self.minconn = minconn
        self.maxconn = maxconn
        self.cap: int | float = maxconn  # maxconn; -1 once closed (one test on the hot path)
        self.timeout = timeout
        self.max_waiting = max_waiting
        # checkouts of connections no longer in the books
        self.retired_uses = 0
        # weakrefs of checked-out connections that were garbage-collected. Appended lock-free
        # by the weakref callback (which may run inside any code, even under the lock).
        self.orphans: deque[Any] = deque()
        self.counters = Counters()
        # until when (time.monotonic()) the server refused connects for capacity: meanwhile a
        # checkout waits for a connection the pool holds rather than open one
        self.capacity_until = 0.0
        # settings of the hot path (set by the pool)
        self.ping_after = math.inf  # validation_bypass if test_on_borrow, else inf
        self.return_hooks = False  # every return takes the slow path (reset, role check)
        self.always_slow = False  # every checkout takes the slow path (roles, leak detection)
        # hooks (set by the pool before first use)
        self.ping: Callable[[Entry, Connection, float | None], bool] = _no_vet
        self.role_changed: Callable[[Entry, Connection], bool] | None = None
        self.on_slow_checkout: Callable[[Connection], None] | None = None
        # timing listeners (metrics); None when there are none. Set, they send every checkout
        # and return through the slow paths (the pool sets always_slow and return_hooks).
        self.timings: Timings | None = None
        self.open_for_caller: Callable[[float | None, Slot], Connection]
        # a broken connection to an address: its older idle ones are pinged before reuse
        self.suspect_older: bool = True
        self.restore: Callable[[Entry, Connection, int], str | None]
        self.close_conn: Callable[[Entry, Connection | None, str], None]
        self.forgotten: Callable[[Entry], None]  # an entry left the books (under the lock)

    # -- the hot path ---------------------------------------------------------------------

    def getconn(self, timeout: float | None = None) -> Connection:
        # The hot path takes no lock: the idle queue's pop is atomic, and an entry popped is
        # this thread's alone. An entry that is expired, or needs a ping or a role check, and
        # an empty queue, go to the slow path (under the lock).
        try:
            e: Entry | None = self.take()
        except IndexError:
            e = None  # (leave the except block: errors raised later must not chain to it)
        if e is None:
            return self.getconn_slow(timeout, None)
        try:
            now = self.now()
            if now < e.fresh_until:
                conn = e.conn
                e.conn = None
                e.state = IN_USE
                e.checked_out_at = now
                e.uses += 1
                self.out.add(e)
                return conn  # type: ignore[return-value]
        except BaseException:  # interrupted: the popped entry goes back
            self.recover(e, mine=True, reusable=True)
            raise
        return self.getconn_slow(timeout, e)

    def putconn(self, conn: Connection, close: bool = False) -> None:
        e = self.entries.get(id(conn))
        if e is None or (w := e.wref) is None or w() is not conn:
            e = self._entry_for_return(conn)
        try:
            self.out.remove(e)  # atomic: of two returns of one connection, one wins
        except KeyError:
            raise BadConnectionError(
                f"pool {self.name!r}: connection returned twice (it is already idle)",
                pool=self.name,
            ) from None
        try:
            try:
                status = conn.get_transaction_status()
            except psycopg2.InterfaceError:  # closed, by the user or by a broken link
                status = -1
            now = self.now()
            setup = e.setup  # (the settings check, inlined: the hot path pays ~0.2 us)
            if (status or close or self.return_hooks or now >= e.expires_at
                    or self.size > self.cap
                    or (setup is not None and (
                        conn.autocommit is not setup[0] or conn.readonly is not setup[1]
                        or conn.isolation_level != setup[2] or conn.deferrable is not setup[3]
                        or conn.cursor_factory is not setup[4]))):
                timings = self.timings
                if timings is None:
                    self._putconn_slow(e, conn, close, status)
                else:
                    used_s = now - e.checked_out_at
                    try:
                        self._putconn_slow(e, conn, close, status)
                    finally:  # after the books are done with it
                        timings.used(used_s)
                return
            # The hot path takes no lock: publish the entry to the idle queue (atomic
            # append), then look for waiters or a close that may have come meanwhile.
            e.last_used_at = now
            fresh = now + self.ping_after
            e.fresh_until = fresh if fresh < e.expires_at else e.expires_at
            if e.doom_reason is not None:  # doomed while returning: never fresh (see doom)
                e.fresh_until = -math.inf
            e.conn = conn
            e.state = IDLE
            self.idle.append(e)
            if self.waiters or self.closed:
                self._after_publish()
        except BaseException:  # interrupted: discarded, unless it was published already
            self.recover(e, mine=False, reusable=False, conn=conn)
            raise

    @staticmethod
    def setup_changed(e: Entry, conn: Connection) -> bool:
        """Whether the borrower changed a client-side attribute the pool set up (autocommit,
        read-only, isolation level, deferrable, cursor factory)."""
        setup = e.setup
        return setup is not None and setup != (
            conn.autocommit, conn.readonly, conn.isolation_level, conn.deferrable,
            conn.cursor_factory)

    def recover(self, e: Entry, *, mine: bool, reusable: bool,
                conn: Connection | None = None) -> None:
        """An interrupt landed while this thread owned ``e``: put it back in the books as
        idle (``reusable``: nothing was done on it) or discard it (its state is unknown).
        ``mine``: an entry in the checked-out set is this thread's (a checkout under way);
        else it is someone else's (a waiter got it) and is left alone."""
        if conn is None:
            conn = e.conn if e.conn is not None else (e.wref() if e.wref is not None else None)
        close = False
        with self.lock:
            if e.state == CLOSED or self.entries.get(e.key) is not e:
                close = True  # out of the books already; its close may have been cut short
            elif (e in self.out and not mine) or (e.state == IDLE and e in self.idle):
                return
            else:
                self.out.discard(e)
                if reusable and conn is not None and not conn.closed and not self.closed:
                    self.release_new_locked(e, conn)
                    return
                self.forget_locked(e)
                self.counters.closed("interrupted")
        try:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        finally:
            self.close_finished(e)
        if not close:
            logger.debug("pool %s: interrupted: connection pid=%s discarded", self.name,
                         e.backend_pid)

    # -- checkout, the slow path ------------------------------------------------------------

    def getconn_slow(self, timeout: float | None, popped: Entry | None) -> Connection:
        timings = self.timings
        t0 = time.monotonic() if timings is not None else 0.0
        conn = self._getconn_slow_body(timeout, popped)
        try:
            hook = self.on_slow_checkout
            if hook is not None:
                hook(conn)
            if timings is not None:
                timings.waited(time.monotonic() - t0)
        except BaseException:  # interrupted: the caller never gets it, so it goes back
            e = self.entries.get(id(conn))
            if e is not None:
                self.recover(e, mine=True, reusable=True)
            raise
        return conn

    def _getconn_slow_body(self, timeout: float | None, popped: Entry | None) -> Connection:
        budget = self.timeout if timeout is None else timeout
        t0 = time.monotonic()
        deadline = t0 + budget if budget > 0 else None  # one deadline for the whole call
        if popped is not None:
            conn = self.checkout_popped(popped, deadline)
            if conn is not None:
                return conn
        while True:
            w: Waiter | None = None
            e = None
            slot = Slot()
            with self.lock:
                if self.orphans:
                    self.collect_orphans_locked()
                if self.closed:
                    raise closed_error(self.name)
                if self.idle and not self.waiters:
                    e = self.take_or_none()
                    if e is None:  # taken by a lock-free checkout meanwhile
                        continue
                elif self.size < self.maxconn and not self.capacity_held() and (
                        len(self.waiters) >= self.prewarming or budget <= 0):
                    self.size += 1
                    self.opening += 1
                else:
                    # at maxconn, behind other waiters, a prewarm connect is under way (take it
                    # when it lands rather than race it for the same CPU and server), or the
                    # server is out of slots: wait for a connection the pool holds
                    slot.reserved = False
                    w = self._enqueue_locked(budget, t0)
            if w is not None:
                conn = self._await(w, deadline, budget, t0)
                if conn is not None:
                    return conn
                slot.reserved = True  # a permit: a slot already counted for us
            if e is None:
                try:
                    return self.open_for_caller(deadline, slot)
                except BaseException as exc:
                    self._open_interrupted(slot, exc)
                    if not isinstance(exc, PoolError) or deadline is None:
                        raise
                    if self._may_wait_for_capacity(exc, deadline):
                        continue  # wait, within the deadline, for a connection the pool holds
                    waited = time.monotonic() - t0
                    if getattr(exc, "deadline_only", False):  # the deadline, nothing else
                        with self.lock:
                            self.counters.timeouts += 1
                            err = self.timeout_error_locked(waited, budget)
                        raise err from exc
                    exc.args = (f"{exc.args[0] if exc.args else exc}; the caller waited "
                                f"{waited:.3f} s of its {budget:g} s timeout",)
                    raise
            conn = self.checkout_popped(e, deadline)
            if conn is not None:
                return conn
            if deadline is not None and time.monotonic() >= deadline:
                with self.lock:  # every idle connection it tried was unfit, and time is up
                    self.counters.timeouts += 1
                    raise self.timeout_error_locked(time.monotonic() - t0, budget)

    def _open_interrupted(self, slot: Slot, exc: BaseException) -> None:
        """A caller's connect ended in an exception: its slot is free again (if the opener
        did not free it), and a connection it had already entered goes back."""
        if slot.reserved:
            with self.lock:
                self.open_failed_locked(exc, slot)
        elif slot.entry is not None and not isinstance(exc, Exception):
            self.recover(slot.entry, mine=True, reusable=True)

    def checkout_popped(self, e: Entry, deadline: float | None = None) -> Connection | None:
        """An entry taken from the idle queue: closed if expired, else checked out, pinged if
        it has not been used for a while (within what is left of ``deadline``), role-checked
        on writer/reader pools. Returns the connection, or None if it was not fit to hand
        out."""
        try:
            now = self.now()
            conn = e.conn
            assert conn is not None
            if now >= e.expires_at:
                with self.lock:
                    self.forget_locked(e)
                self.close_conn(e, conn, e.doom_reason or "lifetime")
                return None
            e.conn = None
            e.state = IN_USE
            e.checked_out_at = now
            e.uses += 1
            self.out.add(e)
            if e.needs_ping or now - e.last_used_at >= self.ping_after:
                e.needs_ping = False
                budget = None if deadline is None else max(0.001, deadline - time.monotonic())
                if not self.ping(e, conn, budget):
                    self.discard(e, conn, "validation")
                    return None
            role_changed = self.role_changed
            if role_changed is not None and role_changed(e, conn):
                self.discard(e, conn, e.doom_reason or "role_change")
                return None
            return conn
        except BaseException:  # interrupted mid-ping (or close): its state is unknown
            self.recover(e, mine=True, reusable=False)
            raise

    def admit_checked_out(self, e: Entry, conn: Connection) -> Connection:
        """A connection a caller opened becomes its checkout (or is closed if the pool closed
        meanwhile, with :class:`PoolClosed`)."""
        with self.lock:
            if self.closed:
                self.forget_locked(e)
                closed = True
            else:
                closed = False
                self.out.add(e)  # first: from here an interrupt's recovery sees it as ours
                e.state = IN_USE
                e.conn = None  # checked out: the pool keeps only the weak reference
                e.checked_out_at = e.created_at
                e.uses += 1
        if closed:
            self.close_conn(e, conn, "pool_closed")
            raise closed_error(self.name)
        return conn

    # -- return, the slow path ----------------------------------------------------------------

    def _putconn_slow(self, e: Entry, conn: Connection, close: bool, status: int) -> None:
        """A return that needs work first: a rollback, a reset, a role check, or a close. The
        entry is already out of the checked-out set."""
        reason: str | None = "requested" if close else self.restore(e, conn, status)
        now = self.now()
        if reason is None and now >= e.expires_at:
            reason = e.doom_reason or "lifetime"
        with self.lock:
            if reason is None and self.size > self.cap:
                reason = "pool_closed" if self.closed else "resize"
            if reason is None:
                e.last_used_at = now
                e.fresh_until = self.fresh_until(e, now)
                if self.waiters:
                    self.handoff_locked(e, conn)
                else:
                    e.conn = conn
                    e.state = IDLE
                    self.idle.append(e)
                return
            e.state = RETURNING
            self.forget_locked(e)
            if reason == "broken" and self.suspect_older:
                self._suspect_older_locked(e)
        self.close_conn(e, conn, reason)

    def _suspect_older_locked(self, broken: Entry) -> None:
        """A connection to an address turned out broken (a server restart, a network cut):
        the idle ones to that address (all opened before this was known) are pinged before
        their next use."""
        for e in self.idle:
            if e.address == broken.address:
                e.needs_ping = True
                e.fresh_until = -math.inf

    def _after_publish(self) -> None:
        """After a lock-free return: serve waiters from the idle queue, or, if the pool closed
        meanwhile, close what is idle."""
        with self.lock:
            if self.closed:
                conns = [(e, self.forget_locked(e)) for e in self.drain_idle_locked()]
            else:
                self.dispatch_locked()
                return
        for e, conn in conns:
            self.close_conn(e, conn, "pool_closed")

    def _entry_for_return(self, conn: object) -> Entry:
        """The slow path of putconn's ownership check: the entry, or the precise error."""
        with self.lock:
            if self.orphans:
                self.collect_orphans_locked()
            e = self.entries.get(id(conn))
            if e is not None and e.wref is not None and e.wref() is conn:
                return e  # putconn's removal from the checked-out set decides the rest
        if not isinstance(conn, ext.connection):
            raise BadConnectionError(
                f"pool {self.name!r}: putconn() takes a connection, got {type(conn).__name__}",
                pool=self.name,
            )
        raise BadConnectionError(
            f"pool {self.name!r}: this connection was not given out by this pool", pool=self.name
        )

    def owns(self, conn: object) -> bool:
        e = self.entries.get(id(conn))
        return e is not None and e.wref is not None and e.wref() is conn and e in self.out

    def fresh_until(self, e: Entry, used_at: float) -> float:
        """Until when ``e`` may be handed out without any check (see Entry.fresh_until)."""
        if self.always_slow:
            # every checkout takes the slow path: the server's role is looked at (no round
            # trip), or the checkout's stack recorded for leak detection
            return -math.inf
        return min(e.expires_at, used_at + self.ping_after)

    def refresh_fresh_until(self) -> None:
        with self.lock:
            for e in list(self.idle):
                e.fresh_until = self.fresh_until(e, e.last_used_at)

    def set_reuse(self, fifo: bool) -> None:
        self.fifo = fifo
        self.take = self.idle.popleft if fifo else self.idle.pop

    # -- the books ----------------------------------------------------------------------------

    def join(self, e: Entry, conn: Connection) -> None:
        """A connection opened by maintenance joins the pool (or is closed, if it closed)."""
        with self.lock:
            late = self.closed
            if late:
                self.forget_locked(e)
            else:
                self.release_new_locked(e, conn)
        if late:
            self.close_conn(e, conn, "pool_closed")

    def drain_idle_locked(self) -> list[Entry]:
        """Take every entry out of the idle queue, in order (one pop at a time: lock-free
        checkouts may pop concurrently; nothing is lost or taken twice)."""
        drained: list[Entry] = []
        take = self.idle.popleft
        while True:
            try:
                drained.append(take())
            except IndexError:
                return drained

    def refill_idle_locked(self, entries: list[Entry]) -> None:
        """Put survivors of a drain back at the front, in their order (before anything
        returned meanwhile), and serve waiters."""
        self.idle.extendleft(reversed(entries))
        self.dispatch_locked()

    def forget_locked(self, e: Entry) -> Connection:
        """Take an entry out of the books (slot freed, waiters served). Returns its
        connection for the caller to close outside the lock."""
        conn = e.conn if e.conn is not None else (e.wref() if e.wref is not None else None)
        if self.entries.get(e.key) is e:
            if conn is not None and conn.closed != 1:  # its socket is open: its slot stays
                self.closing[id(e)] = e  # counted until close_finished (before the del:
            else:  # an interrupt between the two leaves it counted, never lost)
                self.size -= 1
            del self.entries[e.key]
            self.retired_uses += e.uses
            self.forgotten(e)
        self.out.discard(e)
        e.state = CLOSED
        e.conn = None
        e.wref = None  # drops the weakref, so its callback will not fire for this close
        self.grant_permits_locked()
        return conn  # type: ignore[return-value]

    def discard(self, e: Entry, conn: Connection, reason: str) -> None:
        """Drop a checked-out connection (failed validation, ...)."""
        with self.lock:
            self.forget_locked(e)
        self.close_conn(e, conn, reason)

    def collect_orphans_locked(self) -> None:
        """Checked-out connections that were garbage-collected give their slots back."""
        while self.orphans:
            wref = self.orphans.popleft()
            for e in self.entries.values():
                if e.wref is wref:
                    break
            else:
                continue
            logger.warning(
                "pool %s: a checked-out connection (pid=%s) was garbage-collected without being "
                "returned; its slot is freed", self.name, e.backend_pid,
            )
            self.forget_locked(e)
            self.counters.closed("garbage_collected")

    def reset_after_fork(self) -> list[Entry]:
        """In a forked child: empty books, a new lock. Returns the inherited entries."""
        self.lock = _allocate_lock()
        inherited = list(self.entries.values())
        self.entries.clear()
        self.idle.clear()
        self.out.clear()
        self.waiters.clear()
        self.orphans.clear()
        self.closing.clear()
        self.size = self.opening = 0
        self.prewarming = 0  # the parent's in-flight prewarm never lands here
        self.sync_prewarm = False
        return inherited

    # -- figures ------------------------------------------------------------------------------

    def checkouts_locked(self) -> int:
        return self.retired_uses + sum(e.uses for e in self.entries.values())

    def counts_locked(self) -> dict[str, int]:
        return {
            "size": self.size,
            "idle": len(self.idle),
            "in_use": len(self.out),  # the checked-out set is exactly the entries in use
            "waiting": len(self.waiters),
        }
