"""The one background thread of the process.

Every pool (standalone or built by a registry) registers with the process's supervisor, which
keeps one schedule of deadlines over all of them: prewarm to minconn, reap idle connections,
expire lifetimes, and whatever else a pool or the registry schedules. Pools are held weakly: a
pool that is closed or garbage-collected leaves the schedule.

Tests build their own ``Supervisor(clock=FakeClock(), start=False)`` and step it with
``run_due()``; nothing runs behind their back.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

from .clock import REAL_CLOCK, Clock
from .sched import Scheduler, Task

__all__ = ["Supervisor", "get_supervisor", "Maintained"]

logger = logging.getLogger(__name__)

THREAD_NAME = "pgregistry-supervisor"


class Maintained(Protocol):
    name: str

    def _maintain(self, now: float) -> float | None: ...


class Supervisor:
    def __init__(self, clock: Clock = REAL_CLOCK, *, start: bool = True) -> None:
        self.clock = clock
        self.scheduler = Scheduler(clock)
        self._autostart = start
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    # -- tasks ------------------------------------------------------------------------------

    def register(self, target: Maintained, *, due: float | None = None) -> Task:
        """Schedule ``target._maintain(now)`` (held weakly) and return its task."""
        ref = weakref.ref(target)

        def run(now: float) -> float | None:
            obj = ref()
            if obj is None:
                return None
            return obj._maintain(now)

        task = Task(f"maintain {target.name}", run)
        self.scheduler.add(task, due)
        self._maybe_start()
        return task

    def add_task(
        self, name: str, fn: Callable[[float], float | None], due: float | None = None
    ) -> Task:
        task = self.scheduler.add(Task(name, fn), due)
        self._maybe_start()
        return task

    def watch(self, deadline: float, fn: Callable[[], None]) -> Task:
        """Call ``fn`` at ``deadline`` (on the supervisor's clock) unless the task is cancelled
        first: the watchdog of pings. Wakes the thread so it sees the new deadline."""

        def run(now: float) -> float | None:
            fn()
            return None

        task = self.scheduler.add(Task("watchdog", run), deadline)
        self.scheduler.request(None)
        self._maybe_start()
        return task

    def unregister(self, task: Task) -> None:
        self.scheduler.cancel(task)

    def request(self, task: Task | None = None) -> None:
        """Run ``task`` soon. Lock-free: safe from weakref callbacks and signal handlers."""
        self.scheduler.request(task)

    def run_due(self, now: float | None = None) -> int:
        """Run what is due now (tests). Returns how many tasks ran."""
        return self.scheduler.run_due(now)

    def run_until_idle(self, now: float | None = None, max_rounds: int = 1000) -> int:
        """Run rounds until nothing is due at ``now`` (tests). Returns how many tasks ran."""
        total = 0
        for _ in range(max_rounds):
            n = self.scheduler.run_due(now)
            if n == 0:
                return total
            total += n
        raise RuntimeError("tasks kept asking to run again")

    # -- the thread -------------------------------------------------------------------------

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def start_if_needed(self) -> None:
        """Start the thread if this supervisor runs one and it is not running (after a fork:
        quietly, since a lock of a logging stream may have been inherited locked)."""
        if self._autostart and (self._thread is None or not self._thread.is_alive()):
            self.start(quiet=True)

    def _maybe_start(self) -> None:
        if self._autostart and (self._thread is None or not self._thread.is_alive()):
            self.start()

    def start(self, quiet: bool = False) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self.scheduler.run_forever, args=(self._stop,), name=THREAD_NAME, daemon=True
            )
            self._thread.start()
        if not quiet:
            logger.debug("supervisor thread started")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.scheduler.request(None)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    def _after_fork_in_child(self) -> None:
        # The parent's thread does not exist in the child; a new one starts when needed.
        self._thread = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pid = os.getpid()
        self.scheduler._lock = threading.Lock()


_process_supervisor: Supervisor | None = None
_process_lock = threading.Lock()


def get_supervisor() -> Supervisor:
    """The process's one supervisor (its thread starts with the first pool)."""
    global _process_supervisor
    sup = _process_supervisor
    if sup is None:
        with _process_lock:
            if _process_supervisor is None:
                _process_supervisor = Supervisor()
            sup = _process_supervisor
    return sup


def _reset_after_fork() -> None:
    global _process_lock
    _process_lock = threading.Lock()
    if _process_supervisor is not None:
        _process_supervisor._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
