"""SIGHUP: the handler only records the request and wakes the supervisor, whose thread does
the reload. It takes no lock (safe whatever the main thread was doing) and chains to a handler
installed before it."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["install_sighup"]

logger = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], Any]


def install_sighup(request_reload: Callable[[], None]) -> Callable[[], None]:
    """Install a SIGHUP handler that calls ``request_reload`` (which must be lock-free), then
    any previous Python handler. Returns a function that puts the previous handler back (if
    ours is still the one installed). Main thread only."""
    if not hasattr(signal, "SIGHUP"):  # pragma: no cover - Windows
        raise RuntimeError("this platform has no SIGHUP; call reload() yourself")
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("signal handlers can only be installed from the main thread")
    previous = signal.getsignal(signal.SIGHUP)

    def on_sighup(signum: int, frame: FrameType | None) -> None:
        request_reload()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGHUP, on_sighup)
    logger.debug("SIGHUP handler installed")

    def restore() -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGHUP) is on_sighup:
            signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)

    return restore
