"""Slots: what ``maxconn`` counts, and when a slot is taken and freed.

A pool's ``size`` (under the bag's lock) is the number of slots in use, and it is what
``maxconn`` bounds: ``size`` = ``len(entries)`` + ``opening`` + ``len(closing)``. So
``maxconn`` bounds the sockets a pool has open or opening on the client side, not only the
connections in its books (HikariCP counts a connection against its maximum until it is closed,
too).

Invariants (under the bag's ``lock``):

- A slot is taken before its connect starts (``reserve_locked``, a caller's own reservation in
  ``Bag.getconn_slow``, or a waiter's permit) and counted in ``opening``; a connect's
  :class:`Slot` is freed exactly once if it fails (``open_failed_locked``) or becomes an entry
  once (``admit_locked``).
- A connection that leaves the books (``Bag.forget_locked``) with its socket still open keeps
  its slot, in ``closing``, until its close has returned (``close_finished``), whoever closes
  it: a caller's return, an I/O worker (``Supervisor.run_io``), an interrupt's recovery. A slot
  is freed by the first ``close_finished`` of its entry, never twice; a close that never ran
  because an interrupt landed first is run by the interrupted thread before it frees the slot.
- A freed slot goes to the oldest waiter as a permit (``grant_permits_locked``).
- Counting that must not be torn by an asynchronous exception is plain statements
  (``del``, ``+=``, stores), with no call in between.

The methods are the bag's (:class:`Slots` is a base of :class:`pgregistry.pools.bag.Bag`).
"""

from __future__ import annotations

from _thread import LockType
from collections import deque
from typing import TYPE_CHECKING, Any

from .entry import Entry
from .stats import Counters

__all__ = ["Slot", "Slots"]


class Slot:
    """A slot counted in ``size`` for a connect under way, owned by one thread until the
    connect succeeds (``entry``: the connection entered the books) or fails (the slot freed).
    ``reserved`` turns false exactly once, under the lock, in plain attribute arithmetic."""

    __slots__ = ("reserved", "entry")

    def __init__(self) -> None:
        self.reserved = True
        self.entry: Entry | None = None


class Slots:
    """The slot accounting of the bag (see the module docstring)."""

    if TYPE_CHECKING:  # the bag's books (pgregistry.pools.bag.Bag)
        lock: LockType
        closed: bool
        size: int
        opening: int
        minconn: int
        maxconn: int | float
        entries: dict[int, Entry]
        closing: dict[int, Entry]
        orphans: deque[Any]
        counters: Counters

        def collect_orphans_locked(self) -> None: ...

        def grant_permits_locked(self) -> None: ...

    def reserve_locked(self) -> bool:
        """Count a slot for a connection about to be opened, if below ``maxconn``."""
        if self.closed or self.size >= self.maxconn:
            return False
        self.size += 1
        self.opening += 1
        return True

    def admit_locked(self, e: Entry, slot: Slot | None = None) -> None:
        """A connection opened for a reserved slot enters the books (owned by its opener, state
        RETURNING, until it is checked out or released)."""
        if self.orphans:  # before reusing an id(conn) key an orphan may still hold
            self.collect_orphans_locked()
        # (plain attribute arithmetic: no asynchronous exception lands in it)
        self.opening -= 1
        self.entries[e.key] = e
        if slot is not None:
            slot.reserved = False
            slot.entry = e
        self.counters.opened += 1

    def open_failed_locked(self, exc: BaseException, slot: Slot | None = None) -> None:
        """A reserved slot's connect failed: the slot is free again (once: a ``slot`` already
        freed is left alone)."""
        if slot is not None:
            if not slot.reserved:
                return
            slot.reserved = False
        self.size -= 1
        self.opening -= 1
        if isinstance(exc, Exception):  # (an interrupt is no connect error, and its
            self.counters.connect_errors += 1  # traceback would keep its frames alive)
            self.counters.last_connect_error = exc
        self.grant_permits_locked()

    def close_finished(self, e: Entry) -> bool:
        """The close of ``e`` (out of the books) has returned, or was never needed: its slot is
        free for waiters. Idempotent: only the first call for an entry frees its slot. Returns
        whether the pool is below ``minconn`` (maintenance should refill it)."""
        with self.lock:
            if self.closing.get(id(e)) is e:
                # (plain statements: no asynchronous exception lands between the two)
                del self.closing[id(e)]
                self.size -= 1
                self.grant_permits_locked()
            return self.size < self.minconn and not self.closed

    def live_locked(self) -> int:
        """Connections in the books or opening: ``size`` less those closing."""
        return self.size - len(self.closing)
