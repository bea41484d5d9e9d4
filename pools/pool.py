"""ConnectionPool: a thread-safe pool of psycopg2 connections.

The hot path takes no lock. An idle connection is checked out with an atomic ``popleft`` (or
``pop``, LIFO) of the idle deque and given back with an atomic ``append``; an entry popped is
its taker's alone. Ownership is membership of the checked-out set, and the atomic removal from
it on return makes a second return of the same connection fail, even a concurrent one. A
connection used in the last ``validation_bypass`` seconds and not expired is handed out after a
single comparison (``Entry.fresh_until``).

Everything else sits behind one lock, ``_lock``, held for bookkeeping only (connections are
opened, pinged, rolled back and closed outside it): waiting, opening, and maintenance, which
drains and refills the idle deque rather than walking it. A caller that finds nothing idle opens
a connection itself while the pool is below ``maxconn`` (or takes a prewarm connection already
under way); at ``maxconn`` it waits in a fair FIFO queue, and a returned connection (or a freed
slot) goes to the oldest waiter. A return made without the lock looks for waiters after it
published, and a waiter looks at the idle deque after it queued: one of the two always sees the
other. Each waiter has its own signal; handoffs happen under the lock, so a waiter that timed out
either got its connection first or leaves the queue empty-handed.

Maintenance (prewarm, idle reaping, lifetime expiry, DNS refresh, rebalancing, role checks)
runs on the process's one supervisor thread through ``_maintain(now)``; getconn/putconn never
wait for it.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
import random
import socket
import threading
import time
import traceback
import weakref
from _thread import allocate_lock as _allocate_lock
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any

import psycopg2
import psycopg2.extensions as ext

from .clock import REAL_CLOCK, Clock, RealClock
from .connector import ConnectFailed, Connector
from .entry import CLOSED, IDLE, IN_USE, RETURNING, Entry
from .errors import (
    BadConnectionError,
    ConnectError,
    PoolClosed,
    PoolError,
    PoolTimeout,
    PoolTooManyWaiters,
)
from .resolver import DnsSettings, HostResolver
from .supervisor import Supervisor, get_supervisor

__all__ = ["ConnectionPool"]

logger = logging.getLogger(__name__)

Connection = ext.connection

_TX_IDLE = ext.TRANSACTION_STATUS_IDLE
_TX_INTRANS = ext.TRANSACTION_STATUS_INTRANS
_TX_INERROR = ext.TRANSACTION_STATUS_INERROR

RECHECK_INTERVAL_S = 60.0  # maintenance looks at every pool at least this often
WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
READ_ONLY_SQLSTATE = "25006"  # read_only_sql_transaction: a write reached a read-only server
ROLES = ("any", "writer", "reader")
_pool_counter = iter(range(1, 1 << 62))

# Close reasons that mean something went wrong (logged as warnings); the others are routine.
_WARN_REASONS = frozenset({"broken", "validation", "garbage_collected", "reset_failed"})


class _Waiter:
    """A caller waiting for a connection. Given, under the pool's lock, exactly one of: a
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


class _PingGuard:
    """A ping's deadline, kept by the supervisor: at the deadline, if the ping still runs, its
    socket is shut down (the blocked read returns at once with an error). The lock makes the
    shutdown and the ping's end exclusive, so a descriptor number reused after the ping never
    gets shut down."""

    __slots__ = ("fd", "lock", "done", "expired")

    def __init__(self, conn: Connection) -> None:
        self.fd = conn.fileno()
        self.lock = _allocate_lock()
        self.done = False
        self.expired = False

    def expire(self) -> None:
        with self.lock:
            if self.done:
                return
            self.expired = True
            try:
                sock = socket.socket(fileno=os.dup(self.fd))
            except OSError:
                return
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def finish(self) -> None:
        with self.lock:
            self.done = True


_guarded_classes: dict[type, type] = {}
_pool_of_conn: weakref.WeakValueDictionary[int, ConnectionPool] = weakref.WeakValueDictionary()


def _guarded_cursor_class(base: type) -> type:
    """A cursor class (on ``base``, the connection's own cursor factory) whose execute,
    executemany and callproc are bounded by its pool's ``query_timeout``: nothing in libpq
    bounds a query on a frozen server, so the pool's watchdog cuts the connection instead."""
    cls = _guarded_classes.get(base)
    if cls is not None:
        return cls

    def guarded(name: str) -> Any:
        method = getattr(base, name)

        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            pool = _pool_of_conn.get(id(self.connection))
            if pool is None:
                return method(self, *args, **kwargs)
            with pool._query_guard(self.connection):
                return method(self, *args, **kwargs)

        run.__name__ = name
        return run

    cls = type(f"Bounded{base.__name__}", (base,), {
        "execute": guarded("execute"),
        "executemany": guarded("executemany"),
        "callproc": guarded("callproc"),
    })
    _guarded_classes[base] = cls
    return cls


