"""One libpq connect attempt: what its failure says, and a deadline kept to the millisecond.

:func:`classify` reads a refused connect in PostgreSQL's own words (libpq gives a connect
failure as text only: psycopg2 has no SQLSTATE for it). :func:`bounded_connect` opens one
connection within a caller's deadline: libpq's ``connect_timeout`` counts whole seconds (0.05 s
becomes 1 s), so a deadline closer than ``connect_timeout`` is given to libpq in the whole
seconds that end before it, and under one second the connect runs on an I/O worker of the
process's supervisor (``IOWorkers.start_now``: at once, outside the per-host bounds) and the
caller waits for it only until its deadline; a connection that arrives later is closed by that
thread, and :class:`PendingConnect` says when its socket is gone (so a pool can keep the slot
counted until then: ``maxconn`` holds for sockets). libpq's own timeout (1 s) still ends the
worker's connect soon after.
"""

from __future__ import annotations

import logging
import math
import threading
from _thread import allocate_lock as _allocate_lock
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions

from .supervisor import get_supervisor

__all__ = ["DeadlinePassed", "PendingConnect", "bounded_connect", "classify", "first_line"]

logger = logging.getLogger(__name__)

Connection = psycopg2.extensions.connection

# Capacity, SQLSTATE 53300 (too_many_connections): PostgreSQL's src/backend/storage/ipc/
# procarray.c and src/backend/utils/init/postinit.c (max_connections,
# superuser_reserved_connections, reserved_connections (16+), a role's and a database's
# CONNECTION LIMIT); PgBouncer's max_client_conn and friends have their own wording.
_CAPACITY = (
    "too many clients",
    "remaining connection slots are reserved",
    "too many connections for role",
    "too many connections for database",
    "too many connections for user",
    "no more connections allowed",  # PgBouncer
)
# SQLSTATE 57P03 (cannot_connect_now): src/backend/postmaster/postmaster.c
_UNAVAILABLE = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
)
# libpq's target_session_attrs refusals (src/interfaces/libpq/fe-connect.c)
_WRONG_ROLE = (
    "server is in hot standby mode",
    "server is not in hot standby mode",
    "session is read-only",
    "session is not read-only",
)
# Authentication, SQLSTATE 28P01 (invalid_password) and 28000
# (invalid_authorization_specification): src/backend/libpq/auth.c and hba.c,
# src/backend/utils/init/miscinit.c; libpq's own fe_sendauth and SCRAM complaints.
_AUTH = (
    "authentication failed",  # password, md5, SCRAM, PAM, ident, peer, LDAP, RADIUS, cert...
    "no pg_hba.conf entry",
    "pg_hba.conf rejects connection",
    "is not permitted to log in",
    "fe_sendauth",
    "password is required",
    "no password supplied",
    "server requested a password",
)


def classify(exc: BaseException) -> str:
    """What a failed connect says about the address: ``refused``, ``timeout`` (nothing
    answered within libpq's connect_timeout), ``capacity`` (out of connection slots),
    ``unavailable`` (starting up, shutting down, in recovery), ``wrong_role``
    (target_session_attrs), ``auth`` (the credentials or pg_hba refused, or no such role),
    ``rejected`` (another problem of the settings: no such database, no CONNECT privilege),
    or ``error``. Reads PostgreSQL's English messages (a server whose ``lc_messages`` is
    another language is classified ``error``)."""
    low = str(exc).lower()
    if "connection refused" in low:
        return "refused"
    if "timeout expired" in low or "timed out" in low:
        return "timeout"
    if any(w in low for w in _CAPACITY):
        return "capacity"
    if any(w in low for w in _UNAVAILABLE):
        return "unavailable"
    if any(w in low for w in _WRONG_ROLE):
        return "wrong_role"
    if any(w in low for w in _AUTH) or ('role "' in low and "does not exist" in low):
        return "auth"
    if "does not exist" in low or "permission denied" in low or "password" in low:
        return "rejected"  # the server answered: a problem of the settings, not the address
    return "error"


