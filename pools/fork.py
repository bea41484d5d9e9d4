"""Fork handling: a child process never touches its parent's connections.

A pool inherited through ``fork()`` forgets every inherited connection without closing it: its
socket descriptor is first pointed at ``/dev/null`` (``detach``), so nothing the child does
(libpq's goodbye on close or deallocation included) reaches the parent's session. The child's
pool then starts afresh: empty books, a new lock, prewarmed anew by the child's supervisor.

Invariants:
- The at-fork hook never logs: a logging stream's lock may have been inherited locked by a
  thread that was writing at the fork; ``stats()`` shows the fresh start instead.
- The hook never raises: a pool that fails to reset must not break the fork.
- The process's supervisor is reset before any pool (its thread and I/O workers do not exist
  in the child; a pool's reset asks it for a fresh start).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterable
from typing import Any, Protocol

from .entry import CLOSED, Entry
from .supervisor import _reset_after_fork as _reset_supervisor

__all__ = ["ForkAware", "detach", "forget_inherited", "register"]


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


_live: weakref.WeakSet[Any] = weakref.WeakSet()


def register(obj: ForkAware) -> None:
    """``obj._after_fork_in_child()`` runs in every child forked while ``obj`` lives."""
    _live.add(obj)


def detach(conn: Any) -> None:
    """Make an inherited connection harmless in a forked child: its socket descriptor now
    points at /dev/null."""
    try:
        fd = conn.fileno()
    except Exception:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def forget_inherited(entries: Iterable[Entry]) -> None:
    """Inherited entries leave without a close: each connection detached, the entry closed."""
    for e in entries:
        conn = e.conn if e.conn is not None else (e.wref() if e.wref is not None else None)
        if conn is not None:
            detach(conn)
        e.state = CLOSED
        e.wref = None
        e.conn = None


def _after_fork_in_child() -> None:
    # the process's supervisor first (its thread and workers are gone), then every pool
    with contextlib.suppress(Exception):
        _reset_supervisor()
    for obj in list(_live):
        with contextlib.suppress(Exception):  # never break a fork (and never log in it)
            obj._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
