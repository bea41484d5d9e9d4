"""The watchdog: deadlines on round trips that nothing in libpq bounds.

A query (or a ping) on a frozen server hangs forever: its kernel still acknowledges, so no TCP
timeout fires. The watchdog gives each one a deadline on the pool's supervisor (the cheap kind,
``Supervisor.watch``: one heap push, and a cancel is one store); at the deadline, if it still
runs, its socket is shut down (the blocked read returns at once with an error) and the address
is banned.

``query_timeout`` is kept by the server first: every connection starts with
``statement_timeout`` set to it (in libpq's ``options``, so ``RESET``/``DISCARD ALL`` keep it),
so a statement past it is cancelled there (SQLSTATE 57014: its locks released, the connection
kept, the address not banned). Only a server that has not answered ``QUERY_GRACE_S`` later
has the socket cut and its address banned.

Invariants:
- The supervisor only ever shuts a socket down (``PingGuard.expire``): never a round trip,
  never a close, so a deadline costs it nothing however dead the server.
- The shutdown and the end of the guarded call are exclusive (the guard's lock), so a descriptor
  number reused after the call never gets shut down.
- Every deadline registered is cancelled when its call ends, whatever way it ends.
- Queries are guarded through the connection's cursor class (``guarded_cursor_class``), which
  finds its watchdog by connection; a connection the pool no longer holds is not guarded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import weakref
from _thread import allocate_lock as _allocate_lock
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions as ext

from .clock import Clock, RealClock
from .stats import summarise_error
from .supervisor import Supervisor

__all__ = ["PingGuard", "Watchdog", "guarded_cursor_class"]

logger = logging.getLogger(__name__)

# How long past query_timeout a server that enforces it itself (statement_timeout) may take to
# answer with its cancel before the watchdog decides it does not answer at all.
QUERY_GRACE_S = 0.25

Connection = ext.connection


class PingGuard:
    """A round trip's deadline, kept by the supervisor: at the deadline, if the call still
    runs, its socket is shut down. The lock makes the shutdown and the call's end exclusive."""

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


# id(connection) -> the watchdog of the pool holding it (only pools with a query_timeout)
_watchdog_of_conn: weakref.WeakValueDictionary[int, Watchdog] = weakref.WeakValueDictionary()
_guarded_classes: dict[type, type] = {}


def guarded_cursor_class(base: type) -> type:
    """A cursor class (on ``base``, the connection's own cursor factory) whose execute,
    executemany and callproc are bounded by its pool's ``query_timeout``."""
    cls = _guarded_classes.get(base)
    if cls is not None:
        return cls

    def guarded(name: str) -> Any:
        method = getattr(base, name)

        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            dog = _watchdog_of_conn.get(id(self.connection))
            if dog is None:
                return method(self, *args, **kwargs)
            return dog.guarded_call(self.connection, method, self, args, kwargs)

        run.__name__ = name
        return run

    cls = type(f"Bounded{base.__name__}", (base,), {
        "execute": guarded("execute"),
        "executemany": guarded("executemany"),
        "callproc": guarded("callproc"),
    })
    _guarded_classes[base] = cls
    return cls


