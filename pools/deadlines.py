"""Deadlines that cut: one process-wide timer thread for the watchdog's bounds (pings, queries,
the round trips of a return).

Its only work is shutting a socket down (``PingGuard.expire``), so nothing can make it late. It
is apart from the supervisor because the supervisor's maintenance may itself wait on a server
(a prewarm connect to a frozen host), and a ping bounded by that thread would wait with it.
Pools on a fake clock keep their deadlines on their (stepped) supervisor instead.

A deadline is a small list ``[at, seq, fn]`` in a heap; cancelling clears ``fn`` (an atomic
store, nothing to search), and the thread drops cleared entries as they come up.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Deadlines", "DEADLINES"]

logger = logging.getLogger(__name__)


class Deadlines:
    """Calls ``fn`` at ``at`` (``time.monotonic()`` seconds) on its own daemon thread unless
    cancelled first."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def watch(self, at: float, fn: Callable[[], None]) -> list[Any]:
        """Schedule ``fn`` at ``at``; returns the handle :meth:`cancel` takes."""
        item: list[Any] = [at, next(self._seq), fn]
        with self._cond:
            if self._pid != os.getpid():  # forked: the parent's thread is not here
                self._heap, self._thread, self._pid = [], None, os.getpid()
            heapq.heappush(self._heap, item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pgregistry-deadlines",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0] is item:
                self._cond.notify()
        return item

    @staticmethod
    def cancel(item: list[Any]) -> None:
        item[2] = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    heap = self._heap
                    while heap and heap[0][2] is None:
                        heapq.heappop(heap)
                    if not heap:
                        self._cond.wait()
                        continue
                    delay = heap[0][0] - time.monotonic()
                    if delay <= 0:
                        fn = heapq.heappop(heap)[2]
                        break
                    self._cond.wait(delay)
            if fn is not None:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - a deadline never kills the thread
                    logger.exception("a watchdog deadline failed")


DEADLINES = Deadlines()
