"""Restoring a returned connection: the one place the return path cleans a connection.

Invariants:
- Uncommitted work is rolled back, never committed; a connection whose transaction state is
  unknown, or that is running a query, or is closed, is discarded ("broken").
- The user's ``reset`` runs after the rollback; if it raises, or leaves a transaction it cannot
  roll back, the connection is discarded ("reset_failed").
- On a role-aware pool a server that changed role retires the connection (see ``roles``).
- ``restore`` returns a close reason or None; it never touches the books (the bag does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import psycopg2.extensions as ext

from .bag import Bag
from .entry import Entry

__all__ = ["Restorer"]

logger = logging.getLogger(__name__)

Connection = ext.connection

_TX_IDLE = ext.TRANSACTION_STATUS_IDLE
_TX_INTRANS = ext.TRANSACTION_STATUS_INTRANS
_TX_INERROR = ext.TRANSACTION_STATUS_INERROR


class Restorer:
    """Cleans connections on their way back into a pool.

    :param reset: the user's callback, run on every returned connection (None: none).
    :param role_changed: the role guard's check (None on ``role="any"`` pools).
    """

    def __init__(
        self,
        bag: Bag,
        *,
        reset: Callable[[Connection], None] | None,
        role_changed: Callable[[Entry, Connection], bool] | None,
    ) -> None:
        self.bag = bag
        self.reset = reset
        self.role_changed = role_changed

    def restore(self, e: Entry, conn: Connection, status: int) -> str | None:
        """Clean ``conn`` (transaction ``status``, -1: unknown) for reuse. Returns why it must
        be closed instead, or None."""
        if status < 0 or conn.closed:
            return "broken"
        reason: str | None = None
        if status != _TX_IDLE:
            reason = self._rollback(conn, status)
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
