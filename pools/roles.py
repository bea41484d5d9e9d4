"""Roles: the writer guard, and servers that change role under a pool.

A ``writer`` pool connects only where writes are accepted (``target_session_attrs``
read-write) and, once connected, notices a demoted writer; a ``reader`` pool notices a replica
promoted under it. Either way the server's role comes for free: libpq keeps the settings the
server reports with every response (``in_hot_standby``, ``default_transaction_read_only``,
PostgreSQL 14+) current, so looking at it costs no round trip.

Invariants:
- A role change retires every connection to that address (idle ones now, checked-out ones on
  return) and asks maintenance to open afresh where placement says; a demoted writer is also
  banned and DNS re-resolved at once.
- The supervisor's periodic role check never waits on a server: it flags idle connections to
  be pinged on their next checkout (in the caller's thread, bounded by the watchdog).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import psycopg2.extensions as ext

from .bag import Bag
from .clock import Clock
from .connector import Connector
from .entry import Entry

__all__ = ["ROLES", "READ_ONLY_SQLSTATE", "RoleGuard", "server_role"]

logger = logging.getLogger(__name__)

Connection = ext.connection

ROLES = ("any", "writer", "reader")
READ_ONLY_SQLSTATE = "25006"  # read_only_sql_transaction: a write reached a read-only server


def server_role(conn: Connection) -> str | None:
    """'primary' or 'standby', from what the server reports of itself with every response
    (``in_hot_standby``, PostgreSQL 14+); None when it does not say. Only the server is
    trusted: ``default_transaction_read_only`` is also reported, but a session may set it
    (``SET``, psycopg2's ``set_session(readonly=True)`` in autocommit), so it says nothing
    about the server's role."""
    try:
        hot = conn.info.parameter_status("in_hot_standby")
    except Exception:
        return None
    if hot is None:
        return None
    return "standby" if hot == "on" else "primary"


class RoleGuard:
    """A role-aware pool's watch over its servers' roles.

    :param role: ``"writer"`` or ``"reader"`` (``"any"`` pools have no guard).
    :param check_interval: seconds between the supervisor's role checks; live.
    :param retire: retires the connections of address labels, with a close reason.
    :param wake: asks the supervisor for a maintenance step of this pool (lock-free).
    """

    def __init__(
        self,
        role: str,
        bag: Bag,
        connector: Connector,
        clock: Clock,
        *,
        retire: Callable[[list[str], str], None],
        wake: Callable[[], None],
        check_interval: float,
    ) -> None:
        self.role = role
        self.bag = bag
        self.connector = connector
        self.clock = clock
        self.retire = retire
        self.wake = wake
        self.check_interval = check_interval
        self.next_check_at = 0.0
        self.changes = 0
        # bounds one round trip the guard makes itself (the watchdog's; set by the pool)
        self.bounded: Callable[[Connection, str | None],
                               contextlib.AbstractContextManager[None]] | None = None

    def server_read_only(self, conn: Connection, label: str) -> bool | None:
        """Ask the server (bounded like a ping) whether it refuses writes by itself: in
        recovery, or ``default_transaction_read_only`` on in its configuration (its
        ``reset_val``: a session's own ``SET`` does not change it). None if it cannot say.
        The caller's transaction, failed already, is rolled back first."""
        guard = (self.bounded(conn, label) if self.bounded is not None
                 else contextlib.nullcontext())
        try:
            if conn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
                conn.rollback()
            with guard, conn.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery() OR reset_val = 'on' FROM pg_settings"
                            " WHERE name = 'default_transaction_read_only'")
                row = cur.fetchone()
            if not conn.autocommit:
                conn.rollback()
        except Exception:
            return None
        return bool(row[0]) if row else None

    def changed(self, e: Entry, conn: Connection) -> bool:
        """Whether the server behind ``conn`` no longer has the role this pool needs (or had
        when the connection opened). A change retires every connection to that address;
        returns True for this one."""
        now_role = server_role(conn)
        if now_role is None or now_role == e.server_role:
            return False
        if self.role == "writer" and now_role != "primary":
            self.writer_demoted(e.address, f"the server reports {now_role}")
        else:
            self.role_change(e.address, e.server_role, now_role)
        return True

    def report_read_only(self, conn: Connection) -> None:
        """A write failed with SQLSTATE 25006 on ``conn``: on a writer pool, its server is a
        demoted writer."""
        if self.role != "writer":
            return
        e = self.bag.entries.get(id(conn))
        if e is None or e.wref is None or e.wref() is not conn:
            return
        # A caller's own read-only transaction or session fails a write with 25006 too: only
        # the server's own word counts. A standby (in_hot_standby) is a demoted writer; a
        # primary whose reported default_transaction_read_only is off refused this
        # transaction only; otherwise the server is asked whether it refuses writes by
        # itself (in recovery, or read-only by its configuration rather than this session's
        # SET). A server that cannot be asked is taken at its word: 25006.
        role = server_role(conn)
        if role == "primary":
            try:
                session_ro = conn.info.parameter_status("default_transaction_read_only")
            except Exception:
                session_ro = None
            if session_ro == "off" or (
                    session_ro == "on" and self.server_read_only(conn, e.address) is False):
                logger.debug("pool %s: a write failed with 25006 on %s, a primary: the "
                             "caller's own read-only transaction", self.bag.name, e.address)
                return
        self.writer_demoted(e.address, "a write failed: read-only transaction (25006)")

    def writer_demoted(self, label: str, how: str) -> None:
        """The writer at ``label`` is no more: ban it, close its idle connections now and its
        checked-out ones on return, and re-resolve at once to find the new writer."""
        first = self.connector.book.mark(label, self.clock.monotonic(), "demoted_writer")
        if first:
            self.changes += 1
            logger.warning(
                "pool %s: %s is no longer the writer (%s): closing its connections, "
                "re-resolving", self.bag.name, label, how,
            )
        self.retire([label], "demoted_writer")
        self.connector.refresh_soon(force=True)
        self.wake()

    def role_change(self, label: str, before: str | None, after: str) -> None:
        """A server changed role (a replica promoted, a server rebuilt): like a DNS change, its
        connections are retired and opened afresh where placement says."""
        self.changes += 1
        logger.warning("pool %s: %s changed role (%s -> %s): retiring its connections",
                       self.bag.name, label, before, after)
        self.retire([label], "role_change")
        self.wake()

    def check(self, now: float) -> None:
        """The supervisor's role check, when due: every idle connection is pinged on its next
        checkout, which brings the server's current role."""
        if now < self.next_check_at:
            return
        self.next_check_at = now + self.check_interval
        for e in list(self.bag.idle):
            e.needs_ping = True
