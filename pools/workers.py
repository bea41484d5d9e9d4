"""I/O workers: the threads that do the blocking work the supervisor decides on.

The supervisor keeps time and nothing else; connects (prewarm, rebalancing), DNS refreshes and
closes it decides on are submitted here with a *key* (the host they talk to). Threads are
started on demand and exit after ``idle_s`` without work.

Invariants:
- At most ``per_key`` jobs of one key run at once, and at most ``max_threads`` threads exist
  in total; jobs beyond either bound wait in FIFO order (never dropped). A host that hangs
  therefore ties up at most ``per_key`` threads, and every other key's jobs go past it.
- ``start_now`` is the unbounded class: its job starts at once on a new worker thread, outside
  both bounds (a caller's sub-second connect, which must never queue behind a hanging host's
  work); the thread then serves the queue like any other and exits when idle.
- ``submit`` never blocks on I/O (it takes a short lock, may start a thread) and a job that
  raises is logged; nothing a job does can stop the workers.
- ``Inline`` runs each job at once in the submitting thread: the steppable supervisor of tests
  (``Supervisor(start=False)``) uses it, so a fake-clock test sees the work done when its step
  returns.
- After ``fork()`` the child's workers start empty (the parent's threads do not exist there).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol

__all__ = ["IOWorkers", "Inline", "IORunner", "THREAD_NAME"]

logger = logging.getLogger(__name__)

THREAD_NAME = "pgregistry-io"
PER_KEY = 2  # jobs of one host at once (a prewarm connect and a close, say)
MAX_THREADS = 16  # I/O threads in the whole process
IDLE_S = 2.0  # a thread with nothing to do for this long exits


class IORunner(Protocol):
    def submit(self, key: str, fn: Callable[[], None]) -> None: ...


def _run(key: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:
        logger.exception("I/O job for %s failed", key)


class Inline:
    """Runs each job at once, in the submitting thread (steppable supervisors)."""

    def submit(self, key: str, fn: Callable[[], None]) -> None:
        _run(key, fn)


class IOWorkers:
    """Short-lived I/O threads, bounded per key and in total (see the module docstring).

    :param per_key: jobs of one key running at once (default 2).
    :param max_threads: threads in total (default 16).
    :param idle_s: seconds a thread waits for work before it exits (default 2.0).
    """

    def __init__(self, *, per_key: int = PER_KEY, max_threads: int = MAX_THREADS,
                 idle_s: float = IDLE_S) -> None:
        if per_key < 1 or max_threads < 1:
            raise ValueError("per_key and max_threads must be >= 1")
        self.per_key = per_key
        self.max_threads = max_threads
        self.idle_s = idle_s
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: deque[tuple[str, Callable[[], None]]] = deque()
        self._running: Counter[str] = Counter()
        self._threads = 0
        self._idle = 0
        self._starting = 0  # started, not yet looking for work
        self.started = 0  # threads started over the workers' life (a figure for tests)

    def submit(self, key: str, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on a worker thread, after the jobs of ``key`` queued before it."""
        with self._lock:
            self._queue.append((key, fn))
            runnable = self._runnable_locked()
            if self._idle:
                self._work.notify()
            if runnable > self._idle + self._starting and self._threads < self.max_threads:
                self._threads += 1
                self._starting += 1
                self.started += 1
                threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True).start()

    def start_now(self, key: str, fn: Callable[[], None]) -> None:
        """Run ``fn()`` at once on a new I/O worker thread, outside the per-key and total
        bounds (``key`` only names it in logs). Raises what ``Thread.start`` raises."""
        with self._lock:
            self._threads += 1
            self.started += 1
        try:
            threading.Thread(target=self._loop, args=((key, fn),), name=THREAD_NAME,
                             daemon=True).start()
        except BaseException:
            with self._lock:
                self._threads -= 1
            raise

    def _runnable_locked(self) -> int:
        """Queued jobs that may start now (their key below its bound)."""
        taken: Counter[str] = Counter()
        n = 0
        for key, _ in self._queue:
            if self._running[key] + taken[key] < self.per_key:
                taken[key] += 1
                n += 1
        return n

    def stats(self) -> dict[str, int]:
        """Threads alive, idle among them, jobs running and queued."""
        with self._lock:
            return {"threads": self._threads, "idle": self._idle,
                    "running": sum(self._running.values()), "queued": len(self._queue)}

    def _next_locked(self) -> tuple[str, Callable[[], None]] | None:
        """The oldest queued job whose key is below its bound."""
        for i, (key, fn) in enumerate(self._queue):
            if self._running[key] < self.per_key:
                del self._queue[i]
                self._running[key] += 1
                return key, fn
        return None

    def _loop(self, first: tuple[str, Callable[[], None]] | None = None) -> None:
        if first is not None:  # start_now's job: counted in no bound
            _run(*first)
        lock = self._lock
        lock.acquire()
        if first is None:
            self._starting -= 1
        try:
            while True:
                job = self._next_locked()
                if job is None:
                    self._idle += 1
                    woken = self._work.wait(self.idle_s)
                    self._idle -= 1
                    if woken:
                        continue
                    job = self._next_locked()
                    if job is None:
                        self._threads -= 1
                        return
                key, fn = job
                lock.release()
                try:
                    _run(key, fn)
                finally:
                    lock.acquire()
                    self._running[key] -= 1
                    if not self._running[key]:
                        del self._running[key]
                    if self._queue and self._idle:
                        self._work.notify()  # a job of this key may be runnable now
        finally:
            lock.release()

    def _after_fork_in_child(self) -> None:
        self._reset()
