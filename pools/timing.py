"""Timing listeners: how long a pool's connections take to open, to obtain and to use, handed
to metrics integrations (OpenTelemetry's histograms) as it happens.

Invariants:
- A pool without listeners pays nothing: the bag's fast paths never look at timings. With
  listeners, every checkout and return takes the bag's slow path (as with leak detection), where
  they are timed; ``Bag.timings`` is None exactly when there is no listener.
- Adding the first listener (or removing the last) switches the paths without stopping the
  pool: a connection being opened or returned at that moment may be handed out once more by
  the fast path, untimed.
- A listener never breaks a checkout, a return or a connect: an ``Exception`` it raises is
  logged (once per listener) and dropped. Whatever it raises, the books stay exact (the bag
  and the opener call it where an interruption is already handled).
- Times are seconds: ``connection_created`` from the connect attempt to a prepared connection
  (resolving, connecting, ``configure``), real time; ``connection_waited`` from a slow-path
  checkout's start to the connection in hand (waiting, opening, pinging), real time;
  ``connection_used`` from checkout to return, on the pool's clock.
"""

from __future__ import annotations

import logging
from typing import Protocol

__all__ = ["TimingListener", "Timings"]

logger = logging.getLogger(__name__)


class TimingListener(Protocol):
    """What a metrics integration gives ``ConnectionPool.add_timing_listener``."""

    def connection_created(self, seconds: float) -> None: ...

    def connection_waited(self, seconds: float) -> None: ...

    def connection_used(self, seconds: float) -> None: ...


class Timings:
    """The listeners of one pool (an immutable tuple: the pool swaps the whole object)."""

    __slots__ = ("listeners", "_failed")

    def __init__(self, listeners: tuple[TimingListener, ...]) -> None:
        self.listeners = listeners
        self._failed: set[int] = set()

    def created(self, seconds: float) -> None:
        for listener in self.listeners:
            try:
                listener.connection_created(seconds)
            except Exception:
                self._report(listener)

    def waited(self, seconds: float) -> None:
        for listener in self.listeners:
            try:
                listener.connection_waited(seconds)
            except Exception:
                self._report(listener)

    def used(self, seconds: float) -> None:
        for listener in self.listeners:
            try:
                listener.connection_used(seconds)
            except Exception:
                self._report(listener)

    def _report(self, listener: TimingListener) -> None:
        if id(listener) not in self._failed:
            self._failed.add(id(listener))
            logger.exception("timing listener %r failed (reported once; it stays attached)",
                             listener)
