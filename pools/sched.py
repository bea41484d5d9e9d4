"""A generic schedule of deadlines, steppable from tests.

Tasks are callables taking the current time and returning when they next want to run (an
absolute time on the scheduler's clock) or ``None`` to leave the schedule. A task that raises is
logged and tried again later; nothing a task does can stop the scheduler.

``request(task)`` asks for a task to run as soon as possible. It takes no lock (it only puts on
a ``queue.SimpleQueue``), so it is safe from weakref callbacks, ``__del__`` and signal handlers.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
from collections.abc import Callable

from .clock import REAL_CLOCK, Clock

__all__ = ["Scheduler", "Task"]

logger = logging.getLogger(__name__)

RETRY_AFTER_ERROR_S = 5.0
MAX_SLEEP_S = 60.0


class Task:
    """A named callable on the schedule. ``due`` is its current deadline (None: not scheduled)."""

    __slots__ = ("name", "fn", "due", "cancelled")

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
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[Task | None] = queue.SimpleQueue()

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
            task.due = due
            heapq.heappush(self._heap, (due, next(self._seq), task))

    def cancel(self, task: Task) -> None:
        with self._lock:
            task.cancelled = True
            task.due = None

    def request(self, task: Task | None = None) -> None:
        """Run ``task`` as soon as possible (or just wake the loop). Lock-free, reentrant."""
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
        with self._lock:
            while self._heap:
                due, _, task = self._heap[0]
                if task.cancelled or task.due != due:
                    heapq.heappop(self._heap)  # stale: moved or cancelled
                    continue
                return due
            return None

    # -- running ----------------------------------------------------------------------------

    def run_due(self, now: float | None = None) -> int:
        """Run, once each, the tasks due at ``now`` (default: the clock's now). Returns how many
        ran. A task that asks to run again at once runs in the next call, not this one."""
        self._drain_requests()
        if now is None:
            now = self.clock.monotonic()
        due_tasks: list[Task] = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                due, _, task = heapq.heappop(self._heap)
                if task.cancelled or task.due != due:
                    continue
                task.due = None
                due_tasks.append(task)
        for task in due_tasks:
            self._run_one(task, now)
        return len(due_tasks)

    def _run_one(self, task: Task, now: float) -> None:
        try:
            nxt = task.fn(now)
        except Exception:
            logger.exception("task %s failed; retrying in %.0f s", task.name, RETRY_AFTER_ERROR_S)
            nxt = now + RETRY_AFTER_ERROR_S
        if nxt is None:
            with self._lock:
                task.cancelled = True
            return
        self._schedule(task, nxt)

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
                    self.wait(timeout)
            except Exception:  # pragma: no cover - the loop must never die
                logger.exception("scheduler loop error")
