"""The one background thread of the process, which keeps time and nothing else.

Every pool (standalone or built by a registry) registers with the process's supervisor, which
keeps one schedule of deadlines over all of them: prewarm to minconn, reap idle connections,
expire lifetimes, DNS refreshes, leak checks, the watchdog's deadlines, and whatever else a pool
or the registry schedules. Pools are held weakly (and a task made of a bound method holds its
object weakly): a pool or registry that is closed or garbage-collected leaves the schedule.

The thread never does blocking I/O: the blocking work a task decides on (connects, DNS
queries, closes) goes to ``submit_io``, short-lived I/O worker threads bounded per host and in
total (see workers.py); the watchdog's deadlines (``watch``: a heap push per guarded query or
ping, a cancel is one store), which only shut a socket down, are kept here too: there is no
other timer thread. A hanging host therefore delays nothing but its own pool's work.

Tests build their own ``Supervisor(clock=FakeClock(), start=False)`` and step it with
``run_due()``; its I/O runs inline in the stepping thread, so nothing runs behind their back.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from .clock import REAL_CLOCK, Clock
from .sched import Scheduler, Task
from .workers import THREAD_NAME as THREAD_NAME_IO
from .workers import Inline, IORunner, IOWorkers

__all__ = ["Supervisor", "get_supervisor", "Maintained"]

logger = logging.getLogger(__name__)

THREAD_NAME = "pgregistry-supervisor"


class Maintained(Protocol):
    name: str

    def _maintain(self, now: float) -> float | None: ...


class Supervisor:
    def __init__(
        self, clock: Clock = REAL_CLOCK, *, start: bool = True, io: IORunner | None = None
    ) -> None:
        self.clock = clock
        self.scheduler = Scheduler(clock)
        # blocking work: worker threads with a thread of our own, inline when stepped by tests
        self.io: IORunner = io if io is not None else (IOWorkers() if start else Inline())
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
        """Schedule ``fn(now)`` (see sched.Task). A bound method is held weakly: when its
        object is garbage-collected, the task leaves the schedule."""
        if inspect.ismethod(fn):
            ref = weakref.WeakMethod(fn)

            def run(now: float) -> float | None:
                method = ref()
                return None if method is None else method(now)

            fn = run
        task = self.scheduler.add(Task(name, fn), due)
        self._maybe_start()
        return task

    def submit_io(self, key: str, fn: Callable[[], None]) -> None:
        """Run blocking work (a connect, a DNS query, a close) off the supervisor's thread, on
        an I/O worker bounded per ``key`` (the host it talks to) and in total; inline on a
        steppable supervisor. The one place a task hands I/O away."""
        self.io.submit(key, fn)

    def io_now(self, key: str, fn: Callable[[], None]) -> None:
        """Start blocking work at once on an I/O worker, outside the per-host and total bounds
        (a caller's sub-second connect, whose caller waits for it only until its deadline);
        on a steppable supervisor, a thread of its own. Raises what ``Thread.start`` raises."""
        io = self.io
        if isinstance(io, IOWorkers):
            io.start_now(key, fn)
        else:
            threading.Thread(target=fn, name=THREAD_NAME_IO, daemon=True).start()

    def run_io(self, key: str, fn: Callable[[], None]) -> None:
        """Blocking work that may be reached from any thread (a close): submitted to the I/O
        workers when called on the supervisor's thread, run at once anywhere else."""
        thread = self._thread
        if thread is not None and thread is threading.current_thread():
            self.io.submit(key, fn)
        else:
            fn()

    def request_by(self, task: Task, deadline: float) -> None:
        """Run ``task`` by ``deadline``: wakes the thread only if that is earlier than the
        task's current deadline. Lock-free (see Scheduler.request_by)."""
        self.scheduler.request_by(task, deadline)

    def watch(self, deadline: float, fn: Callable[[], None]) -> list[Any]:
        """Call ``fn`` (instant: the watchdog's cut of a socket) at ``deadline`` (on the
        supervisor's clock) unless :meth:`unwatch` is called first; returns the handle. The
        cheap kind of deadline (see Scheduler.at): a heap push, and a cancel is one store."""
        handle = self.scheduler.at(deadline, fn)
        self._maybe_start()
        return handle

    unwatch = staticmethod(Scheduler.uncut)

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
        self.scheduler._after_fork_in_child()
        if isinstance(self.io, IOWorkers):
            self.io._after_fork_in_child()


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
    """In a forked child (called first by fork.py's hook, before any pool resets): the
    parent's supervisor thread and I/O workers do not exist here."""
    global _process_lock
    _process_lock = threading.Lock()
    if _process_supervisor is not None:
        _process_supervisor._after_fork_in_child()