class Watchdog:
    """One pool's deadlines on pings and queries.

    :param name: the pool's name (for log lines).
    :param supervisor: keeps the deadlines (``watch``/``unregister``).
    :param clock: the supervisor's clock (monotonic seconds).
    :param ban: called with an address label whose round trip timed out.
    :param label_of: the address label of a connection the pool holds, or None.
    :param ping_timeout: seconds a ping may take (0 or inf: unbounded); live.
    :param query_timeout: seconds any one query may take (None: unbounded); fixed for the pool.
    """

    def __init__(
        self,
        name: str,
        supervisor: Supervisor,
        clock: Clock,
        *,
        ban: Callable[[str], None],
        label_of: Callable[[Connection], str | None],
        ping_timeout: float,
        query_timeout: float | None,
    ) -> None:
        self.name = name
        self.supervisor = supervisor
        self.clock = clock
        self.ban = ban
        self.label_of = label_of
        self.ping_timeout = ping_timeout
        self.query_timeout = query_timeout
        # the hot path's own references: the clock's now and the supervisor's cut
        self._now: Callable[[], float] = (
            time.monotonic if isinstance(clock, RealClock) else clock.monotonic)
        self._at = supervisor.scheduler.at
        # the server enforces query_timeout itself (statement_timeout): the cut waits a grace
        self.server_side = False

    def _watch(self, limit_s: float, fn: Callable[[], None]) -> Any:
        return self._at(self._now() + limit_s, fn)

    @staticmethod
    def _unwatch(handle: Any) -> None:
        handle[2] = None  # (Scheduler.uncut, inlined)

    # -- connections under the query watchdog ---------------------------------------------------

    def prepare(self, conn: Connection) -> None:
        """Give a new connection the guarded cursor class (with a ``query_timeout``)."""
        if self.query_timeout:
            base: Any = conn.cursor_factory
            if base is None or isinstance(base, type):  # (a factory function is left as is)
                conn.cursor_factory = guarded_cursor_class(base or ext.cursor)

    def track(self, key: int) -> None:
        """The connection ``id`` ``key`` is the pool's: its queries are guarded."""
        if self.query_timeout:
            _watchdog_of_conn[key] = self

    def untrack(self, key: int) -> None:
        if self.query_timeout:
            _watchdog_of_conn.pop(key, None)

    # -- guarded round trips ------------------------------------------------------------------

    def ping(self, conn: Connection, label: str | None, budget_s: float | None = None) -> bool:
        """``SELECT 1`` on ``conn``, bounded by ``ping_timeout`` (or ``budget_s``, if less).
        Returns whether the connection answered; a timeout bans ``label``."""
        limit = self.ping_timeout if budget_s is None else min(self.ping_timeout, budget_s)
        guard = PingGuard(conn) if limit and limit != math.inf else None
        task = None
        if guard is not None:
            task = self._watch(limit, guard.expire)
        try:
            ok = self._ping_unguarded(conn)
        finally:
            if guard is not None:
                guard.finish()
                self._unwatch(task)
        if guard is not None and guard.expired:
            if label is not None:
                self.ban(label)
            logger.warning("pool %s: ping of %s timed out after %.1f s: the server does not "
                           "answer (frozen?); address banned", self.name,
                           label or "a connection", limit)
            return False  # its socket is cut, even if the answer came in the same instant
        return ok

    @contextlib.contextmanager
    def bounded(self, conn: Connection, label: str | None) -> Iterator[None]:
        """Bound one round trip the pool makes itself on ``conn`` (e.g. ``DISCARD ALL`` on
        return) by ``ping_timeout``: past it the socket is shut down (the call fails) and
        ``label`` banned."""
        limit = self.ping_timeout
        if not limit or limit == math.inf or conn.closed:
            yield
            return
        guard = PingGuard(conn)
        task = self._watch(limit, guard.expire)
        try:
            yield
        finally:
            guard.finish()
            self._unwatch(task)
            if guard.expired:
                if label is not None:
                    self.ban(label)
                logger.warning("pool %s: a round trip on %s took more than %.1f s: its "
                               "connection was cut and the address banned", self.name,
                               label or "a connection", limit)
        if guard.expired:  # cut, even if the call ended in the same instant: not reusable
            raise psycopg2.OperationalError(
                f"the round trip took more than {limit:g} s: the connection was cut")

    def guarded_call(self, conn: Connection, method: Callable[..., Any], cursor: Any,
                     args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``method(cursor, *args, **kwargs)`` bounded like :meth:`query_guard` (the cursor
        classes' path: no generator per query)."""
        limit = self.query_timeout
        if not limit or conn.closed:
            return method(cursor, *args, **kwargs)
        guard = PingGuard(conn)
        handle = self._at(
            self._now() + (limit + QUERY_GRACE_S if self.server_side else limit), guard.expire)
        try:
            return method(cursor, *args, **kwargs)
        finally:
            guard.finish()
            handle[2] = None  # (Scheduler.uncut, inlined)
            if guard.expired:
                self._query_cut(conn, limit)

    def _query_cut(self, conn: Connection, limit: float) -> None:
        label = self.label_of(conn)
        if label is not None:
            self.ban(label)
        logger.warning("pool %s: a query on %s ran past query_timeout (%g s) and the server "
                       "did not answer: its connection was cut and the address banned",
                       self.name, label or "its address", limit)

    @contextlib.contextmanager
    def query_guard(self, conn: Connection) -> Iterator[None]:
        """Bound one query on ``conn`` by ``query_timeout``."""
        limit = self.query_timeout
        if not limit or conn.closed:
            yield
            return
        guard = PingGuard(conn)
        task = self._watch(limit + QUERY_GRACE_S if self.server_side else limit, guard.expire)
        try:
            yield
        finally:
            guard.finish()
            self._unwatch(task)
            if guard.expired:
                label = self.label_of(conn)
                if label is not None:
                    self.ban(label)
                logger.warning("pool %s: a query on %s ran past query_timeout (%g s): its "
                               "connection was cut and the address banned", self.name,
                               label or "its address", limit)

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
                "pool %s: connection failed test-on-borrow: %s", self.name, summarise_error(exc)
            )
            return False
