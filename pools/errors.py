"""The errors a pool raises. Every one is a ``psycopg2.Error``; messages are built from
structured attributes and never contain a password."""

from __future__ import annotations

from typing import Any

import psycopg2

__all__ = [
    "PoolError",
    "PoolClosed",
    "PoolTimeout",
    "PoolTooManyWaiters",
    "ConnectError",
    "BadConnectionError",
]


class PoolError(psycopg2.Error):
    """Base of every pool error (also the psycopg2.pool name, so ``except PoolError`` works for
    code written against the drop-ins)."""

    def __init__(self, message: str, *, pool: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.pool = pool
        self.details = details


class PoolClosed(PoolError):
    """The pool was closed; no connection can be taken from or given to it."""


class PoolTimeout(PoolError):
    """No connection could be handed out in time (or at once, with timeout 0).

    ``waited_s`` is how long the caller waited; ``counts`` the pool's figures at that moment;
    ``__cause__`` the last connect error, if there was one."""

    def __init__(
        self,
        message: str,
        *,
        pool: str | None = None,
        waited_s: float = 0.0,
        counts: dict[str, int] | None = None,
    ) -> None:
        super().__init__(message, pool=pool, waited_s=waited_s, counts=counts or {})
        self.waited_s = waited_s
        self.counts = counts or {}


class PoolTooManyWaiters(PoolTimeout):
    """The waiting queue is full (``max_waiting``): refused at once."""


class ConnectError(PoolError, psycopg2.OperationalError):
    """A new connection could not be opened. Also an ``OperationalError``, like the error
    ``psycopg2.connect`` raises, which is kept as ``__cause__``."""


class BadConnectionError(PoolError):
    """``putconn`` was given a connection this pool does not hold as checked out: returned
    twice, or never given out by this pool. The pool is left as it was."""
