"""Listener: LISTEN/NOTIFY on a dedicated connection that follows its pool through failovers.

A listener holds one autocommit connection outside its pool's ``maxconn``, opened by the pool's
own connector (same addresses, placement, credentials and ``target_session_attrs``: a writer
pool's listener is on the writer). Notifications are read by the thread that iterates
:meth:`Listener.notifications`: it waits in ``select()`` on the connection's socket and calls
``conn.poll()``; no thread of its own exists, and callbacks run on that iterating thread.

When the connection is lost (the server restarted, failed over, was demoted, or the pool behind
a registry name was replaced by a reload), the iterating thread reconnects with backoff to where
the pool connects *now*, LISTENs to every channel again, and reports the gap: an ``on_reconnect``
callback and a :class:`Gap` marker in the iterator, because notifications sent while no session
listened are lost for good (PostgreSQL queues them only for sessions that are listening; see the
PostgreSQL documentation of NOTIFY). An application catches up from its tables after a gap.

Invariants: one lock (``_lock``) guards the connection and the channel set; it is never held
while waiting in ``select()`` or sleeping between attempts, so ``listen``/``unlisten``/``close``
from another thread wait at most one round trip. Every connection the listener opened is given
back to the pool's address book exactly once (``release``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import psycopg2
import psycopg2.extensions as ext
from psycopg2 import sql

from .connector import ConnectFailed, Connector
from .errors import ConnectError, PoolClosed, PoolError
from .fork import detach

__all__ = ["Dedicated", "Gap", "Listener", "ListenerSource", "Notify"]

logger = logging.getLogger(__name__)

Connection = ext.connection
Notify = ext.Notify

#: Longest single wait in ``select()``: how often an idle iterator looks whether its pool was
#: replaced (a reload) or the listener closed from another thread.
CHECK_INTERVAL_S = 1.0

# "cannot execute LISTEN during recovery" (SQLSTATE 25006): a standby cannot listen
_ON_STANDBY = (psycopg2.errors.ReadOnlySqlTransaction, psycopg2.errors.FeatureNotSupported)


class ListenerSource(Protocol):
    """What a listener needs from its pool: open one dedicated connection the way the pool
    opens its own, and give its address slot back when that connection closes."""

    @property
    def name(self) -> str: ...

    @property
    def closed(self) -> bool: ...

    def open_dedicated(self, deadline: float | None) -> tuple[Connection, str]:
        """A new connection (not counted in ``maxconn``) and its address label; raises
        :class:`ConnectError` (pool named, no secret) when none can be opened by ``deadline``
        (``time.monotonic()`` seconds)."""
        ...

    def release_dedicated(self, label: str) -> None:
        """The connection opened at ``label`` is closed."""
        ...


@dataclass(frozen=True)
class Gap:
    """The marker a listener yields (and passes to ``on_reconnect``) after it reconnected:
    notifications sent while no connection listened may have been missed. ``lost_at`` is when
    the iterating thread noticed the loss (the connection may have died earlier, while nobody
    iterated), ``reconnected_at`` when it listened again (``time.monotonic()`` seconds).
    ``reason`` says why the old connection went (``"lost"``, ``"moved"``: its pool was
    replaced, ``"fork"``: a forked child listens on its own connection); ``address`` is where
    it listens now; ``error`` the secret-free summary of what broke the old connection."""

    lost_at: float
    reconnected_at: float
    address: str
    reason: str
    error: str | None = None
    channels: tuple[str, ...] = field(default=())

    @property
    def duration_s(self) -> float:
        return self.reconnected_at - self.lost_at


NotifyCallback = Callable[[Notify], None]
GapCallback = Callable[[Gap], None]


class Listener:
    """LISTEN/NOTIFY on a dedicated connection of a pool (made by ``pool.listener()`` or
    ``registry.get(name).listener()``; not built directly by applications).

    :param source: a callable giving the pool to connect through *now*: a ``ConnectionPool`` or
        any :class:`ListenerSource` (a registry handle gives the pool currently behind its
        name, so a reload that replaces the pool moves the listener).
    :param on_notify: called with every notification (a ``psycopg2.extensions.Notify``) by the
        iterating thread, before it is yielded; per-channel callbacks are given to
        :meth:`listen`.
    :param on_reconnect: called with a :class:`Gap` by the iterating thread after a reconnect.
    :param reconnect_backoff: first wait in seconds between failed reconnects (default 0.1),
        doubled up to ``reconnect_backoff_max`` (default 2.0).
    :param connect: whether to connect now (default true); raises :class:`ConnectError` if it
        cannot. With false, the first iteration connects.
    """

    def __init__(
        self,
        source: Callable[[], Any],
        *,
        on_notify: NotifyCallback | None = None,
        on_reconnect: GapCallback | None = None,
        reconnect_backoff: float = 0.1,
        reconnect_backoff_max: float = 2.0,
        connect: bool = True,
        on_close: Callable[[Listener], None] | None = None,
    ) -> None:
        if reconnect_backoff <= 0 or reconnect_backoff_max < reconnect_backoff:
            raise ValueError("need 0 < reconnect_backoff <= reconnect_backoff_max, got "
                             f"{reconnect_backoff!r}, {reconnect_backoff_max!r}")
        self._source = source
        self.on_notify = on_notify
        self.on_reconnect = on_reconnect
        self.reconnect_backoff = reconnect_backoff
        self.reconnect_backoff_max = reconnect_backoff_max
        self._on_close = on_close
        self._lock = threading.RLock()
        self._conn: Connection | None = None
        self._pool: ListenerSource | None = None
        self._owner: object = None  # what the source gave (identity tells a replaced pool)
        self._pid = os.getpid()  # the process the connection belongs to
        self._label: str | None = None
        self._channels: dict[str, NotifyCallback | None] = {}
        self._pending: deque[Notify | Gap] = deque()
        self._closed = False
        self._lost_at: float | None = None
        self._lost_reason = "lost"
        self._lost_error: str | None = None
        self._backoff_s = 0.0
        self._next_attempt_at = 0.0
        # counters (stats)
        self._n_notifications = 0
        self._n_reconnects = 0
        self._n_connect_errors = 0
        self._last_notification_at: float | None = None
        self._last_error: str | None = None
        if connect:
            self._connect(None)

    # -- public ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self._channels)

    @property
    def address(self) -> str | None:
        """The address label (``ip:port``) of the current connection, or ``None``."""
        return self._label if self.connected else None

    def backend_pid(self) -> int | None:
        conn = self._conn
        return None if conn is None or conn.closed else conn.info.backend_pid

    def listen(self, channel: str, callback: NotifyCallback | None = None) -> None:
        """LISTEN to ``channel`` (quoted as an identifier: any text is a valid channel name,
        case kept). ``callback``, if given, is called with each of its notifications by the
        iterating thread. On a lost connection the channel is recorded and LISTENed at the
        reconnect. Raises ``TypeError``/``ValueError`` for a non-text or empty channel."""
        _check_channel(channel)
        with self._lock:
            self._check_open()
            if self.connected:
                try:
                    self._execute_locked(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                    self._lost_locked(exc)
            self._channels[channel] = callback

    def unlisten(self, channel: str | None = None) -> None:
        """UNLISTEN ``channel`` (every channel with ``None``). Notifications of it already
        received but not yet iterated are still delivered."""
        with self._lock:
            self._check_open()
            stmt: sql.Composable
            if channel is None:
                self._channels.clear()
                stmt = sql.SQL("UNLISTEN *")
            else:
                _check_channel(channel)
                self._channels.pop(channel, None)
                stmt = sql.SQL("UNLISTEN {}").format(sql.Identifier(channel))
            if self.connected:
                try:
                    self._execute_locked(stmt)
                except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                    self._lost_locked(exc)

    def notifications(self, timeout: float | None = None) -> Iterator[Notify | Gap]:
        """Notifications as they arrive, in the order the server sent them, each a
        ``psycopg2.extensions.Notify`` (``channel``, ``payload``, ``pid``); after a reconnect
        a :class:`Gap` first. The iteration ends after ``timeout`` seconds in all (``None``:
        never, until the listener is closed); iterate again to go on. Reconnecting happens
        inside the iteration, bounded by the same timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            item = self._next(deadline)
            if item is None:
                return
            yield item

    def poll(self) -> list[Notify | Gap]:
        """What arrived so far, without waiting (one round of reading the socket)."""
        return list(self.notifications(timeout=0))

    def close(self) -> None:
        """Close the connection (its channels are dropped by the server). Idempotent; an
        iteration in another thread ends at its next wake-up (within 1 s)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop_locked()
        if self._on_close is not None:
            self._on_close(self)
        logger.info("listener closed")

    def stats(self) -> dict[str, Any]:
        """Channels, whether connected and where, notifications delivered, reconnects, the
        last notification's time (``time.monotonic()`` seconds) and the last error."""
        now = time.monotonic()
        with self._lock:
            last = self._last_notification_at
            return {
                "channels": list(self._channels),
                "connected": self.connected,
                "address": self.address,
                "closed": self._closed,
                "notifications": self._n_notifications,
                "reconnects": self._n_reconnects,
                "connect_errors": self._n_connect_errors,
                "last_notification_at": last,
                "last_notification_age_s": None if last is None else now - last,
                "last_error": self._last_error,
                "disconnected_for_s": None if self._lost_at is None else now - self._lost_at,
            }

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __iter__(self) -> Iterator[Notify | Gap]:
        return self.notifications()

    def __repr__(self) -> str:
        state = "closed" if self._closed else (
            f"on {self._label}" if self.connected else "reconnecting")
        pool = self._pool.name if self._pool is not None else "?"
        return f"<Listener pool={pool!r} channels={list(self._channels)} {state}>"

    # -- the iterating thread ------------------------------------------------------------------

    def _next(self, deadline: float | None) -> Notify | Gap | None:
        while True:
            with self._lock:
                if self._closed:
                    return None
                if self._conn is not None and os.getpid() != self._pid:
                    self._forked_locked()
                if self._pending:
                    return self._deliver_locked(self._pending.popleft())
                if self._conn is not None and self._source() is not self._owner:
                    self._lost_reason = "moved"
                    self._drop_locked()
                    self._lost_at = time.monotonic()
                    logger.info("listener: pool %s was replaced; moving", self._pool_name())
                conn = self._conn
            if conn is None:
                if not self._reconnect(deadline):
                    return None
                continue
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                # one non-blocking read, then stop
                self._read(conn, 0.0)
                with self._lock:
                    if self._pending:
                        return self._deliver_locked(self._pending.popleft())
                return None
            wait = CHECK_INTERVAL_S if remaining is None else min(remaining, CHECK_INTERVAL_S)
            self._read(conn, wait)

    def _read(self, conn: Connection, wait_s: float) -> None:
        """Wait up to ``wait_s`` for the socket, then take what arrived."""
        try:
            fd = conn.fileno()
            ready, _, _ = select.select([fd], [], [], wait_s)
        except (OSError, ValueError, psycopg2.InterfaceError) as exc:
            with self._lock:
                if self._conn is conn:
                    self._lost_locked(exc)
            return
        if not ready and not conn.notifies:
            return
        with self._lock:
            if self._conn is not conn:
                return  # closed or replaced meanwhile
            try:
                conn.poll()
            except (psycopg2.OperationalError, psycopg2.InterfaceError,
                    psycopg2.DatabaseError) as exc:
                self._take_notifies_locked(conn)  # what arrived before the end still counts
                self._lost_locked(exc)
                return
            self._take_notifies_locked(conn)

    def _take_notifies_locked(self, conn: Connection) -> None:
        while conn.notifies:
            self._pending.append(conn.notifies.pop(0))

    def _deliver_locked(self, item: Notify | Gap) -> Notify | Gap:
        # callbacks run outside the lock (a callback may call listen/unlisten)
        self._lock.release()
        try:
            if isinstance(item, Gap):
                if self.on_reconnect is not None:
                    self.on_reconnect(item)
            else:
                self._n_notifications += 1
                self._last_notification_at = time.monotonic()
                if self.on_notify is not None:
                    self.on_notify(item)
                callback = self._channels.get(item.channel)
                if callback is not None:
                    callback(item)
        finally:
            self._lock.acquire()
        return item

    def _reconnect(self, deadline: float | None) -> bool:
        """Try to connect until ``deadline``, with backoff; True once connected (a Gap is
        queued), False when the time is up or the listener is closed."""
        while True:
            with self._lock:
                if self._closed:
                    return False
                if self._conn is not None:
                    return True
            now = time.monotonic()
            wait = self._next_attempt_at - now
            remaining = _remaining(deadline)
            if wait > 0:
                if remaining is not None and remaining < wait:
                    if remaining > 0:
                        threading.Event().wait(remaining)
                    return False
                threading.Event().wait(min(wait, CHECK_INTERVAL_S))
                continue
            if remaining is not None and remaining <= 0:
                return False
            try:
                self._connect(deadline)
            except (ConnectError, psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                with self._lock:
                    self._n_connect_errors += 1
                    self._last_error = _summary(exc)
                    self._backoff_s = min(
                        self.reconnect_backoff_max,
                        max(self.reconnect_backoff, self._backoff_s * 2),
                    )
                    self._next_attempt_at = time.monotonic() + self._backoff_s
                logger.debug("listener on pool %s: reconnect failed (%s); next in %.2f s",
                             self._pool_name(), self._last_error, self._backoff_s)

    # -- connection ----------------------------------------------------------------------------

    def _connect(self, deadline: float | None) -> None:
        """Open a connection through the pool behind the source now, LISTEN to every channel,
        and install it (queueing a :class:`Gap` if one was lost before). The connect runs
        without the lock; the LISTENs under it, so no channel added meanwhile is missed."""
        owner = self._source()
        pool = as_source(owner)
        if pool.closed:
            raise PoolClosed(f"pool {pool.name!r} is closed", pool=pool.name)
        conn, label = pool.open_dedicated(deadline)
        try:
            conn.autocommit = True
            with self._lock:
                if self._closed or self._conn is not None:
                    raise _Unwanted
                for channel in self._channels:
                    with conn.cursor() as cur:
                        cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                self._install_locked(pool, conn, label)
                self._owner = owner
        except _Unwanted:
            _close_quietly(conn)
            pool.release_dedicated(label)
        except _ON_STANDBY as exc:  # LISTEN on a standby
            _close_quietly(conn)
            pool.release_dedicated(label)
            raise PoolError(
                f"pool {pool.name!r}: cannot LISTEN on {label}: {_summary(exc)} (a listener "
                "needs the primary: use a writer pool)", pool=pool.name) from exc
        except BaseException:
            _close_quietly(conn)
            pool.release_dedicated(label)
            raise

    def _forked_locked(self) -> None:
        """In a forked child: the parent's session is not ours. Its socket is pointed at
        /dev/null (nothing reaches the parent's session), and the child listens on its own."""
        conn, self._conn = self._conn, None
        if conn is not None:
            detach(conn)
            _close_quietly(conn)
        self._pending.clear()  # the parent's, not yet iterated: the parent gets them
        self._lost_at = time.monotonic()
        self._lost_reason = "fork"
        self._lost_error = None

    def _install_locked(self, pool: ListenerSource, conn: Connection, label: str) -> None:
        self._conn, self._pool, self._label = conn, pool, label
        self._pid = os.getpid()
        self._backoff_s = 0.0
        self._next_attempt_at = 0.0
        if self._lost_at is None:
            logger.info("listener on pool %s: connected to %s", pool.name, label)
            return
        now = time.monotonic()
        gap = Gap(self._lost_at, now, label, self._lost_reason, self._lost_error,
                  tuple(self._channels))
        self._n_reconnects += 1
        self._lost_at = None
        self._lost_reason = "lost"
        self._lost_error = None
        self._pending.append(gap)
        logger.warning("listener on pool %s: reconnected to %s after %.2f s (%s); "
                       "notifications in the gap may be lost", pool.name, label,
                       gap.duration_s, gap.reason)

    def _execute_locked(self, stmt: sql.Composable) -> None:
        conn = self._conn
        assert conn is not None
        try:
            with conn.cursor() as cur:
                cur.execute(stmt)
        except _ON_STANDBY as exc:  # LISTEN on a standby
            raise PoolError(
                f"pool {self._pool_name()!r}: cannot LISTEN on {self._label}: {_summary(exc)} "
                "(a listener needs the primary: use a writer pool)",
                pool=self._pool_name()) from exc
        self._take_notifies_locked(conn)

    def _lost_locked(self, exc: BaseException) -> None:
        if self._conn is None:
            return
        self._last_error = self._lost_error = _summary(exc)
        logger.warning("listener on pool %s: connection to %s lost: %s", self._pool_name(),
                       self._label, self._last_error)
        self._drop_locked()
        if self._lost_at is None:
            self._lost_at = time.monotonic()

    def _drop_locked(self) -> None:
        conn, pool, label = self._conn, self._pool, self._label
        self._conn = None
        if conn is not None:
            _close_quietly(conn)
            if pool is not None and label is not None:
                pool.release_dedicated(label)

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosed("the listener is closed", pool=self._pool_name())

    def _pool_name(self) -> str:
        return self._pool.name if self._pool is not None else "?"


class Dedicated:
    """A pool's dedicated connections (its listeners'): opened by the pool's connector (its
    addresses, placement, bans, credentials and ``target_session_attrs``) outside its
    ``maxconn``; the listeners the pool made, shown in its stats and closed with it.

    A failed connect makes the connector look its names up again at once (in the calling
    thread), as the pool's own failed connects do, so a reconnect after a failover finds the
    new writer as soon as DNS names it.
    """

    def __init__(self, name: str, connector: Connector) -> None:
        self.name = name
        self.connector = connector
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._closed = False

    def open(self, deadline: float | None) -> tuple[Connection, str]:
        """A new connection and its address label; :class:`ConnectError` (the pool named) when
        none can be opened."""
        connector = self.connector
        try:
            conn, address = connector.connect(deadline)
        except ConnectFailed as exc:
            if connector.refresh_soon(force=True):  # the answer may be stale: ask again now
                connector.refresh(connector.clock.monotonic())
            raise ConnectError(f"pool {self.name!r} (listener): {exc}",
                               pool=self.name) from (exc.__cause__ or exc)
        except Exception as exc:  # e.g. a credential source that failed
            raise ConnectError(f"pool {self.name!r} (listener): cannot connect to "
                               f"{connector.host_label}: {_summary(exc)}",
                               pool=self.name) from exc
        return conn, address.label

    def release(self, label: str) -> None:
        self.connector.book.closed(label)

    def listener(self, source: Callable[[], Any], **kwargs: Any) -> Listener:
        """A new :class:`Listener` through ``source``, kept until it (or the pool) closes."""
        with self._lock:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed", pool=self.name)
        lst = Listener(source, on_close=self._forget, **kwargs)
        with self._lock:
            closed = self._closed
            if not closed:
                self._listeners.append(lst)
        if closed:
            lst.close()
            raise PoolClosed(f"pool {self.name!r} is closed", pool=self.name)
        return lst

    def _forget(self, lst: Listener) -> None:
        with self._lock:
            self._listeners = [x for x in self._listeners if x is not lst]

    def stats(self) -> list[dict[str, Any]]:
        with self._lock:
            listeners = list(self._listeners)
        return [lst.stats() for lst in listeners]

    def close(self) -> None:
        """Close every listener (idempotent); later :meth:`listener` calls raise."""
        with self._lock:
            self._closed = True
            listeners, self._listeners = self._listeners, []
        for lst in listeners:
            lst.close()


def as_source(pool: Any) -> ListenerSource:
    """``pool`` as a listener's source (a ``ConnectionPool`` is one); ``TypeError`` if not."""
    if not hasattr(pool, "open_dedicated"):
        raise TypeError(f"a listener needs a pool that opens dedicated connections, got "
                        f"{type(pool).__name__}")
    return pool  # type: ignore[no-any-return]


class _Unwanted(Exception):
    """A connection opened while the listener was closed or already connected."""


def _check_channel(channel: object) -> None:
    if not isinstance(channel, str):
        raise TypeError(f"a channel name is text, got {type(channel).__name__}")
    if not channel or "\x00" in channel:
        raise ValueError("a channel name is non-empty text without NUL characters")


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _summary(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _close_quietly(conn: Connection) -> None:
    with contextlib.suppress(Exception):
        conn.close()
