"""Time as the pools see it: monotonic seconds from an injectable clock."""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["Clock", "RealClock", "FakeClock", "REAL_CLOCK"]


class Clock(Protocol):
    """Monotonic seconds. Pools and the supervisor read time only through this."""

    def monotonic(self) -> float: ...


class RealClock:
    """The process's monotonic clock."""

    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "RealClock()"


REAL_CLOCK = RealClock()


class FakeClock:
    """A clock that moves only when told to; for tests of idle, lifetime and backoff."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        with self._lock:
            if now < self._now:
                raise ValueError("a clock does not go backwards")
            self._now = now

    def __repr__(self) -> str:
        return f"FakeClock({self._now:.3f})"
