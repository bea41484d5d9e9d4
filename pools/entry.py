"""The pool's record of one connection."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import psycopg2.extensions

__all__ = ["Entry", "IDLE", "IN_USE", "RETURNING", "CLOSED"]

# States. Maintenance only ever touches IDLE entries, and takes them out of the idle queue
# (under the pool's lock) before closing them, so it never races a checkout.
IDLE = 0  # in the idle queue; the pool holds the connection
IN_USE = 1  # checked out; the pool holds only a weak reference
RETURNING = 2  # being returned (rolled back, checked) by putconn
CLOSED = 3  # gone from the pool


class Entry:
    """One pooled connection: where it goes, when it was made, when it expires, its state."""

    __slots__ = (
        "conn",
        "wref",
        "key",
        "address",
        "created_at",
        "expires_at",
        "last_used_at",
        "checked_out_at",
        "state",
        "doom_reason",
        "backend_pid",
        "server_role",
        "fresh_until",
        "uses",
        "checkout_stack",
        "leak_warned",
        "needs_ping",
        "setup",
    )

    def __init__(
        self,
        conn: psycopg2.extensions.connection,
        *,
        address: str,
        created_at: float,
        expires_at: float,
        on_lost: Callable[[weakref.ref[Any]], None],
    ) -> None:
        self.conn: psycopg2.extensions.connection | None = conn
        # The weak reference lives as long as the entry: when a checked-out connection is
        # garbage-collected, ``on_lost`` gets the weakref (see ConnectionPool._lost).
        self.wref: weakref.ref[psycopg2.extensions.connection] | None = weakref.ref(conn, on_lost)
        self.key = id(conn)
        self.address = address
        self.created_at = created_at
        self.expires_at = expires_at
        self.last_used_at = created_at
        self.checked_out_at = 0.0
        self.state = IDLE
        # A reason to close the connection when it comes back (soft expiry, drain, DNS change).
        self.doom_reason: str | None = None
        self.backend_pid = conn.info.backend_pid
        self.server_role: str | None = None  # as reported when it opened (pools.pool.server_role)
        # until when a checkout may hand it out with no check at all: min(expiry, last use +
        # validation_bypass); -inf sends every checkout of it through the slow path
        self.fresh_until = created_at
        self.uses = 0  # checkouts (counted by the holder: exact without a lock)
        self.checkout_stack: str | None = None  # leak detection: where it was checked out
        self.leak_warned = False
        self.needs_ping = False  # ping on the next checkout (the supervisor's role check)
        # the client-side attributes the pool set up (autocommit, readonly, isolation_level,
        # deferrable, cursor_factory), put back on return when a borrower changed them
        self.setup: tuple[Any, ...] | None = None

    def __repr__(self) -> str:
        state = ("idle", "in use", "returning", "closed")[self.state]
        return f"<Entry pid={self.backend_pid} {self.address} {state}>"