class _Checkout:
    """``with pool.conn() as conn``: returns the connection on exit (rolled back if a
    transaction is open; discarded if the exception broke it)."""

    __slots__ = ("_pool", "_timeout", "_conn")

    def __init__(self, pool: ConnectionPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: Connection | None = None

    def __enter__(self) -> Connection:
        self._conn = conn = self._pool.getconn(self._timeout)
        return conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if exc is not None and getattr(exc, "pgcode", None) == READ_ONLY_SQLSTATE:
                self._pool.report_read_only(conn)
            self._pool.putconn(conn)


class ConnectionPool:
    """A pool of psycopg2 connections.

    The first seven parameters are those of psycopg2_pool2's ``ConnectionPool`` (in its order);
    everything else is keyword-only. Unknown keywords are libpq connection parameters (``host``,
    ``port``, ``dbname``, ``user``, ``connect_timeout``, ...), merged over ``dsn``.

    :param minconn: connections kept open (prewarmed, refilled by the supervisor).
    :param maxconn: never more connections than this, opening ones included.
    :param idle_timeout: seconds a connection above ``minconn`` may sit idle before it is reaped
        (``None``: never).
    :param reap_idle_interval: seconds between idle reaps by the supervisor (0: never; call
        :meth:`reap_idle_connections` yourself).
    :param lifetime_timeout: a connection's lifetime in seconds, each jittered by
        ±``lifetime_jitter`` (``None``: forever). Expired idle connections are closed by the
        supervisor; checked-out ones on return.
    :param test_on_borrow: ping a connection (``SELECT 1``) before handing it out, unless it was
        returned less than ``validation_bypass`` seconds ago.
    :param background_prewarm: open ``minconn`` connections on the supervisor thread; when false
        they are opened in the constructor, which raises if it cannot.
    :param timeout: default seconds ``getconn`` waits when the pool is at ``maxconn``; 0 raises
        :class:`PoolTimeout` at once.
    :param max_waiting: callers allowed to wait at once (0: no limit); beyond it
        :class:`PoolTooManyWaiters` at once.
    :param reuse: ``"fifo"`` (the connection idle longest goes first) or ``"lifo"``.
    :param configure: called once with each new connection before it is first handed out.
    :param reset: called with each returned connection (after the rollback); if it raises, the
        connection is discarded.
    :param autocommit: set ``conn.autocommit`` on every new connection.
    """

    def __init__(
        self,
        minconn: int = 1,
        maxconn: int | float = 10,
        idle_timeout: float | None = 300.0,
        reap_idle_interval: float = 300.0,
        lifetime_timeout: float | None = 86400.0,
        test_on_borrow: bool = True,
        background_prewarm: bool = True,
        *,
        dsn: str | None = None,
        name: str | None = None,
        timeout: float = 30.0,
        max_waiting: int = 0,
        reuse: str = "fifo",
        lifetime_jitter: float = 0.1,
        validation_bypass: float = 0.5,
        configure: Callable[[Connection], None] | None = None,
        reset: Callable[[Connection], None] | None = None,
        autocommit: bool | None = None,
        reconnect_backoff: float = 1.0,
        reconnect_backoff_max: float = 60.0,
        clock: Clock | None = None,
        supervisor: Supervisor | None = None,
        rng: random.Random | None = None,
        dns: DnsSettings | Mapping[str, Any] | None = None,
        resolver: HostResolver | None = None,
        placement: str = "least_connections",
        address_ban: float = 1.0,
        address_ban_max: float = 60.0,
        rebalance_fraction: float = 0.25,
        rebalance_interval: float = 1.0,
        role: str = "any",
        role_check_interval: float = 5.0,
        leak_detection_threshold: float | None = None,
        ping_timeout: float = 5.0,
        query_timeout: float | None = None,
        **connect_kwargs: Any,
    ) -> None:
        _check_sizes(minconn, maxconn)
        _check_non_negative(
            timeout=timeout,
            idle_timeout=idle_timeout,
            reap_idle_interval=reap_idle_interval,
            lifetime_timeout=lifetime_timeout,
            validation_bypass=validation_bypass,
            reconnect_backoff=reconnect_backoff,
        )
        if not 0 <= lifetime_jitter < 1:
            raise ValueError(f"lifetime_jitter must be in [0, 1), got {lifetime_jitter!r}")
        if reuse not in ("fifo", "lifo"):
            raise ValueError(f"reuse must be 'fifo' or 'lifo', got {reuse!r}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting!r}")
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if role == "writer" and connect_kwargs.get("target_session_attrs") in (None, "any"):
            # a writer pool connects only where writes are accepted
            connect_kwargs["target_session_attrs"] = "read-write"
        if not 0 < rebalance_fraction <= 1:
            raise ValueError(f"rebalance_fraction must be in (0, 1], got {rebalance_fraction!r}")

        self.name = name or f"pool-{next(_pool_counter)}"
        self._clock = clock or (supervisor.clock if supervisor else REAL_CLOCK)
        # the hot path reads time through a plain function (the builtin, for the real clock)
        self._now: Callable[[], float] = (
            time.monotonic if isinstance(self._clock, RealClock) else self._clock.monotonic
        )
        self._supervisor = supervisor or get_supervisor()
        self._rng = rng or random.Random()
        self._connector = Connector(
            dsn, dns=dns, resolver=resolver, clock=self._clock, placement=placement,
            ban_initial=address_ban, ban_max=address_ban_max, rng=self._rng, name=self.name,
            **connect_kwargs,
        )
        self.rebalance_fraction = rebalance_fraction
        self.rebalance_interval = rebalance_interval
        self._role = role
        self._role_aware = role != "any"
        self._return_hooks = reset is not None or self._role_aware
        self.role_check_interval = role_check_interval
        self._leak_threshold = leak_detection_threshold or None
        self.ping_timeout = ping_timeout
        self.query_timeout = query_timeout
        self._next_role_check_at = 0.0
        self._n_role_changes = 0
        self._lock = threading.Lock()

        # settings (changed only through resize()/retune(), under the lock)
        self._minconn = minconn
        self._maxconn = maxconn
        self.idle_timeout = idle_timeout
        self.reap_idle_interval = reap_idle_interval
        self.lifetime_timeout = lifetime_timeout
        self.lifetime_jitter = lifetime_jitter
        self._test_on_borrow = test_on_borrow
        self._validation_bypass = validation_bypass
        self._ping_after = validation_bypass if test_on_borrow else math.inf
        self.timeout = timeout
        self.max_waiting = max_waiting
        self._fifo = reuse == "fifo"
        self._configure = configure
        self._reset = reset
        self._cap: int | float = maxconn  # maxconn; -1 once closed (one test on the hot path)
        self._autocommit = autocommit
        self._backoff_initial = reconnect_backoff
        self._backoff_max = max(reconnect_backoff_max, reconnect_backoff)

        # state, under _lock
        self._idle: deque[Entry] = deque()
        self._take: Callable[[], Entry] = self._idle.popleft if reuse == "fifo" else self._idle.pop
        self._out: set[Entry] = set()  # checked out (membership is the ownership test)
        self._retired_uses = 0  # checkouts of connections no longer in the pool
        self._entries: dict[int, Entry] = {}
        self._size = 0  # open + opening: the number maxconn bounds
        self._opening = 0
        self._prewarming = 0  # of _opening: connects by the supervisor, for the pool
        self._sync_prewarm = False  # the constructor is opening minconn itself
        self._waiters: deque[_Waiter] = deque()
        self._closed = False
        self._pid = os.getpid()
        now = self._clock.monotonic()
        self._next_reap_at = now + reap_idle_interval if reap_idle_interval else math.inf
        self._backoff_s = 0.0
        self._backoff_until = 0.0
        self._rebalance_tick_end = 0.0
        self._moves_this_tick = 0
        self._last_connect_error: BaseException | None = None
        # orphans: weakrefs of checked-out connections that were garbage-collected. Appended
        # lock-free by the weakref callback (which may run inside any code, even under _lock).
        self._orphans: deque[Any] = deque()

        # counters, under _lock
        self._n_opened = 0
        self._closed_by: dict[str, int] = {}
        self._n_timeouts = 0
        self._n_connect_errors = 0
        self._n_waits = 0
        self._wait_total_s = 0.0
        self._wait_max_s = 0.0
        self._wait_counts = [0] * (len(WAIT_BUCKETS_S) + 1)  # per bucket; the last: beyond
        self._n_rollbacks = 0
        self._n_leaks = 0

        self._task = self._supervisor.register(self, due=math.inf)
        _live_pools.add(self)
        orphans, request, task = self._orphans, self._supervisor.request, self._task

        def on_lost(wref: Any) -> None:
            orphans.append(wref)
            request(task)

        self._on_lost = on_lost

        logger.info(
            "pool %s: created (%s, minconn=%s, maxconn=%s)",
            self.name, self._connector.describe(), minconn, maxconn,
        )
        if minconn and not background_prewarm:
            self._prewarm_now()
        self._supervisor.request(self._task)

    # -- public API -------------------------------------------------------------------------

    @property
    def minconn(self) -> int:
        return self._minconn

    @property
    def maxconn(self) -> int | float:
        return self._maxconn

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def test_on_borrow(self) -> bool:
        return self._test_on_borrow

    @test_on_borrow.setter
    def test_on_borrow(self, value: bool) -> None:
        self._test_on_borrow = bool(value)
        self._ping_after = self._validation_bypass if value else math.inf
        self._refresh_fresh_until()

    @property
    def validation_bypass(self) -> float:
        return self._validation_bypass

    @validation_bypass.setter
    def validation_bypass(self, value: float) -> None:
        self._validation_bypass = value
        self._ping_after = value if self._test_on_borrow else math.inf
        self._refresh_fresh_until()

    @property
    def role(self) -> str:
        return self._role

    @property
    def leak_detection_threshold(self) -> float | None:
        return self._leak_threshold

    @leak_detection_threshold.setter
    def leak_detection_threshold(self, value: float | None) -> None:
        self._leak_threshold = value or None
        self._refresh_fresh_until()
        self._supervisor.request(self._task)

    def conn(self, timeout: float | None = None) -> _Checkout:
        """``with pool.conn() as conn:`` check out a connection and give it back on exit."""
        return _Checkout(self, timeout)

    def getconn(self, timeout: float | None = None) -> Connection:
        """Check out a connection: an idle one, else a new one below ``maxconn``, else wait up
        to ``timeout`` seconds (default: the pool's ``timeout``; 0: raise at once)."""
        # The hot path takes no lock: the idle queue's pop is atomic, and an entry popped is
        # this thread's alone. An entry that is expired, or needs a ping or a role check, and
        # an empty queue, go to the slow path (under the lock).
        try:
            e: Entry | None = self._take()
        except IndexError:
            e = None  # (leave the except block: errors raised later must not chain to it)
        if e is None:
            return self._getconn_slow(timeout, None)
        now = self._now()
        if now < e.fresh_until:
            conn = e.conn
            e.conn = None
            e.state = IN_USE
            e.checked_out_at = now
            e.uses += 1
            self._out.add(e)
            return conn  # type: ignore[return-value]
        return self._getconn_slow(timeout, e)

    def _getconn_slow(self, timeout: float | None, popped: Entry | None) -> Connection:
        conn = self._getconn_slow_body(timeout, popped)
        if self._leak_threshold:
            self._note_checkout(conn)
        return conn

    def _note_checkout(self, conn: Connection) -> None:
        """Leak detection: remember where this checkout happened (the caller's stack)."""
        e = self._entries.get(id(conn))
        if e is not None:
            e.checkout_stack = "".join(traceback.format_stack(limit=16)[:-3])
            e.leak_warned = False

    def _check_leaks(self, now: float) -> float:
        """Warn, once per checkout, about connections held longer than the threshold, with
        the stack that checked them out. Returns when to look again."""
        threshold = self._leak_threshold
        nxt = math.inf
        if not threshold:
            return nxt
        for e in list(self._out):
            if e.checkout_stack is None or e.leak_warned:
                continue
            due = e.checked_out_at + threshold
            if now >= due:
                e.leak_warned = True
                self._n_leaks += 1
                logger.warning(
                    "pool %s: connection pid=%s to %s has been checked out for %.1f s "
                    "(leak_detection_threshold %g s); it was checked out at:\n%s",
                    self.name, e.backend_pid, e.address, now - e.checked_out_at, threshold,
                    e.checkout_stack.rstrip(),
                )
            else:
                nxt = min(nxt, due)
        return nxt

    def _getconn_slow_body(self, timeout: float | None, popped: Entry | None) -> Connection:
        if popped is not None:
            conn = self._checkout_popped(popped, timeout)
            if conn is not None:
                return conn
        while True:
            lock = self._lock
            with lock:
                if self._orphans:
                    self._collect_orphans_locked()
                if self._closed:
                    raise self._closed_error()
                e = None
                if self._idle and not self._waiters:
                    e = self._take_or_none()
                    if e is None:  # taken by a lock-free checkout meanwhile
                        continue
                elif self._size < self._maxconn and (
                        len(self._waiters) >= self._prewarming or not self._may_wait(timeout)):
                    self._size += 1
                    self._opening += 1
                else:
                    # at maxconn, behind other waiters, or a prewarm connect is under way
                    # (take it when it lands rather than race it for the same CPU and server)
                    conn = self._wait_locked(timeout)
                    if conn is not None:
                        return conn
                    # else: a permit to open a connection (slot already counted)
            if e is None:
                budget = self.timeout if timeout is None else timeout
                return self._open_checked_out(time.monotonic() + budget if budget > 0 else None)
            conn = self._checkout_popped(e, timeout)
            if conn is not None:
                return conn

    def _checkout_popped(self, e: Entry, timeout: float | None = None) -> Connection | None:
        """An entry taken from the idle queue: closed if expired, else checked out, pinged if
        it has not been used for a while, role-checked on writer/reader pools. Returns the
        connection, or None if it was not fit to hand out."""
        now = self._now()
        conn = e.conn
        assert conn is not None
        if now >= e.expires_at:
            with self._lock:
                self._forget_locked(e)
            self._close_conn(e, conn, e.doom_reason or "lifetime")
            return None
        e.conn = None
        e.state = IN_USE
        e.checked_out_at = now
        e.uses += 1
        self._out.add(e)
        if e.needs_ping or now - e.last_used_at >= self._ping_after:
            e.needs_ping = False
            budget = self.timeout if timeout is None else timeout
            if not self._ping(conn, e, budget if budget > 0 else None):
                self._discard(e, conn, "validation")
                return None
        if self._role_aware and self._role_changed(e, conn):
            self._discard(e, conn, e.doom_reason or "role_change")
            return None
        return conn

    def putconn(self, conn: Connection, close: bool = False) -> None:
        """Give a connection back. Uncommitted work is rolled back; a broken, closed or expired
        connection is closed and its slot freed; ``close=True`` closes it. A connection this pool
        does not hold as checked out raises :class:`BadConnectionError`, leaving the pool as
        it was."""
        e = self._entries.get(id(conn))
        if e is None or (w := e.wref) is None or w() is not conn:
            e = self._entry_for_return(conn)
        try:
            self._out.remove(e)  # atomic: of two returns of one connection, one wins
        except KeyError:
            raise BadConnectionError(
                f"pool {self.name!r}: connection returned twice (it is already idle)",
                pool=self.name,
            ) from None
        try:
            status = conn.get_transaction_status()
        except psycopg2.InterfaceError:  # closed, by the user or by a broken link
            status = -1
        now = self._now()
        if (status or close or self._return_hooks or now >= e.expires_at
                or self._size > self._cap):
            self._putconn_slow(e, conn, close, status)
            return
        # The hot path takes no lock: publish the entry to the idle queue (atomic append),
        # then look for waiters or a close that may have come meanwhile.
        e.last_used_at = now
        fresh = now + self._ping_after
        e.fresh_until = fresh if fresh < e.expires_at else e.expires_at
        if e.doom_reason is not None:  # doomed while returning: never fresh (see _doom)
            e.fresh_until = -math.inf
        e.conn = conn
        e.state = IDLE
        self._idle.append(e)
        if self._waiters or self._closed:
            self._after_publish()

    def _fresh_until(self, e: Entry, used_at: float) -> float:
        """Until when ``e`` may be handed out without any check (see Entry.fresh_until)."""
        if self._role_aware or self._leak_threshold:
            # every checkout takes the slow path: the server's role is looked at (no round
            # trip), or the checkout's stack recorded for leak detection
            return -math.inf
        return min(e.expires_at, used_at + self._ping_after)

    def _refresh_fresh_until(self) -> None:
        with self._lock:
            for e in list(self._idle):
                e.fresh_until = self._fresh_until(e, e.last_used_at)

    def _after_publish(self) -> None:
        """After a lock-free return: serve waiters from the idle queue, or, if the pool closed
        meanwhile, close what is idle."""
        with self._lock:
            if self._closed:
                conns = [(e, self._forget_locked(e)) for e in self._drain_idle_locked()]
            else:
                self._dispatch_locked()
                return
        for e, conn in conns:
            self._close_conn(e, conn, "pool_closed")

    def _may_wait(self, timeout: float | None) -> bool:
        return (self.timeout if timeout is None else timeout) > 0

    def _take_or_none(self) -> Entry | None:
        try:
            return self._take()
        except IndexError:
            return None

    def _dispatch_locked(self) -> None:
        """Hand idle connections to waiters, oldest first, while there are both."""
        while self._waiters:
            e = self._take_or_none()
            if e is None:
                return
            conn = e.conn
            assert conn is not None
            self._handoff_locked(e, conn)

    def _putconn_slow(self, e: Entry, conn: Connection, close: bool, status: int) -> None:
        """A return that needs work first: a rollback, a reset, a role check, or a close. The
        entry is already out of the checked-out set."""
        reason: str | None = "requested" if close else None
        if reason is None:
            if status < 0 or conn.closed:
                reason = "broken"
            else:
                if status != _TX_IDLE:
                    reason = self._rollback(conn, status)
                if reason is None and self._reset is not None:
                    reason = self._run_reset(conn)
        if reason is None and self._role_aware and self._role_changed(e, conn):
            reason = e.doom_reason or "role_change"
        now = self._now()
        if reason is None and now >= e.expires_at:
            reason = e.doom_reason or "lifetime"
        with self._lock:
            if reason is None and self._size > self._cap:
                reason = "pool_closed" if self._closed else "resize"
            if reason is None:
                e.last_used_at = now
                e.fresh_until = self._fresh_until(e, now)
                if self._waiters:
                    self._handoff_locked(e, conn)
                else:
                    e.conn = conn
                    e.state = IDLE
                    self._idle.append(e)
                return
            e.state = RETURNING
            self._forget_locked(e)
        self._close_conn(e, conn, reason)

    def reap_idle_connections(self) -> int:
        """Close idle connections above ``minconn`` that have been idle longer than
        ``idle_timeout``, and idle ones past their lifetime. Returns how many were closed."""
        return self._reap(self._clock.monotonic(), reap_idle=True)

    def owns(self, conn: object) -> bool:
        """Whether ``conn`` is a connection this pool gave out and has not had back."""
        e = self._entries.get(id(conn))
        return e is not None and e.wref is not None and e.wref() is conn and e in self._out

    # Settings a running pool takes in place; everything else is connection identity.
    LIVE_SETTINGS = frozenset({
        "minconn", "maxconn", "idle_timeout", "reap_idle_interval", "lifetime_timeout",
        "lifetime_jitter", "test_on_borrow", "background_prewarm", "timeout", "max_waiting",
        "reuse", "validation_bypass", "reconnect_backoff", "reconnect_backoff_max", "placement",
        "address_ban", "address_ban_max", "rebalance_fraction", "rebalance_interval",
        "role_check_interval", "leak_detection_threshold", "ping_timeout",
    })

    def retune(self, **settings: Any) -> None:
        """Apply settings in place (sizes, timeouts, reuse order, placement, bans...). A new
        ``lifetime_timeout`` applies to connections opened from now on."""
        unknown = set(settings) - self.LIVE_SETTINGS
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)} on a running pool")
        maxconn = settings.pop("maxconn", self._maxconn)
        minconn = settings.pop("minconn", self._minconn)
        _check_non_negative(**{k: v for k, v in settings.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)})
        book = self._connector.book
        if "placement" in settings:
            book.set_placement(settings.pop("placement"))
        if "address_ban" in settings or "address_ban_max" in settings:
            book.set_bans(settings.pop("address_ban", book.ban_initial),
                          settings.pop("address_ban_max", book.ban_max))
        if "reuse" in settings:
            reuse = settings.pop("reuse")
            if reuse not in ("fifo", "lifo"):
                raise ValueError(f"reuse must be 'fifo' or 'lifo', got {reuse!r}")
            self._fifo = reuse == "fifo"
            self._take = self._idle.popleft if self._fifo else self._idle.pop
        if "reconnect_backoff" in settings:
            self._backoff_initial = settings.pop("reconnect_backoff")
        if "reconnect_backoff_max" in settings:
            self._backoff_max = settings.pop("reconnect_backoff_max")
        settings.pop("background_prewarm", None)  # only meaningful at start
        if "reap_idle_interval" in settings:
            interval = settings.pop("reap_idle_interval")
            self.reap_idle_interval = interval
            self._next_reap_at = self._clock.monotonic() + interval if interval else math.inf
        for key, value in settings.items():
            setattr(self, key, value)
        if (maxconn, minconn) != (self._maxconn, self._minconn):
            self.resize(maxconn, minconn)
        else:
            self._supervisor.request(self._task)
        logger.info("pool %s: retuned %s", self.name, sorted(settings) or "sizes")

    def set_dns(self, dns: DnsSettings | Mapping[str, Any] | None) -> None:
        """Resolve with new DNS settings from now on (answers are fetched afresh)."""
        self._connector.resolver = HostResolver(dns, self._clock)
        self._supervisor.request(self._task)

    def clear_idle(self, reason: str = "cleared") -> int:
        """Close every idle connection now, whatever ``minconn`` says (the supervisor refills
        to ``minconn`` afterwards). Returns how many were closed."""
        with self._lock:
            conns = [(e, self._forget_locked(e)) for e in self._drain_idle_locked()]
        for e, conn in conns:
            self._close_conn(e, conn, reason)
        return len(conns)

    def resize(self, maxconn: int | float, minconn: int | None = None) -> None:
        """Change the sizes live. Growing serves waiters at once; shrinking closes surplus idle
        connections now and surplus checked-out ones on return."""
        new_min = self._minconn if minconn is None else minconn
        _check_sizes(new_min, maxconn)
        with self._lock:
            self._maxconn = maxconn
            self._minconn = new_min
            if not self._closed:
                self._cap = maxconn
            self._grant_permits_locked()
        logger.info("pool %s: resized to minconn=%s maxconn=%s", self.name, new_min, maxconn)
        self._reap(self._clock.monotonic(), reap_idle=False)
        self._supervisor.request(self._task)

    def close(self) -> None:
        """Close the pool: idle connections now, checked-out ones when they come back. Waiters
        and later calls get :class:`PoolClosed`. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cap = -1
            while self._waiters:
                w = self._waiters.popleft()
                w.error = self._closed_error()
                w.wake()
            # in the same locked step (a return racing this sees _closed and closes its own)
            conns = [(e, self._forget_locked(e)) for e in self._drain_idle_locked()]
        self._supervisor.unregister(self._task)
        for e, conn in conns:
            self._close_conn(e, conn, "pool_closed")
        logger.info("pool %s: closed", self.name)

    def close_all(self) -> None:
        """Close the pool and every connection it gave out, in use or not (psycopg2's
        ``closeall``)."""
        with self._lock:
            in_use = [e.wref() for e in self._entries.values() if e.wref is not None]
        self.close()
        for conn in in_use:
            if conn is not None and not conn.closed:
                _close_quietly(conn)

    def stats(self) -> dict[str, Any]:
        """Sizes and counters: a snapshot taken under the lock."""
        with self._lock:
            if self._orphans:
                self._collect_orphans_locked()
            closed_total = sum(self._closed_by.values())
            checkouts = self._checkouts_locked()
            err = self._last_connect_error
            return {
                "name": self.name,
                "minconn": self._minconn,
                "maxconn": self._maxconn,
                "size": self._size,
                "idle": len(self._idle),
                "in_use": self._in_use_locked(),
                "opening": self._opening,
                "waiting": len(self._waiters),
                "closed": self._closed,
                "connections_opened": self._n_opened,
                "connections_closed": closed_total,
                "closed_by_reason": dict(self._closed_by),
                "checkouts": checkouts,
                "checkout_timeouts": self._n_timeouts,
                "connect_errors": self._n_connect_errors,
                "last_connect_error": _summarise_error(err) if err else None,
                "waits": self._n_waits,
                "wait_total_s": self._wait_total_s,
                "wait_max_s": self._wait_max_s,
                "wait_histogram": self._wait_histogram_locked(checkouts),
                "rollbacks": self._n_rollbacks,
                "leaks_detected": self._n_leaks,
                "placement": self._connector.placement,
                "role": self.role,
                "role_changes": self._n_role_changes,
                "addresses": self._address_stats_locked(),
                "dns": self._dns_stats(),
            }

    def _address_stats_locked(self) -> dict[str, dict[str, Any]]:
        now = self._clock.monotonic()
        addresses = self._connector.book.snapshot(now)
        for a in addresses.values():
            a["in_use"] = 0
            a["idle"] = 0
        for e in self._entries.values():
            row = addresses.get(e.address)
            if row is None:
                continue
            if e.state == IDLE:
                row["idle"] += 1
            elif e.state in (IN_USE, RETURNING):
                row["in_use"] += 1
        return addresses

    def _dns_stats(self) -> dict[str, dict[str, Any]]:
        now = self._clock.monotonic()
        names = {t.host.lower() for t in self._connector.targets if t.needs_dns}
        out: dict[str, dict[str, Any]] = {}
        if not names:
            return out
        for name, ans in self._connector.resolver.answers().items():
            if name not in names:
                continue
            out[name] = {
                "addresses": list(ans.addresses),
                "ttl_s": ans.ttl,
                "expires_in_s": ans.expires_at - now,
                "stale": ans.stale,
                "queries": ans.queries,
                "refresh_failures": ans.refresh_failures,
                "stale_served": ans.stale_served,
                "last_error": ans.last_error,
            }
        return out

    def status(self) -> dict[str, int | float]:
        """psqlpy's four figures."""
        with self._lock:
            return {
                "max_size": self._maxconn,
                "size": self._size,
                "available": len(self._idle),
                "waiting": len(self._waiters),
            }

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"size={self._size}/{self._maxconn}"
        return f"<ConnectionPool {self.name!r} {self._connector.describe()} {state}>"

    # -- waiting ----------------------------------------------------------------------------

    def _wait_locked(self, timeout: float | None) -> Connection | None:
        """Wait (holding ``_lock`` on entry and exit) for a handoff. Returns the connection, or
        None with a permit to open one; raises on timeout."""
        if timeout is None:
            timeout = self.timeout
        if timeout <= 0:
            self._n_timeouts += 1
            raise self._timeout_error(0.0, timeout)
        if self.max_waiting and len(self._waiters) >= self.max_waiting:
            self._n_timeouts += 1
            raise self._timeout_error(0.0, timeout, too_many=True)
        w = _Waiter()
        self._waiters.append(w)
        # a lock-free return may have published just before we queued: serve the queue
        if self._idle:
            self._dispatch_locked()
        t0 = time.monotonic()
        deadline = t0 + timeout
        lock = self._lock
        try:
            while w.conn is None and not w.permit and w.error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                lock.release()
                try:
                    w.signal.acquire(True, remaining)
                finally:
                    lock.acquire()
        except BaseException:
            # Interrupted (KeyboardInterrupt, ...): whatever was handed over goes back.
            self._abandon_wait_locked(w)
            raise
        waited = time.monotonic() - t0
        self._n_waits += 1
        self._wait_counts[bisect.bisect_left(WAIT_BUCKETS_S, waited)] += 1
        self._wait_total_s += waited
        if waited > self._wait_max_s:
            self._wait_max_s = waited
        if w.error is not None:
            raise w.error
        if w.conn is not None or w.permit:
            return w.conn
        # Timed out with nothing handed over: leave the queue (nothing can be handed to us
        # any more, since handoffs happen under the lock we hold).
        self._waiters.remove(w)
        self._n_timeouts += 1
        raise self._timeout_error(waited, timeout)

    def _abandon_wait_locked(self, w: _Waiter) -> None:
        if w.conn is not None:
            e = self._entries.get(id(w.conn))
            if e is not None and e in self._out:
                self._out.discard(e)
                e.uses -= 1  # it never reached its caller
                self._release_new_locked(e, w.conn)
        elif w.permit:
            self._size -= 1
            self._opening -= 1
            self._grant_permits_locked()
        elif w in self._waiters:
            self._waiters.remove(w)

    def _handoff_locked(self, e: Entry, conn: Connection) -> None:
        """Check ``e`` out to the oldest waiter."""
        w = self._waiters.popleft()
        e.conn = None
        e.state = IN_USE
        e.checked_out_at = self._now()
        e.uses += 1
        self._out.add(e)
        w.conn = conn
        w.wake()

    def _grant_permits_locked(self) -> None:
        """Free slots go to the oldest waiters, as permits to open a connection."""
        while self._waiters and self._size < self._maxconn:
            w = self._waiters.popleft()
            self._size += 1
            self._opening += 1
            w.permit = True
            w.wake()

    def _release_new_locked(self, e: Entry, conn: Connection) -> None:
        """A connection joins the idle queue (opened by maintenance, or given back by a
        waiter that left): to a waiter if one waits."""
        if self._waiters:
            self._handoff_locked(e, conn)
        else:
            e.state = IDLE
            e.conn = conn
            self._idle.append(e)

    def _drain_idle_locked(self) -> list[Entry]:
        """Take every entry out of the idle queue, in order (one pop at a time: lock-free
        checkouts may pop concurrently; nothing is lost or taken twice)."""
        drained: list[Entry] = []
        take = self._idle.popleft
        while True:
            try:
                drained.append(take())
            except IndexError:
                return drained

    def _refill_idle_locked(self, entries: list[Entry]) -> None:
        """Put survivors of a drain back at the front, in their order (before anything
        returned meanwhile), and serve waiters."""
        self._idle.extendleft(reversed(entries))
        self._dispatch_locked()

    # -- opening ----------------------------------------------------------------------------

    def _open_entry(
        self, deadline: float | None = None, prefer: str | None = None
    ) -> tuple[Entry, Connection]:
        """Open one connection for a slot already counted in ``_size``. On failure the slot is
        given back and :class:`ConnectError` raised. Runs without the lock."""
        try:
            conn, address = self._connector.connect(deadline, prefer)
        except ConnectFailed as exc:
            cause = exc.__cause__ or exc
            self._open_failed(cause)
            if self._connector.refresh_soon():  # the answer may be out of date: ask again now
                self._supervisor.request(self._task)
            raise ConnectError(f"pool {self.name!r}: {exc}", pool=self.name) from cause
        except Exception as exc:
            self._open_failed(exc)
            raise ConnectError(
                f"pool {self.name!r}: cannot connect to {self._connector.host_label}: "
                f"{_summarise_error(exc)}",
                pool=self.name,
            ) from exc
        finally:
            self._maybe_retire_removed()
        try:
            self._prepare(conn)
        except BaseException as exc:
            _close_quietly(conn)
            self._connector.book.closed(address.label)
            self._open_failed(exc)
            if isinstance(exc, PoolError):
                raise
            raise PoolError(
                f"pool {self.name!r}: configuring a new connection failed: {exc!r}", pool=self.name
            ) from exc
        now = self._clock.monotonic()
        e = Entry(
            conn,
            address=address.label,
            created_at=now,
            expires_at=self._expiry(now),
            on_lost=self._on_lost,
        )
        e.server_role = server_role(conn)
        e.fresh_until = self._fresh_until(e, now)
        e.state = RETURNING  # owned by the opener until it hands it over
        with self._lock:
            if self._orphans:  # before reusing an id(conn) key an orphan may still hold
                self._collect_orphans_locked()
            self._opening -= 1
            self._entries[e.key] = e
            self._n_opened += 1
            if self.query_timeout:
                _pool_of_conn[e.key] = self
            self._backoff_s = 0.0
            self._backoff_until = 0.0
            below_min = self._size < self._minconn
        if below_min:  # prewarm waits while a caller connects: it may go on now
            self._supervisor.request(self._task)
        logger.debug("pool %s: opened connection pid=%s to %s", self.name, e.backend_pid, e.address)
        return e, conn

    def _open_failed(self, exc: BaseException) -> None:
        with self._lock:
            self._size -= 1
            self._opening -= 1
            self._n_connect_errors += 1
            self._last_connect_error = exc
            self._grant_permits_locked()
            below_min = self._size < self._minconn
        if below_min:
            self._supervisor.request(self._task)

    def _prepare(self, conn: Connection) -> None:
        if self._autocommit is not None:
            conn.autocommit = self._autocommit
        if self.query_timeout:
            base: Any = conn.cursor_factory
            if base is None or isinstance(base, type):  # (a factory function is left as is)
                conn.cursor_factory = _guarded_cursor_class(base or ext.cursor)
        if self._configure is not None:
            self._configure(conn)
            status = conn.get_transaction_status()
            if status != _TX_IDLE:
                raise PoolError(
                    f"pool {self.name!r}: configure left the connection in a transaction "
                    f"(status {status}); commit or use autocommit in it",
                    pool=self.name,
                )

    def _open_checked_out(self, deadline: float | None) -> Connection:
        e, conn = self._open_entry(deadline)
        with self._lock:
            if self._closed:
                self._forget_locked(e)
                closed = True
            else:
                closed = False
                e.state = IN_USE
                e.conn = None  # checked out: the pool keeps only the weak reference
                e.checked_out_at = e.created_at
                e.uses += 1
                self._out.add(e)
        if closed:
            self._close_conn(e, conn, "pool_closed")
            raise self._closed_error()
        return conn

    def _prewarm_now(self) -> None:
        """Open ``minconn`` connections in this thread (``background_prewarm=False``); the
        supervisor keeps out of it (its prewarm step skips while this runs)."""
        self._sync_prewarm = True
        try:
            self._prewarm_sync_loop()
        finally:
            self._sync_prewarm = False

    def _prewarm_sync_loop(self) -> None:
        for _ in range(self._minconn):
            with self._lock:
                if self._size >= self._minconn:
                    break
                self._size += 1
                self._opening += 1
            try:
                e, conn = self._open_entry()
            except PoolError:
                self.close()
                raise
            with self._lock:
                self._release_new_locked(e, conn)

    def _expiry(self, now: float) -> float:
        lifetime = self.lifetime_timeout
        if not lifetime:
            return math.inf
        j = self.lifetime_jitter
        return now + lifetime * (1.0 + self._rng.uniform(-j, j))

    # -- returning and closing --------------------------------------------------------------

    def _rollback(self, conn: Connection, status: int) -> str | None:
        """Roll back what the user left open. Returns a close reason if the connection is no
        good any more."""
        if status not in (_TX_INTRANS, _TX_INERROR):
            return "broken"  # ACTIVE (a query running) or UNKNOWN (connection lost)
        try:
            conn.rollback()
        except Exception as exc:
            logger.warning("pool %s: rollback on return failed (%s): discarding", self.name, exc)
            return "broken"
        with self._lock:
            self._n_rollbacks += 1
        logger.debug("pool %s: rolled back uncommitted work on return", self.name)
        return None

    def _run_reset(self, conn: Connection) -> str | None:
        assert self._reset is not None
        try:
            self._reset(conn)
            if conn.get_transaction_status() != _TX_IDLE:
                conn.rollback()
        except Exception as exc:
            logger.warning("pool %s: reset failed on return (%r): discarding", self.name, exc)
            return "reset_failed"
        return None

    def _ping(self, conn: Connection, e: Entry | None = None,
              budget_s: float | None = None) -> bool:
        """``SELECT 1`` on ``conn``, bounded: nothing in libpq bounds a query on a frozen server
        (its kernel still acknowledges), so a watchdog on the supervisor shuts the socket down
        after ``ping_timeout`` (or the caller's remaining budget, if less). An address whose
        ping timed out is banned, like one whose connect did."""
        limit = self.ping_timeout if budget_s is None else min(self.ping_timeout, budget_s)
        guard = _PingGuard(conn) if limit and limit != math.inf else None
        task = None
        if guard is not None:
            task = self._supervisor.watch(self._clock.monotonic() + limit, guard.expire)
        try:
            ok = self._ping_unguarded(conn)
        finally:
            if guard is not None:
                guard.finish()
                self._supervisor.unregister(task)  # type: ignore[arg-type]
        if guard is not None and guard.expired:
            if e is not None:
                self._connector.book.mark(e.address, self._clock.monotonic(), "timeout")
            logger.warning("pool %s: ping of %s timed out after %.1f s: the server does not "
                           "answer (frozen?); address banned", self.name,
                           e.address if e else "a connection", limit)
        return ok

    @contextlib.contextmanager
    def _query_guard(self, conn: Connection) -> Iterator[None]:
        """Bound one query on ``conn`` by ``query_timeout`` (see _guarded_cursor_class)."""
        limit = self.query_timeout
        if not limit or conn.closed:
            yield
            return
        guard = _PingGuard(conn)
        task = self._supervisor.watch(self._clock.monotonic() + limit, guard.expire)
        try:
            yield
        finally:
            guard.finish()
            self._supervisor.unregister(task)
            if guard.expired:
                e = self._entries.get(id(conn))
                label = e.address if e is not None else "its address"
                if e is not None:
                    self._connector.book.mark(e.address, self._clock.monotonic(), "timeout")
                logger.warning("pool %s: a query on %s ran past query_timeout (%g s): its "
                               "connection was cut and the address banned", self.name, label,
                               limit)

    def _ping_unguarded(self, conn: Connection) -> bool:
        try:
            if conn.closed:
                return False
            autocommit = conn.autocommit
            if not autocommit:
                conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
            finally:
                if not autocommit and not conn.closed:
                    conn.autocommit = False
            return True
        except psycopg2.Error as exc:
            logger.warning(
                "pool %s: connection failed test-on-borrow: %s", self.name, _summarise_error(exc)
            )
            return False

    def _forget_locked(self, e: Entry) -> Connection:
        """Take an entry out of the pool's books (slot freed, waiters served). Returns its
        connection for the caller to close outside the lock."""
        conn = e.conn if e.conn is not None else (e.wref() if e.wref is not None else None)
        if self._entries.get(e.key) is e:
            del self._entries[e.key]
            self._size -= 1
            self._retired_uses += e.uses
            self._connector.book.closed(e.address)
        self._out.discard(e)
        if self.query_timeout:
            _pool_of_conn.pop(e.key, None)
        e.state = CLOSED
        e.conn = None
        e.wref = None  # drops the weakref, so its callback will not fire for this close
        self._grant_permits_locked()
        return conn  # type: ignore[return-value]

    def _discard(self, e: Entry, conn: Connection, reason: str) -> None:
        """Drop a checked-out connection (failed validation, ...)."""
        with self._lock:
            self._forget_locked(e)
        self._close_conn(e, conn, reason)

    def _close_conn(self, e: Entry, conn: Connection | None, reason: str) -> None:
        """Close one connection that is out of the books. Never under the lock."""
        with self._lock:
            self._closed_by[reason] = self._closed_by.get(reason, 0) + 1
            below_min = self._size < self._minconn and not self._closed
        log = logger.warning if reason in _WARN_REASONS else logger.debug
        log(
            "pool %s: closing connection pid=%s to %s (%s)",
            self.name, e.backend_pid, e.address, reason,
        )
        if conn is not None:
            _close_quietly(conn)
        if below_min:
            self._supervisor.request(self._task)

    def _collect_orphans_locked(self) -> None:
        """Checked-out connections that were garbage-collected give their slots back."""
        while self._orphans:
            wref = self._orphans.popleft()
            for e in self._entries.values():
                if e.wref is wref:
                    break
            else:
                continue
            logger.warning(
                "pool %s: a checked-out connection (pid=%s) was garbage-collected without being "
                "returned; its slot is freed", self.name, e.backend_pid,
            )
            self._forget_locked(e)
            self._closed_by["garbage_collected"] = self._closed_by.get("garbage_collected", 0) + 1

    # -- maintenance (supervisor thread) ----------------------------------------------------

    def _reap(self, now: float, *, reap_idle: bool) -> int:
        """Close idle connections past their lifetime, surplus above ``maxconn`` and (with
        ``reap_idle``) those idle too long above ``minconn``. Returns how many were closed."""
        doomed: list[tuple[Entry, Connection, str]] = []
        with self._lock:
            if self._orphans:
                self._collect_orphans_locked()
            if not self._idle:
                return 0
            drained = self._drain_idle_locked()
            # oldest-idle first, so reaping takes those the pool needs least
            for e in sorted(drained, key=lambda x: x.last_used_at):
                if now >= e.expires_at:
                    reason: str | None = e.doom_reason or "lifetime"
                elif self._size > self._maxconn:
                    reason = "resize"
                elif (
                    reap_idle
                    and self.idle_timeout is not None
                    and now - e.last_used_at >= self.idle_timeout
                    and self._size > self._minconn
                ):
                    reason = "idle"
                else:
                    reason = None
                if reason is not None:
                    doomed.append((e, self._forget_locked(e), reason))
            # the survivors go back in their reuse order
            self._refill_idle_locked([x for x in drained if x.state == IDLE])
        for e, conn, reason in doomed:
            self._close_conn(e, conn, reason)
        return len(doomed)

    def _maintain(self, now: float) -> float | None:
        """One maintenance step (the supervisor calls this): refresh DNS when due and retire
        addresses that left it, close what is due, then open at most one connection (toward
        ``minconn``, or to even the spread over addresses). Returns when to run next."""
        if self._closed:
            return None
        if os.getpid() != self._pid:  # forked: the parent's connections are not ours to touch
            return None
        due = self._connector.refresh_due()
        if due is not None and now >= due:
            self._connector.refresh(now)
            self._maybe_retire_removed()
        reap_idle = bool(self.reap_idle_interval) and now >= self._next_reap_at
        if reap_idle:
            self._next_reap_at = now + self.reap_idle_interval
        self._reap(now, reap_idle=reap_idle)

        if self.role != "any" and now >= self._next_role_check_at:
            self._next_role_check_at = now + self.role_check_interval
            self._check_roles()
        leak_due = self._check_leaks(now)
        opened = self._maybe_prewarm(now)
        busy = opened or self._maybe_rebalance(now)

        with self._lock:
            if self._closed:
                return None
            nxt = now + RECHECK_INTERVAL_S
            if busy:
                nxt = now  # more to do: again, after whatever else is due
            if self._size < self._minconn and self._opening == 0:
                # (while a caller connects, its completion asks for the next step)
                nxt = min(nxt, max(now, self._backoff_until))
            for e in list(self._idle):
                if e.expires_at < nxt:
                    nxt = e.expires_at
            if self.reap_idle_interval and self._size > self._minconn:
                nxt = min(nxt, self._next_reap_at)
            if self.role != "any" and self._idle:
                nxt = min(nxt, self._next_role_check_at)
        due = self._connector.refresh_due()
        if due is not None:
            nxt = min(nxt, max(now, due))
        nxt = min(nxt, leak_due)
        if self._moves_this_tick:  # a tick's moves ran out: look again when it ends
            nxt = min(nxt, max(now, self._rebalance_tick_end))
        return nxt

    def _maybe_prewarm(self, now: float) -> bool:
        """Open one connection if the pool is below ``minconn`` and not backing off, and no
        caller is opening one right now (it would only compete with it; the caller's open
        completing asks for this step again)."""
        with self._lock:
            need = (not self._closed and self._size < self._minconn
                    and now >= self._backoff_until and self._opening == 0
                    and not self._sync_prewarm)
            if need:
                self._size += 1
                self._opening += 1
                self._prewarming += 1
        if not need:
            return False
        try:
            try:
                e, conn = self._open_entry()
            finally:
                with self._lock:
                    self._prewarming -= 1
        except PoolError as exc:
            grown = max(self._backoff_initial, self._backoff_s * 2)
            self._backoff_s = min(self._backoff_max, grown)
            self._backoff_until = now + self._backoff_s * self._rng.uniform(0.9, 1.1)
            logger.warning(
                "pool %s: prewarm failed, retrying in %.1f s: %s",
                self.name, self._backoff_s, exc,
            )
            return False
        self._join(e, conn)
        return True

    def _join(self, e: Entry, conn: Connection) -> None:
        """A connection opened by maintenance joins the pool (or is closed, if it closed)."""
        with self._lock:
            late = self._closed
            if late:
                self._forget_locked(e)
            else:
                self._release_new_locked(e, conn)
        if late:
            self._close_conn(e, conn, "pool_closed")

    # -- roles (writer guard, promoted replicas) -----------------------------------------------

    def _role_changed(self, e: Entry, conn: Connection) -> bool:
        """Whether the server behind ``conn`` no longer has the role this pool needs (or had
        when the connection opened). Free: libpq keeps the server's reported settings
        (``in_hot_standby``, ``default_transaction_read_only``) current with every response.
        A change retires every connection to that address; returns True for this one."""
        now_role = server_role(conn)
        if now_role is None or now_role == e.server_role:
            return False
        if self.role == "writer" and now_role != "primary":
            self._writer_demoted(e.address, f"the server reports {now_role}")
        else:
            self._role_change(e.address, e.server_role, now_role)
        return True

    def report_read_only(self, conn: Connection) -> None:
        """A write failed with SQLSTATE 25006 on ``conn``: on a writer pool, its server is a
        demoted writer. (``pool.conn()`` and registry handles call this for you.)"""
        if self.role != "writer":
            return
        e = self._entries.get(id(conn))
        if e is not None and e.wref is not None and e.wref() is conn:
            self._writer_demoted(e.address, "a write failed: read-only transaction (25006)")

    def _writer_demoted(self, label: str, how: str) -> None:
        """The writer at ``label`` is no more: ban it, close its idle connections now and its
        checked-out ones on return, and re-resolve at once to find the new writer."""
        first = self._connector.book.mark(label, self._clock.monotonic(), "demoted_writer")
        if first:
            self._n_role_changes += 1
            logger.warning(
                "pool %s: %s is no longer the writer (%s): closing its connections, "
                "re-resolving", self.name, label, how,
            )
        self._retire_addresses([label], "demoted_writer")
        self._connector.refresh_soon(force=True)
        self._supervisor.request(self._task)

    def _role_change(self, label: str, before: str | None, after: str) -> None:
        """A server changed role (a replica promoted, a server rebuilt): like a DNS change, its
        connections are retired and opened afresh where placement says."""
        self._n_role_changes += 1
        logger.warning("pool %s: %s changed role (%s -> %s): retiring its connections",
                       self.name, label, before, after)
        self._retire_addresses([label], "role_change")
        self._supervisor.request(self._task)

    def _check_roles(self) -> None:
        """The supervisor's role check: every idle connection is pinged on its next checkout
        (in the caller's thread, bounded by the ping watchdog), which brings the server's
        current role. The supervisor itself never waits on a server here."""
        for e in list(self._idle):
            e.needs_ping = True

    def unreachable(self) -> bool:
        """Nothing to serve with and nowhere to try: no open connection, and every address
        banned (or none known). A registry falls back to another pool then."""
        with self._lock:
            if self._size > 0:
                return False
        return self._connector.all_banned(self._clock.monotonic())

    # -- addresses ----------------------------------------------------------------------------

    @staticmethod
    def _doom(e: Entry, reason: str) -> None:
        """Soft expiry: the connection closes when it comes back (and is never handed out
        again, even by a checkout racing this)."""
        e.doom_reason = reason
        e.expires_at = -math.inf
        e.fresh_until = -math.inf

    def _maybe_retire_removed(self) -> None:
        removed = self._connector.take_removed()
        if removed:
            self._retire_addresses(removed, "dns_change")

    def _retire_addresses(self, labels: list[str], reason: str) -> None:
        """Connections to these addresses: idle ones closed now, checked-out ones on return."""
        gone = set(labels)
        doomed: list[tuple[Entry, Connection]] = []
        n_busy = 0
        with self._lock:
            drained = self._drain_idle_locked()
            for e in drained:
                if e.address in gone:
                    doomed.append((e, self._forget_locked(e)))
            self._refill_idle_locked([e for e in drained if e.state == IDLE])
            for e in list(self._entries.values()):
                # checked out (or being checked out this instant): closed when returned
                if e.address in gone and e.doom_reason is None:
                    self._doom(e, reason)
                    n_busy += 1
        logger.info(
            "pool %s: address(es) %s left DNS: closing %d idle connection(s), %d more on return",
            self.name, ", ".join(sorted(gone)), len(doomed), n_busy,
        )
        for e, conn in doomed:
            self._close_conn(e, conn, reason)
        if doomed:
            self._supervisor.request(self._task)

    def _maybe_rebalance(self, now: float) -> bool:
        """Move one connection from the most to the least loaded healthy address when the
        spread is uneven by more than one: open one on the least loaded (make before break),
        then close an idle one on the most loaded, or mark a checked-out one there to close on
        return. At most ``rebalance_fraction`` of the pool moves per ``rebalance_interval``.
        Returns whether it did something."""
        if self._connector.placement != "least_connections":
            return False
        if now >= self._rebalance_tick_end:
            self._rebalance_tick_end = now + self.rebalance_interval
            self._moves_this_tick = 0
        with self._lock:
            if self._closed or not self._entries:
                return False
            limit = max(1, math.ceil(self.rebalance_fraction * self._size))
            if self._moves_this_tick >= limit:
                return False
            leaving = Counter(e.address for e in self._entries.values() if e.doom_reason)
        found = self._connector.book.balance(now, discount=leaving)
        if found is None:
            return False
        hi, lo, _ = found
        victim_conn: Connection | None = None
        with self._lock:
            if self._closed:
                return False
            victim = next((e for e in list(self._idle) if e.address == hi), None)
            if victim is not None:
                # reserve it: out of the idle queue, so no checkout can take it meanwhile
                try:
                    self._idle.remove(victim)
                except ValueError:
                    return False  # a checkout took it this instant: next time
                victim.state = RETURNING
            else:
                busy = next((e for e in self._entries.values() if e.address == hi
                             and e.state == IN_USE and e.doom_reason is None), None)
                if busy is None:
                    return False
                self._doom(busy, "rebalance")  # closes when it comes back
            self._moves_this_tick += 1
            if self._size < self._maxconn:
                self._size += 1
                self._opening += 1
            elif victim is not None:  # no room to make before break
                victim_conn = self._forget_locked(victim)
                self._size += 1
                self._opening += 1
            else:
                return True  # at maxconn with nothing idle: the return makes room
        if victim_conn is not None:
            self._close_conn(victim, victim_conn, "rebalance")  # type: ignore[arg-type]
        try:
            e, conn = self._open_entry(prefer=lo)
        except PoolError as exc:
            logger.warning("pool %s: rebalancing toward %s failed: %s", self.name, lo, exc)
            if victim is not None and victim_conn is None:  # still good: back to idle
                with self._lock:
                    self._release_new_locked(victim, victim.conn)  # type: ignore[arg-type]
            return False
        self._join(e, conn)
        if victim is not None and victim_conn is None:
            with self._lock:
                victim_conn = self._forget_locked(victim)
            self._close_conn(victim, victim_conn, "rebalance")
        logger.debug("pool %s: moved a connection from %s to %s", self.name, hi, e.address)
        return True

    # -- fork ------------------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """In a child process: forget every inherited connection without closing it (its
        socket is detached first), and start afresh; the supervisor prewarms anew."""
        self._lock = threading.Lock()
        inherited = list(self._entries.values())
        for e in inherited:
            conn = e.conn if e.conn is not None else (e.wref() if e.wref is not None else None)
            if conn is not None:
                _detach(conn)
            e.state = CLOSED
            e.wref = None
            e.conn = None
        self._entries.clear()
        self._idle.clear()
        self._out.clear()
        self._waiters.clear()
        self._orphans.clear()
        self._size = self._opening = 0
        self._prewarming = 0  # the parent's in-flight prewarm never lands here
        self._sync_prewarm = False
        self._backoff_s = self._backoff_until = 0.0
        self._connector.after_fork()
        self._pid = os.getpid()
        if not self._closed:
            self._supervisor.request(self._task)
            self._supervisor.start_if_needed()
        # (no logging here: in a forked child a logging stream's lock may be held for good by a
        # thread that was writing at the fork; stats() shows the fresh start)

    # -- errors -----------------------------------------------------------------------------

    def _checkouts_locked(self) -> int:
        return self._retired_uses + sum(e.uses for e in self._entries.values())

    def _wait_histogram_locked(self, checkouts: int) -> dict[float, int]:
        """Checkout waits as cumulative counts per upper bound in seconds (Prometheus style):
        checkouts that did not wait count as 0 s."""
        running = max(0, checkouts - self._n_waits)
        out: dict[float, int] = {}
        for bound, n in zip(WAIT_BUCKETS_S, self._wait_counts, strict=False):
            running += n
            out[bound] = running
        out[math.inf] = max(checkouts, running + self._wait_counts[-1])
        return out

    def _in_use_locked(self) -> int:
        return len(self._out)  # the checked-out set is exactly the entries in use

    def _counts_locked(self) -> dict[str, int]:
        return {
            "size": self._size,
            "idle": len(self._idle),
            "in_use": self._in_use_locked(),
            "waiting": len(self._waiters),
        }

    def _timeout_error(self, waited: float, timeout: float, too_many: bool = False) -> PoolTimeout:
        counts = self._counts_locked()
        figures = (
            f"size={counts['size']}/{self._maxconn} idle={counts['idle']} "
            f"in_use={counts['in_use']} waiting={counts['waiting']}"
        )
        if too_many:
            msg = (
                f"pool {self.name!r}: too many callers waiting (max_waiting={self.max_waiting}); "
                f"{figures}"
            )
            err: PoolTimeout = PoolTooManyWaiters(msg, pool=self.name, waited_s=0.0, counts=counts)
        elif timeout <= 0:
            msg = f"pool {self.name!r}: no connection available at once (timeout=0); {figures}"
            err = PoolTimeout(msg, pool=self.name, waited_s=0.0, counts=counts)
        else:
            msg = (
                f"pool {self.name!r}: no connection available after waiting {waited:.3f} s "
                f"(timeout {timeout:g} s); {figures}"
            )
            err = PoolTimeout(msg, pool=self.name, waited_s=waited, counts=counts)
        if self._last_connect_error is not None:
            err.__cause__ = self._last_connect_error
            cause = _summarise_error(self._last_connect_error)
            err.args = (f"{msg}; last connect error: {cause}",)
        return err

    def _closed_error(self) -> PoolClosed:
        return PoolClosed(f"pool {self.name!r} is closed", pool=self.name)

    def _entry_for_return(self, conn: object) -> Entry:
        """The slow path of putconn's ownership check: the entry, or the precise error."""
        with self._lock:
            if self._orphans:
                self._collect_orphans_locked()
            e = self._entries.get(id(conn))
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


