"""Restoring a returned connection: the one place the return path cleans a connection.

Invariants:
- Uncommitted work is rolled back, never committed; a connection whose transaction state is
  unknown, or that is running a query, or is closed, is discarded ("broken").
- The user's ``reset`` runs after the rollback; if it raises, or leaves a transaction it cannot
  roll back, the connection is discarded ("reset_failed").
- ``recycle: clean``: after the rollback, ``DISCARD ALL`` (outside a transaction, bounded by the
  watchdog's ping deadline) before the user's ``reset``; failing or late, the connection is
  discarded ("reset_failed").
- What the borrower changed on the connection's client side (``autocommit``, ``readonly``,
  ``isolation_level``, ``deferrable``, ``cursor_factory``) is put back as the pool set it up
  (after ``autocommit`` and ``configure``); if it cannot be, the connection is discarded.
- Every round trip of a return (rollback, putting the session characteristics back, ``DISCARD
  ALL``, the user's ``reset``) runs under one bound, the watchdog's ``ping_timeout``: a
  connection that misses it has its socket cut and is discarded ("broken"), its slot freed.
- On a role-aware pool a server that changed role retires the connection (see ``roles``).
- ``restore`` returns a close reason or None; it never touches the books (the bag does).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import psycopg2.extensions as ext

from .bag import Bag
from .entry import Entry
from .stats import summarise_error

__all__ = ["RECYCLE_MODES", "Restorer"]

#: psqlpy's recycling methods (its ``conn_recycling_method``), the pool's ``recycle``.
RECYCLE_MODES = ("fast", "verified", "clean")

logger = logging.getLogger(__name__)

Connection = ext.connection

# bounds one round trip on a connection, given its address label (the watchdog's ``bounded``)
Bound = Callable[[Connection, "str | None"], contextlib.AbstractContextManager[None]]

_TX_IDLE = ext.TRANSACTION_STATUS_IDLE
_TX_INTRANS = ext.TRANSACTION_STATUS_INTRANS
_TX_INERROR = ext.TRANSACTION_STATUS_INERROR


def _setup_of(conn: Connection) -> tuple[Any, ...]:
    return (conn.autocommit, conn.readonly, conn.isolation_level, conn.deferrable,
            conn.cursor_factory)


class Restorer:
    """Cleans connections on their way back into a pool.

    :param reset: the user's callback, run on every returned connection (None: none).
    :param role_changed: the role guard's check (None on ``role="any"`` pools).
    :param bounded: a context manager bounding one round trip on a connection (the
        watchdog's), for ``DISCARD ALL``.
    """

    def __init__(
        self,
        bag: Bag,
        *,
        reset: Callable[[Connection], None] | None,
        role_changed: Callable[[Entry, Connection], bool] | None,
        bounded: Bound | None = None,
    ) -> None:
        self.bag = bag
        self.reset = reset
        self.role_changed = role_changed
        self.bounded = bounded
        self.discard_all = False  # recycle: clean

    def restore(self, e: Entry, conn: Connection, status: int) -> str | None:
        """Clean ``conn`` (transaction ``status``, -1: unknown) for reuse, within the bound.
        Returns why it must be closed instead, or None."""
        if status < 0 or conn.closed:
            return "broken"
        guard = self.bounded(conn, e.address) if self.bounded else contextlib.nullcontext()
        reason: str | None = None
        done = False
        try:
            with guard:
                reason = self._restore(e, conn, status)
                done = True
        except Exception as exc:  # (the guard cut the socket under a call, or at its end)
            if done and reason is not None:
                return reason  # the step that failed says why
            logger.warning("pool %s: returning a connection failed (%s): discarding",
                           self.bag.name, summarise_error(exc))
            return "broken"
        if reason is None and conn.closed:
            return "broken"
        return reason

    def _restore(self, e: Entry, conn: Connection, status: int) -> str | None:
        reason: str | None = None
        if status != _TX_IDLE:
            reason = self._rollback(conn, status)
        if reason is None and e.setup is not None and e.setup != _setup_of(conn):
            reason = self._put_back(e.setup, conn)
        if reason is None and self.discard_all:
            reason = self._discard_all(e, conn)
        if reason is None and self.reset is not None:
            reason = self._run_reset(conn)
        if reason is None and self.role_changed is not None and self.role_changed(e, conn):
            reason = e.doom_reason or "role_change"
        return reason

    def _rollback(self, conn: Connection, status: int) -> str | None:
        if status not in (_TX_INTRANS, _TX_INERROR):
            return "broken"  # ACTIVE (a query running) or UNKNOWN (connection lost)
        name = self.bag.name
        try:
            conn.rollback()
        except Exception as exc:
            logger.warning("pool %s: rollback on return failed (%s): discarding", name, exc)
            return "broken"
        with self.bag.lock:
            self.bag.counters.rollbacks += 1
        logger.debug("pool %s: rolled back uncommitted work on return", name)
        return None

    def _put_back(self, setup: tuple[Any, ...], conn: Connection) -> str | None:
        """Put the client-side attributes back as the pool set them up. In autocommit mode
        psycopg2 sends the session characteristics to the server (``SET
        default_transaction_...``), so they are put back there, then autocommit."""
        autocommit, readonly, isolation_level, deferrable, cursor_factory = setup
        try:
            conn.cursor_factory = cursor_factory
            if (conn.readonly, conn.isolation_level, conn.deferrable) != (
                    readonly, isolation_level, deferrable):
                conn.autocommit = True  # (the server-side defaults too, not only the next BEGIN)
                conn.readonly = readonly
                conn.deferrable = deferrable
                conn.isolation_level = isolation_level
            conn.autocommit = autocommit
        except Exception as exc:
            logger.warning("pool %s: putting the connection's settings back failed (%s): "
                           "discarding", self.bag.name, summarise_error(exc))
            return "reset_failed"
        if _setup_of(conn) != setup:
            return "reset_failed"
        logger.debug("pool %s: the borrower's connection settings were put back", self.bag.name)
        return None

    def _discard_all(self, e: Entry, conn: Connection) -> str | None:
        """``DISCARD ALL``: session settings, temporary tables, prepared statements, advisory
        locks, LISTENs and cursors are gone (PostgreSQL's documentation of DISCARD)."""
        guard = self.bounded(conn, e.address) if self.bounded else contextlib.nullcontext()
        try:
            autocommit = conn.autocommit
            conn.autocommit = True  # DISCARD ALL cannot run inside a transaction block
            try:
                with guard, conn.cursor() as cur:
                    cur.execute("DISCARD ALL")
            finally:
                if not conn.closed:
                    conn.autocommit = autocommit
        except Exception as exc:
            logger.warning("pool %s: DISCARD ALL on return failed (%s): discarding",
                           self.bag.name, summarise_error(exc))
            return "reset_failed"
        return None

    def _run_reset(self, conn: Connection) -> str | None:
        assert self.reset is not None
        try:
            self.reset(conn)
            if conn.get_transaction_status() != _TX_IDLE:
                conn.rollback()
        except Exception as exc:
            logger.warning("pool %s: reset failed on return (%r): discarding",
                           self.bag.name, exc)
            return "reset_failed"
        return None
