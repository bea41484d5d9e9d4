"""Handles and fallbacks: how a caller reaches a named pool of a registry.

A :class:`PoolHandle` is what ``registry.get(name)`` returns: cheap, and never stale. It looks
the name up in the registry's current generation at each use, so a handle kept across a reload
serves the new pool, and a connection checked out through it goes back (``putconn`` or the
``with`` block) to the pool that gave it, even one a reload has retired since.

:class:`Fallbacks` is the state of the ``fallback:`` keys: while a pool cannot serve (every
address down, every replica lagging past ``max_replica_lag``, or a connect error) its checkouts
are served from its fallback pool, one level deep (a fallback's own fallback is not followed).
Entering and leaving that state is logged once each (WARNING); ``stats()`` shows it.
Invariants: the routes are replaced whole by :meth:`Fallbacks.configure` (a reload); the
per-name state changes only under the fallbacks' own lock, never the registry's.
"""

from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psycopg2.extensions

from .pools import ConnectError, ConnectionPool, PoolClosed
from .pools.listener import Listener
from .pools.pool import READ_ONLY_SQLSTATE
from .schemas import RegistryConfig

if TYPE_CHECKING:
    from .registry import Registry

__all__ = ["PoolHandle", "Fallbacks"]

logger = logging.getLogger(__name__)

Connection = psycopg2.extensions.connection


class Fallbacks:
    """Which pool serves a name while it cannot, and whether it does so now."""

    def __init__(self) -> None:
        self._routes: dict[str, str] = {}  # name -> its fallback pool's name
        self._active: dict[str, dict[str, Any]] = {}  # names served from their fallback now
        self._checkouts: dict[str, int] = {}  # checkouts served from a fallback, per name
        self._lock = threading.Lock()

    def configure(self, config: RegistryConfig) -> None:
        """Take the routes of ``config`` (at build and at each reload)."""
        self._routes = {name: pc.fallback for name, pc in config.pools.items()
                        if pc.fallback is not None and pc.fallback in config.pools}

    def route(self, name: str) -> str | None:
        """The name of ``name``'s fallback pool, or None."""
        return self._routes.get(name)

    def serve(self, name: str, to: ConnectionPool, timeout: float | None,
              why: str) -> tuple[ConnectionPool, Connection]:
        """Check a connection out of ``to`` for ``name`` (raises what ``to.getconn`` raises)."""
        conn = to.getconn(timeout)
        with self._lock:
            state = self._active.get(name)
            if state is None:
                state = self._active[name] = {"to": to.name, "since": time.time(),
                                              "checkouts": 0, "why": why}
                logger.warning("registry: pool %s cannot serve (%s): serving it from %s",
                               name, why, to.name)
            state["checkouts"] += 1
            self._checkouts[name] = self._checkouts.get(name, 0) + 1
        return to, conn

    def recovered(self, name: str) -> None:
        """``name`` served a checkout itself: leave the fallback state if it was in it."""
        if name not in self._active:
            return
        with self._lock:
            state = self._active.pop(name, None)
        if state is not None:
            logger.warning("registry: pool %s serves again (after %.1f s and %d checkouts from %s)",
                           name, time.time() - state["since"], state["checkouts"], state["to"])

    def stats(self, name: str) -> dict[str, Any] | None:
        """``{"to", "active", "since" (ISO 8601, UTC), "reason", "checkouts"}``, or None for a
        name without a fallback."""
        to = self._routes.get(name)
        if to is None:
            return None
        state = self._active.get(name)
        return {
            "to": to,
            "active": state is not None,
            "since": (_dt.datetime.fromtimestamp(state["since"], _dt.timezone.utc).isoformat()
                      if state else None),
            "reason": state["why"] if state else None,
            "checkouts": self._checkouts.get(name, 0),
        }


class _HandleCheckout:
    """``with registry.get(name).conn() as conn``: returns it to the pool that gave it."""

    __slots__ = ("_handle", "_timeout", "_pool", "_conn")

    def __init__(self, handle: PoolHandle, timeout: float | None) -> None:
        self._handle = handle
        self._timeout = timeout
        self._pool: ConnectionPool | None = None
        self._conn: Connection | None = None

    def __enter__(self) -> Connection:
        self._pool, self._conn = self._handle._checkout(self._timeout)
        return self._conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, conn = self._pool, self._conn
        self._pool = self._conn = None
        if pool is not None and conn is not None:
            if exc is not None and getattr(exc, "pgcode", None) == READ_ONLY_SQLSTATE:
                pool.report_read_only(conn)
            pool.putconn(conn)


class PoolHandle:
    """A cheap, never-stale reference to a named pool of a registry."""

    __slots__ = ("_registry", "name")

    def __init__(self, registry: Registry, name: str) -> None:
        self._registry = registry
        self.name = name

    @property
    def pool(self) -> ConnectionPool:
        """The pool serving this name right now."""
        try:
            return self._registry._gen.pools[self.name]
        except KeyError:
            raise self._registry._unknown(self.name) from None

    def _checkout(self, timeout: float | None) -> tuple[ConnectionPool, Connection]:
        reg = self._registry
        while True:
            gen = reg._gen
            try:
                pool = gen.pools[self.name]
            except KeyError:
                raise reg._unknown(self.name) from None
            fallback = reg._fallbacks.route(self.name)
            if fallback is not None and pool.unreachable():
                return reg._fallbacks.serve(self.name, reg._gen.pools[fallback], timeout,
                                            "every address is down")
            if fallback is not None and pool.replicas_lagging():
                return reg._fallbacks.serve(self.name, reg._gen.pools[fallback], timeout,
                                            "every replica lags more than max_replica_lag")
            try:
                conn = pool.getconn(timeout)
            except ConnectError as exc:
                if fallback is None:
                    raise
                return reg._fallbacks.serve(self.name, reg._gen.pools[fallback], timeout,
                                            str(exc))
            except PoolClosed:
                # a reload retired this pool between the lookup and the checkout: use its
                # successor (unless the registry itself is closed, or nothing replaced it)
                if reg._closed or reg._gen.pools.get(self.name) is pool:
                    raise
                continue
            if fallback is not None:
                reg._fallbacks.recovered(self.name)
            return pool, conn

    def conn(self, timeout: float | None = None) -> _HandleCheckout:
        return _HandleCheckout(self, timeout)

    def getconn(self, timeout: float | None = None) -> Connection:
        return self._checkout(timeout)[1]

    def putconn(self, conn: Connection, close: bool = False) -> None:
        self._registry._putconn(self.name, conn, close)

    def stats(self) -> dict[str, Any]:
        s = self.pool.stats()
        fb = self._registry._fallbacks.stats(self.name)
        if fb is not None:
            s["fallback"] = fb
        return s

    def status(self) -> dict[str, int | float]:
        return self.pool.status()

    def listener(self, **kwargs: Any) -> Listener:
        """A :class:`~pgregistry.pools.listener.Listener` on a dedicated connection of the pool
        behind this name, outside its ``maxconn``. It follows the name: after a reload that
        replaces the pool it moves to the new one (reporting a gap); a reload that removes the
        name, or closing the registry, closes it. Keywords: those of ``Listener``
        (``on_notify``, ``on_reconnect``, ``reconnect_backoff``, ...). Raises
        :class:`ConnectError` if it cannot connect now."""
        return self._registry._new_listener(self, **kwargs)

    def __repr__(self) -> str:
        return f"<PoolHandle {self.name!r}>"

