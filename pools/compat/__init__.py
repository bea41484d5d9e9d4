"""Drop-in surfaces for code written against ``psycopg2.pool`` and ``psycopg2_pool``.

They keep those APIs' signatures and documented behaviour, on top of :class:`ConnectionPool`
(so they get its maintenance, its expiry and its safety for free):

- :class:`SimpleConnectionPool` / :class:`ThreadedConnectionPool`: ``(minconn, maxconn, *args,
  **kwargs)`` with positional DSN or keyword connect arguments, keyed ``getconn(key)`` /
  ``putconn(conn, key=None, close=False)``, ``closeall()``, ``closed``; ``getconn`` never waits
  (an exhausted pool raises ``PoolError`` at once, as psycopg2's does); ``minconn`` connections
  are opened in the constructor.
- :class:`ThreadSafeConnectionPool`: psycopg2_pool's keyword-only ``(minconn=1, maxconn=inf,
  idle_timeout=600, **connect_kwargs)`` with ``getconn()``, ``putconn(conn)`` and ``clear()``.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import psycopg2.extensions as ext
from pgregistry.pools.errors import BadConnectionError, PoolClosed, PoolError, PoolTimeout
from pgregistry.pools.pool import ConnectionPool

__all__ = [
    "AbstractConnectionPool",
    "SimpleConnectionPool",
    "ThreadedConnectionPool",
    "ThreadSafeConnectionPool",
    "PoolError",
]

Connection = ext.connection


class AbstractConnectionPool:
    """psycopg2.pool's keyed API over a :class:`ConnectionPool`."""

    def __init__(self, minconn: int, maxconn: int, *args: Any, **kwargs: Any) -> None:
        dsn: str | None = None
        if args:
            if len(args) > 1 or not isinstance(args[0], str):
                raise TypeError("positional connect arguments: a single DSN string")
            dsn = args[0]
        if "dsn" in kwargs:
            if dsn is not None:
                raise TypeError("dsn given both positionally and as a keyword")
            dsn = kwargs.pop("dsn")
        self.minconn = int(minconn)
        self.maxconn = int(maxconn)
        self.closed = False
        self._keyed: dict[Any, Connection] = {}
        self._keys: dict[int, Any] = {}
        self._keylock = threading.Lock()
        self._pool = ConnectionPool(
            self.minconn,
            self.maxconn,
            background_prewarm=False,
            timeout=0,
            dsn=dsn,
            **kwargs,
        )

    @property
    def pool(self) -> ConnectionPool:
        """The :class:`ConnectionPool` underneath (stats, resize, ...)."""
        return self._pool

    def _check_open(self) -> None:
        if self.closed:
            raise PoolError("connection pool is closed", pool=self._pool.name)

    def getconn(self, key: Any = None) -> Connection:
        """Get a free connection; with ``key``, the same connection for the same key until it is
        put back. Raises ``PoolError`` at once if the pool is exhausted."""
        self._check_open()
        if key is not None:
            with self._keylock:
                conn = self._keyed.get(key)
                if conn is not None:
                    return conn
        try:
            conn = self._pool.getconn(timeout=0)
        except PoolClosed:
            raise PoolError("connection pool is closed", pool=self._pool.name) from None
        except PoolError as exc:
            if isinstance(exc, PoolTimeout):
                raise PoolError("connection pool exhausted", pool=self._pool.name) from exc
            raise
        if key is not None:
            with self._keylock:
                if key in self._keyed:  # another thread won the race for this key
                    self._pool.putconn(conn)
                    return self._keyed[key]
                self._keyed[key] = conn
                self._keys[id(conn)] = key
        return conn

    def putconn(self, conn: Connection, key: Any = None, close: bool = False) -> None:
        """Put away a connection (``close=True`` discards it). ``key`` should be used
        consistently with :meth:`getconn`."""
        self._check_open()
        with self._keylock:
            if key is None:
                key = self._keys.get(id(conn))
            if key is not None:
                if self._keyed.get(key) is not conn:
                    raise PoolError("trying to put unkeyed connection", pool=self._pool.name)
                del self._keyed[key]
                del self._keys[id(conn)]
        try:
            self._pool.putconn(conn, close=close)
        except BadConnectionError as exc:
            raise PoolError(str(exc), pool=self._pool.name) from None

    def closeall(self) -> None:
        """Close every connection of the pool, including those in use."""
        self._check_open()
        self.closed = True
        with self._keylock:
            self._keyed.clear()
            self._keys.clear()
        self._pool.close_all()

    def __enter__(self) -> AbstractConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.closed:
            self.closeall()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} over {self._pool!r}>"


class SimpleConnectionPool(AbstractConnectionPool):
    """psycopg2.pool.SimpleConnectionPool (and, being built on a thread-safe pool, safe to share
    between threads too)."""


class ThreadedConnectionPool(AbstractConnectionPool):
    """psycopg2.pool.ThreadedConnectionPool."""


class ThreadSafeConnectionPool:
    """psycopg2_pool.ThreadSafeConnectionPool: keyword-only, ``maxconn`` unbounded by default,
    ``getconn`` raises ``PoolError`` at once when ``maxconn`` connections are in use."""

    def __init__(
        self,
        *,
        minconn: int = 1,
        maxconn: float = math.inf,
        idle_timeout: float = 600,
        **connect_kwargs: Any,
    ) -> None:
        self.minconn = minconn
        self.maxconn = maxconn
        self.idle_timeout = idle_timeout
        self.connect_kwargs = connect_kwargs
        dsn = connect_kwargs.pop("dsn", None)
        self._pool = ConnectionPool(
            minconn,
            maxconn if maxconn == math.inf else int(maxconn),
            idle_timeout=idle_timeout,
            reap_idle_interval=max(1.0, idle_timeout / 2) if idle_timeout else 0,
            lifetime_timeout=None,
            background_prewarm=False,
            timeout=0,
            dsn=dsn,
            **connect_kwargs,
        )

    @property
    def pool(self) -> ConnectionPool:
        return self._pool

    def getconn(self) -> Connection:
        try:
            return self._pool.getconn(timeout=0)
        except PoolError as exc:
            if isinstance(exc, PoolTimeout):
                raise PoolError("connection pool exhausted", pool=self._pool.name) from exc
            raise

    def putconn(self, conn: Connection) -> None:
        self._pool.putconn(conn)

    def clear(self) -> None:
        """Close and discard every idle connection (regardless of ``minconn`` and
        ``idle_timeout``)."""
        self._pool.clear_idle()

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> ThreadSafeConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