def first_line(exc: BaseException) -> str:
    """The useful part of a libpq error: what failed, without the "connection to server at"
    preamble (the address is said elsewhere)."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    _, sep, rest = line.partition(" failed: ")
    return rest if sep else line


class DeadlinePassed(psycopg2.OperationalError):
    """A connect given up at the caller's deadline (not at libpq's connect_timeout): it says
    nothing about the address. ``pending`` tells when its socket is gone."""

    def __init__(self, message: str, pending: PendingConnect) -> None:
        super().__init__(message)
        self.pending = pending


class PendingConnect:
    """A connect on a worker thread of its own (see the module's docstring). The caller waits
    on a bare lock (a ``threading.Event`` is not safe against an interrupt landing inside its
    wait); the worker releases it once, when the connect is over."""

    def __init__(self, kwargs: dict[str, Any], factory_kwargs: dict[str, Any]) -> None:
        self._kwargs = kwargs
        self._factory_kwargs = factory_kwargs
        self._lock = threading.Lock()
        self._signal = _allocate_lock()
        self._signal.acquire()  # released once by the worker
        self._done = False
        self._conn: Connection | None = None
        self._error: BaseException | None = None
        self._abandoned = False
        self._settled = False
        self._callbacks: list[Callable[[], None]] = []

    def start(self) -> None:
        """Start the connect at once on an I/O worker of the process's supervisor (the
        unbounded class: it queues behind no host's work)."""
        get_supervisor().io_now("connect", self._run)

    def _run(self) -> None:
        conn: Connection | None = None
        error: BaseException | None = None
        try:
            conn = psycopg2.connect(**self._kwargs, **self._factory_kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            error = exc
        with self._lock:
            self._done = True
            abandoned = self._abandoned
            if not abandoned:
                self._conn, self._error = conn, error
        if abandoned:
            if conn is not None:
                _close_quietly(conn)
            self._settle()
        self._signal.release()

    def wait(self, timeout_s: float) -> Connection | None:
        """The connection, or None when ``timeout_s`` passed first (the connect is then given
        up). Raises what the connect raised. An interrupt while waiting gives it up too."""
        try:
            finished = self._signal.acquire(True, max(0.0, timeout_s))
        except BaseException:
            self.abandon()
            raise
        if not finished:
            self.abandon()
            return None
        with self._lock:
            conn, error = self._conn, self._error
            self._conn = self._error = None
        self._settle()
        if error is not None:
            raise error
        return conn

    def abandon(self) -> None:
        """Give the connect up: a connection it opens is closed (now, if it already has)."""
        with self._lock:
            self._abandoned = True
            conn, self._conn = self._conn, None
            finished = self._done
        if finished:
            if conn is not None:
                _close_quietly(conn)
            self._settle()

    @property
    def settled(self) -> bool:
        """Whether no socket of this connect is left open by the pool's side."""
        return self._settled

    def _settle(self) -> None:
        with self._lock:
            if self._settled:
                return
            self._settled = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()

    def on_settled(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (on whichever thread settles it) once no socket is left; at once if
        none is."""
        with self._lock:
            if not self._settled:
                self._callbacks.append(fn)
                return
        fn()


def bounded_connect(kwargs: dict[str, Any], factory_kwargs: dict[str, Any],
                    connect_timeout_s: int, remaining_s: float | None) -> Connection:
    """``psycopg2.connect(**kwargs)`` within ``connect_timeout_s`` (whole seconds, 0: none)
    and ``remaining_s`` (the caller's deadline, to the millisecond). Raises what libpq raised,
    or :class:`DeadlinePassed`."""
    if remaining_s is None or (connect_timeout_s and remaining_s >= connect_timeout_s):
        if connect_timeout_s:
            kwargs["connect_timeout"] = str(connect_timeout_s)
        return psycopg2.connect(**kwargs, **factory_kwargs)  # type: ignore[no-any-return]
    if remaining_s >= 1:  # whole seconds that end before the deadline: libpq keeps them
        kwargs["connect_timeout"] = str(math.floor(remaining_s))
        return psycopg2.connect(**kwargs, **factory_kwargs)  # type: ignore[no-any-return]
    kwargs["connect_timeout"] = "1"
    job = PendingConnect(kwargs, factory_kwargs)
    try:
        job.start()
    except BaseException:  # (an interrupt while the worker starts: what it opens is closed)
        job.abandon()
        raise
    conn = job.wait(remaining_s)
    if conn is None:
        raise DeadlinePassed(f"timeout expired: the caller's deadline passed after "
                             f"{max(0.0, remaining_s):.3f} s of connecting", job)
    return conn


def _close_quietly(conn: Connection) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a dead connection may complain
        logger.debug("closing a given-up connection failed", exc_info=True)
