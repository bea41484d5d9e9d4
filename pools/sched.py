"""A generic schedule of deadlines, steppable from tests.

Tasks are callables taking the current time and returning when they next want to run (an
absolute time on the scheduler's clock) or ``None`` to leave the schedule. A task that raises is
logged and tried again later; nothing a task does can stop the scheduler.

``request(task)`` asks for a task to run as soon as possible. It takes no lock (it only puts on
a ``queue.SimpleQueue``), so it is safe from weakref callbacks, ``__del__`` and signal handlers.
``request_by(task, deadline)`` does the same only when ``deadline`` is earlier than the task's
current one (one comparison when it is not): the cheap way for a state change that moves a
deadline earlier to tell the scheduler.

Invariants:
- The heap holds O(live tasks) entries: a task at deadline ``inf`` is not on it at all, and
  entries left behind by a cancel or by a deadline moved earlier (lazy deletion) are compacted
  away once they are more than half of the heap.
- A cancelled task drops its callable at once, so whatever it referenced (a pool, a registry)
  is freed even before its heap entry is.
- The thread never sleeps past the earliest deadline: a deadline added earlier than the one it
  sleeps toward wakes it.

Cuts (``at``/``uncut``) are the cheap kind of deadline, for the watchdog's bound on each query
and ping: a one-shot callable, no Task. A cut is a list ``[at, seq, fn]`` on a heap of its own
(one push under a short lock); cancelling it is one atomic store (``fn`` cleared), and cleared
entries are dropped as they come up or when the heap has doubled since it was last compacted,
so it holds O(cuts live within the longest timeout) entries. A cut's callable must be instant
(the watchdog's only shuts a socket down): it runs on the scheduler's thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import queue
import threading
from collections.abc import Callable
from typing import Any

from .clock import REAL_CLOCK, Clock

__all__ = ["Scheduler", "Task"]

logger = logging.getLogger(__name__)

RETRY_AFTER_ERROR_S = 5.0
MAX_SLEEP_S = 60.0
COMPACT_MIN_STALE = 32  # compact only heaps with at least this many stale entries
CUTS_COMPACT_MIN = 1024  # the cuts' heap is compacted when it reaches this or twice its last size


def _cancelled(now: float) -> float | None:
    return None


class Task:
    """A named callable on the schedule. ``due`` is its current deadline (None: not scheduled;
    ``inf``: scheduled for nothing until requested)."""

    __slots__ = ("name", "fn", "due", "cancelled", "__weakref__")

    def __init__(self, name: str, fn: Callable[[float], float | None]) -> None:
        self.name = name
        self.fn = fn
        self.due: float | None = None
        self.cancelled = False

    def __repr__(self) -> str:
        return f"<Task {self.name} due={self.due}>"


class Scheduler:
    def __init__(self, clock: Clock = REAL_CLOCK) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Task]] = []
        self._stale = 0  # heap entries of cancelled tasks or of deadlines moved earlier
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._sleeping_until = -math.inf  # the deadline the thread sleeps toward (a hint)
        self._cuts: list[list[Any]] = []  # [at, seq, fn or None (cancelled)]
        self._cuts_lock = threading.Lock()
        self._cuts_compact_at = CUTS_COMPACT_MIN

    # -- cuts: the watchdog's one-shot deadlines ----------------------------------------------

    def at(self, deadline: float, fn: Callable[[], None]) -> list[Any]:
        """Call ``fn()`` (instant, never blocking) at ``deadline`` (the clock's monotonic
        seconds) on the scheduler's thread unless :meth:`uncut` first. Returns the handle.
        Wakes the thread if it sleeps past ``deadline``."""
        item: list[Any] = [deadline, next(self._seq), fn]
        with self._cuts_lock:
            heap = self._cuts
            heapq.heappush(heap, item)
            if len(heap) >= self._cuts_compact_at:
                self._compact_cuts_locked()
        if deadline < self._sleeping_until:
            self._requests.put(None)
        return item

    @staticmethod
    def uncut(item: list[Any]) -> None:
        """Cancel a cut (an atomic store; lock-free). Its ``fn`` may still be running."""
        item[2] = None

    def _compact_cuts_locked(self) -> None:
        heap = [x for x in self._cuts if x[2] is not None]
        heapq.heapify(heap)
        self._cuts = heap
        self._cuts_compact_at = max(CUTS_COMPACT_MIN, 2 * len(heap))

    def cuts_size(self) -> int:
        """Entries on the cuts' heap, cancelled ones included."""
        return len(self._cuts)

    def _next_cut_locked(self) -> float | None:
        heap = self._cuts
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _run_cuts(self, now: float) -> int:
        fns: list[Callable[[], None]] = []
        with self._cuts_lock:
            heap = self._cuts
            while heap and heap[0][0] <= now:
                fn = heapq.heappop(heap)[2]
                if fn is not None:
                    fns.append(fn)
        for fn in fns:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a cut never stops the scheduler
                logger.exception("a watchdog deadline failed")
        return len(fns)

    def _after_fork_in_child(self) -> None:
        """The parent's threads (and the calls its cuts guard) do not exist in a child."""
        self._lock = threading.Lock()
        self._cuts_lock = threading.Lock()
        self._cuts = []
        self._cuts_compact_at = CUTS_COMPACT_MIN
        self._sleeping_until = -math.inf

    # -- scheduling -------------------------------------------------------------------------

    def add(self, task: Task, due: float | None = None) -> Task:
        """Put ``task`` on the schedule at ``due`` (default: now)."""
        self._schedule(task, self.clock.monotonic() if due is None else due)
        return task

    def _schedule(self, task: Task, due: float) -> None:
        with self._lock:
            if task.cancelled:
                return
            # Only ever move a deadline earlier here; a later one is set by the task's own result.
            if task.due is not None and task.due <= due:
                return
            if task.due is not None and task.due != math.inf:
                self._stale += 1  # its old entry stays behind
            task.due = due
            if due == math.inf:
                return  # nothing to run: off the heap until requested
            heapq.heappush(self._heap, (due, next(self._seq), task))
            self._maybe_compact_locked()

    def cancel(self, task: Task) -> None:
        with self._lock:
            if task.cancelled:
                return
            if task.due is not None and task.due != math.inf:
                self._stale += 1
            task.cancelled = True
            task.due = None
            task.fn = _cancelled  # drop what it referenced
            self._maybe_compact_locked()

    def _maybe_compact_locked(self) -> None:
        stale = self._stale
        if stale >= COMPACT_MIN_STALE and stale * 2 > len(self._heap):
            self._heap = [x for x in self._heap if not x[2].cancelled and x[2].due == x[0]]
            heapq.heapify(self._heap)
            self._stale = 0

    def request(self, task: Task | None = None) -> None:
        """Run ``task`` as soon as possible (or just wake the loop). Lock-free, reentrant."""
        self._requests.put(task)

    def request_by(self, task: Task, deadline: float) -> None:
        """Run ``task`` by ``deadline`` (wakes the loop only if that is earlier than the task's
        current deadline). Lock-free; a hint, never late: a task that is running (``due``
        None) is asked again."""
        due = task.due
        if due is None or deadline < due:
            self._requests.put(task)

    def _drain_requests(self) -> None:
        now = self.clock.monotonic()
        while True:
            try:
                task = self._requests.get_nowait()
            except queue.Empty:
                return
            if task is not None:
                self._schedule(task, now)

    def next_deadline(self) -> float | None:
        """The earliest deadline, of a task or a cut (None: nothing scheduled)."""
        with self._cuts_lock:
            cut = self._next_cut_locked()
        with self._lock:
            while self._heap:
                due, _, task = self._heap[0]
                if task.cancelled or task.due != due:
                    heapq.heappop(self._heap)  # stale: moved or cancelled
                    self._stale = max(0, self._stale - 1)
                    continue
                return due if cut is None else min(due, cut)
            return cut

    def heap_size(self) -> int:
        """Entries on the heap, stale ones included (O(live tasks), see the invariants)."""
        with self._lock:
            return len(self._heap)

    # -- running ----------------------------------------------------------------------------

    def run_due(self, now: float | None = None) -> int:
        """Run, once each, the tasks due at ``now`` (default: the clock's now). Returns how many
        ran (cuts included). A task that asks to run again at once runs in the next call, not
        this one. Cuts run first: they are the deadlines that must not be late."""
        self._drain_requests()
        if now is None:
            now = self.clock.monotonic()
        ran = self._run_cuts(now)
        due_tasks: list[Task] = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                due, _, task = heapq.heappop(self._heap)
                if task.cancelled or task.due != due:
                    self._stale = max(0, self._stale - 1)
                    continue
                task.due = None
                due_tasks.append(task)
        for task in due_tasks:
            self._run_one(task, now)
        return ran + len(due_tasks)

    def _run_one(self, task: Task, now: float) -> None:
        try:
            nxt = task.fn(now)
        except Exception:
            logger.exception("task %s failed; retrying in %.0f s", task.name, RETRY_AFTER_ERROR_S)
            nxt = now + RETRY_AFTER_ERROR_S
        if nxt is None:
            self.cancel(task)
            return
        self._schedule(task, nxt)

    def wake_for(self, deadline: float) -> None:
        """A deadline was added: wake the thread if it sleeps past it (lock-free)."""
        if deadline < self._sleeping_until:
            self._requests.put(None)

    def wait(self, timeout_s: float | None) -> None:
        """Block until a request arrives or ``timeout_s`` passes (the thread's idle wait)."""
        try:
            task = self._requests.get(timeout=timeout_s)
        except queue.Empty:
            return
        if task is not None:
            self._schedule(task, self.clock.monotonic())

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_due()
                nxt = self.next_deadline()
                now = self.clock.monotonic()
                timeout = MAX_SLEEP_S if nxt is None else min(MAX_SLEEP_S, max(0.0, nxt - now))
                if timeout > 0:
                    self._sleeping_until = now + timeout
                    # a deadline added between next_deadline() and here saw the old value:
                    # look once more before sleeping
                    nxt2 = self.next_deadline()
                    if nxt2 is None or nxt2 >= self._sleeping_until:
                        self.wait(timeout)
                    self._sleeping_until = -math.inf
            except Exception:  # pragma: no cover - the loop must never die
                logger.exception("scheduler loop error")
