"""``with pool.conn() as conn``: a checkout whose return cannot be forgotten.

Invariants:
- The connection goes back on exit, whatever happened inside (the return path rolls back an
  open transaction and discards a connection the exception broke).
- A write refused with SQLSTATE 25006 (read-only transaction) inside the block is reported to
  the pool before the return: on a writer pool, its server is a demoted writer.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

import psycopg2.extensions as ext

from .roles import READ_ONLY_SQLSTATE

__all__ = ["Checkout", "CheckoutSource"]

Connection = ext.connection


class CheckoutSource(Protocol):
    def getconn(self, timeout: float | None = None) -> Connection: ...

    def putconn(self, conn: Connection, close: bool = False) -> None: ...

    def report_read_only(self, conn: Connection) -> None: ...


class Checkout:
    """``with pool.conn() as conn``: returns the connection on exit (rolled back if a
    transaction is open; discarded if the exception broke it)."""

    __slots__ = ("_pool", "_timeout", "_conn")

    def __init__(self, pool: CheckoutSource, timeout: float | None) -> None:
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
