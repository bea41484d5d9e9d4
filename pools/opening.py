"""Opening and closing a pool's connections: the one place a connection enters or leaves.

Invariants:
- ``open`` runs for a slot already counted in the books (``Bag.reserve_locked`` or a waiter's
  permit). It either returns a prepared connection recorded in the books (state RETURNING:
  its opener's until handed over), or gives the slot back and raises :class:`ConnectError`
  (or :class:`PoolError` if preparing it failed); never both, never neither, whatever is
  raised in between.
- Every address a connection comes from is the connector's choice (placement, bans, DNS);
  ``prefer`` only asks for one. A topology-based address source plugs in behind the connector.
- ``close`` is the only place a pooled connection is closed. It runs outside the lock, counts
  the reason, and asks for maintenance when the pool fell below ``minconn``; the close itself
  never runs on the supervisor's thread (``dispose``). The connection's slot stays counted
  until the close has returned (``Bag.close_finished``), so ``maxconn`` bounds sockets.
- Every lifetime is jittered (``lifetime_jitter``), so connections of one burst do not expire
  together.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import select
import time
from collections.abc import Callable
from typing import Any

import psycopg2.extensions as ext

from .bag import Bag, Slot
from .clock import Clock
from .connector import ConnectFailed, Connector
from .entry import RETURNING, Entry
from .errors import ConnectError, PoolError
from .stats import summarise_error
from .watchdog import Watchdog

__all__ = ["Opener", "WARN_REASONS", "close_quietly"]

logger = logging.getLogger(__name__)

Connection = ext.connection

_TX_IDLE = ext.TRANSACTION_STATUS_IDLE

# Close reasons that mean something went wrong (logged as warnings); the others are routine.
WARN_REASONS = frozenset({"broken", "validation", "garbage_collected", "reset_failed"})

# How long a close waits for the server to end the backend (its slot stays counted meanwhile,
# so maxconn holds for the server's backends too); 0 for the closes of a closed pool.
GONE_WAIT_S = 1.0


class Opener:
    """Opens connections into a bag's reserved slots and closes the ones that left it.

    :param bag: the books the connections enter and leave.
    :param connector: resolves and connects (addresses, bans, DNS).
    :param watchdog: prepares connections for the query watchdog.
    :param clock: the pool's clock; lifetimes are on it.
    :param rng: jitters lifetimes.
    :param on_lost: the weakref callback of every entry (a checked-out connection collected).
    :param wake: asks the supervisor for a maintenance step of this pool (lock-free).
    :param dispose: runs a close keyed by address (``Supervisor.run_io``: on an I/O worker
        when called on the supervisor's thread, at once elsewhere).
    :param autocommit: set on every new connection unless None.
    :param configure: called with every new connection; it must leave no transaction open.
    """

    def __init__(
        self,
        bag: Bag,
        connector: Connector,
        watchdog: Watchdog,
        clock: Clock,
        rng: random.Random,
        *,
        on_lost: Callable[[Any], None],
        wake: Callable[[], None],
        dispose: Callable[[str, Callable[[], None]], None],
        autocommit: bool | None,
        configure: Callable[[Connection], None] | None,
        lifetime_timeout: float | None,
        lifetime_jitter: float,
    ) -> None:
        self.bag = bag
        self.connector = connector
        self.watchdog = watchdog
        self.clock = clock
        self.rng = rng
        self.on_lost = on_lost
        self.wake = wake
        self.dispose = dispose  # runs a close (off the supervisor's thread when on it)
        self.autocommit = autocommit
        self.configure = configure
        self.lifetime_timeout = lifetime_timeout
        self.lifetime_jitter = lifetime_jitter
        self.on_opened: Callable[[], None] = lambda: None  # (maintenance resets its backoff)
        self.server_role: Callable[[Connection], str | None] = lambda conn: None
        # after every connect attempt (placement retires the addresses DNS no longer names)
        self.after_connect: Callable[[], None] = lambda: None

    @property
    def name(self) -> str:
        return self.bag.name

    # -- opening --------------------------------------------------------------------------------

    def open(
        self, deadline: float | None = None, prefer: str | None = None,
        slot: Slot | None = None,
    ) -> tuple[Entry, Connection]:
        """Open one connection for a slot already counted in the books (``slot``: its
        owner's record of it, see :class:`Slot`). On failure the slot is given back and
        :class:`ConnectError` raised (an interrupt stays what it is: the slot is given back
        too). Runs without the lock.

        The ``ConnectError`` says what kind of refusal it was: ``capacity`` (the server is out
        of connection slots; the bag's ``capacity_until`` is set until the address is tried
        again) and ``deadline_only`` (nothing failed but the caller's own deadline)."""
        name = self.name
        t0 = time.monotonic()
        try:
            conn, address = self.connector.connect(deadline, prefer)
        except ConnectFailed as exc:
            cause = exc.__cause__ or exc
            self._failed(cause, slot)
            if self.connector.refresh_soon():  # the answer may be out of date: ask again now
                self.wake()
            err = ConnectError(f"pool {name!r}: {exc}", pool=name)
            kinds = exc.kinds
            err.capacity = "capacity" in kinds  # type: ignore[attr-defined]
            err.deadline_only = kinds == {"deadline"}  # type: ignore[attr-defined]
            if err.capacity:  # type: ignore[attr-defined]
                retry_s = min([h.retry_in_s for h in exc.holds if h.kind == "capacity"]
                              or [self.connector.book.ban_initial])
                self.bag.capacity_until = time.monotonic() + max(0.05, retry_s)
            raise err from cause
        except BaseException as exc:
            self._failed(exc, slot)
            if not isinstance(exc, Exception):
                raise  # an interrupt (KeyboardInterrupt, ...) stays what it is
            raise ConnectError(
                f"pool {name!r}: cannot connect to {self.connector.host_label}: "
                f"{summarise_error(exc)}",
                pool=name,
            ) from exc
        finally:
            self.after_connect()
        try:
            self._prepare(conn)
            created_s = time.monotonic() - t0
            timings = self.bag.timings
            if timings is not None:  # (inside the try: an interrupt here frees the slot too)
                timings.created(created_s)
        except BaseException as exc:
            close_quietly(conn)
            self.connector.book.closed(address.label)
            self._failed(exc, slot)
            if isinstance(exc, PoolError) or not isinstance(exc, Exception):
                raise  # an interrupt (KeyboardInterrupt, ...) stays what it is
            raise PoolError(
                f"pool {name!r}: configuring a new connection failed: {exc!r}", pool=name
            ) from exc
        # what the pool set up: a borrower's changes are put back on return
        setup = (conn.autocommit, conn.readonly, conn.isolation_level, conn.deferrable,
                 conn.cursor_factory)
        now = self.clock.monotonic()
        e = Entry(
            conn,
            address=address.label,
            created_at=now,
            expires_at=self._expiry(now),
            on_lost=self.on_lost,
        )
        e.server_role = self.server_role(conn)
        e.setup = setup
        bag = self.bag
        e.fresh_until = bag.fresh_until(e, now)
        e.state = RETURNING  # owned by the opener until it hands it over
        with bag.lock:
            bag.admit_locked(e, slot)
            bag.counters.created(created_s)
            self.watchdog.track(e.key)
            below_min = bag.size < bag.minconn
        self.on_opened()
        if below_min:  # prewarm waits while a caller connects: it may go on now
            self.wake()
        logger.debug("pool %s: opened connection pid=%s to %s", name, e.backend_pid, e.address)
        return e, conn

    def open_for_caller(self, deadline: float | None, slot: Slot | None = None) -> Connection:
        """A caller's own connect (its slot counted): the connection is its checkout."""
        e, conn = self.open(deadline, slot=slot)
        return self.bag.admit_checked_out(e, conn)

    def _failed(self, exc: BaseException, slot: Slot | None = None) -> None:
        bag = self.bag
        with bag.lock:
            bag.open_failed_locked(exc, slot)
            below_min = bag.size < bag.minconn
        if below_min:
            self.wake()

    def _prepare(self, conn: Connection) -> None:
        if self.autocommit is not None:
            conn.autocommit = self.autocommit
        self.watchdog.prepare(conn)
        if self.configure is not None:
            self.configure(conn)
            status = conn.get_transaction_status()
            if status != _TX_IDLE:
                raise PoolError(
                    f"pool {self.name!r}: configure left the connection in a transaction "
                    f"(status {status}); commit or use autocommit in it",
                    pool=self.name,
                )

    def _expiry(self, now: float) -> float:
        lifetime = self.lifetime_timeout
        if not lifetime:
            return math.inf
        j = self.lifetime_jitter
        return now + lifetime * (1.0 + self.rng.uniform(-j, j))

    # -- closing --------------------------------------------------------------------------------

    def close_idle(self, reason: str) -> int:
        """Take every idle connection off the books (in one locked step) and close it, with
        ``reason`` for the counters. Returns how many."""
        bag = self.bag
        with bag.lock:
            conns = [(e, bag.forget_locked(e)) for e in bag.drain_idle_locked()]
        for e, conn in conns:
            self.close(e, conn, reason)
        return len(conns)

    def close(self, e: Entry, conn: Connection | None, reason: str) -> None:
        """Close one connection that is out of the books. Never under the lock. Its slot
        (``Bag.closing``) is freed when the close has returned, on whatever thread runs it
        (here, or an I/O worker when called on the supervisor's thread), exactly once, also
        when an interrupt lands anywhere in between."""
        handed = False
        try:
            with self.bag.lock:
                self.bag.counters.closed(reason)
            log = logger.warning if reason in WARN_REASONS else logger.debug
            log("pool %s: closing connection pid=%s to %s (%s)",
                self.name, e.backend_pid, e.address, reason)
            if conn is not None:
                wait_s = 0.0 if reason == "pool_closed" else GONE_WAIT_S
                self.dispose(e.address, functools.partial(self._close_now, e, conn, wait_s))
                handed = True
        finally:
            if not handed:  # no connection, or interrupted before the close was handed on
                try:
                    if conn is not None:
                        close_quietly(conn)
                finally:
                    self._close_finished(e)

    def _close_now(self, e: Entry, conn: Connection, wait_s: float) -> None:
        try:
            close_until_gone(conn, wait_s)
        finally:
            self._close_finished(e)

    def _close_finished(self, e: Entry) -> None:
        if self.bag.close_finished(e):  # below minconn: prewarm may go on now
            self.wake()


def close_until_gone(conn: Connection, wait_s: float) -> None:
    """Close ``conn``, then wait (at most ``wait_s`` seconds) until the server has closed its
    end of the socket: its backend has exited, and left ``pg_stat_activity`` (a backend ends
    its activity entry before its process exits, PostgreSQL's ``proc_exit``). Returns at
    once for a connection whose socket is gone (libpq drops the socket of a broken link) or
    shut down (a cut: ``PingGuard.expire``); a frozen server costs at most ``wait_s``."""
    fd = -1
    try:
        if wait_s > 0 and not conn.closed:
            with contextlib.suppress(Exception):
                fd = os.dup(conn.fileno())  # keeps the socket open past libpq's close
        close_quietly(conn)  # sends Terminate: the backend exits
        if fd >= 0:
            _wait_eof(fd, time.monotonic() + wait_s)
    finally:
        if fd >= 0:
            os.close(fd)


def _wait_eof(fd: int, deadline: float) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while (left := deadline - time.monotonic()) > 0:
        if not poller.poll(left * 1000.0):
            return  # the bound: the server did not close its end in time
        try:
            if not os.read(fd, 65536):
                return  # EOF: the backend is gone
        except OSError:
            return  # reset: gone too


def close_quietly(conn: Connection) -> None:
    with contextlib.suppress(Exception):  # closing a dead connection may complain
        conn.close()