def server_role(conn: Connection) -> str | None:
    """'primary', 'standby' or 'read-only' (a primary refusing writes), from what the server
    reports with every response (PostgreSQL 14+); None when it does not say."""
    try:
        status = conn.info.parameter_status
        hot = status("in_hot_standby")
        if hot is None:
            return None
        if hot == "on":
            return "standby"
        return "read-only" if status("default_transaction_read_only") == "on" else "primary"
    except Exception:
        return None


_live_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


def _detach(conn: Connection) -> None:
    """Make an inherited connection harmless in a forked child: its socket descriptor now
    points at /dev/null, so nothing the child does with it (libpq's goodbye on close or
    deallocation included) reaches the parent's session."""
    try:
        fd = conn.fileno()
    except Exception:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        try:
            pool._after_fork_in_child()
        except Exception:  # pragma: no cover - never break a fork
            logger.exception("pool %s: resetting after fork failed", pool.name)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_sizes(minconn: int, maxconn: int | float) -> None:
    if not isinstance(minconn, int) or isinstance(minconn, bool) or minconn < 0:
        raise ValueError(f"minconn must be an integer >= 0, got {minconn!r}")
    if not (maxconn == math.inf or (isinstance(maxconn, int) and not isinstance(maxconn, bool))):
        raise ValueError(f"maxconn must be an integer >= 1 (or inf), got {maxconn!r}")
    if maxconn < 1:
        raise ValueError(f"maxconn must be >= 1, got {maxconn!r}")
    if minconn > maxconn:
        raise ValueError(f"minconn ({minconn}) must not exceed maxconn ({maxconn})")


def _check_non_negative(**values: float | None) -> None:
    for key, value in values.items():
        if value is not None and value < 0:
            raise ValueError(f"{key} must be >= 0, got {value!r}")


def _summarise_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _close_quietly(conn: Connection) -> None:
    with contextlib.suppress(Exception):  # closing a dead connection may complain
        conn.close()
