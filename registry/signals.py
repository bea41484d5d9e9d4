"""SIGHUP: the handler only records the request and wakes the supervisor, whose thread does
the reload. It takes no lock (safe whatever the main thread was doing).

One process-wide handler serves every registry that asked for SIGHUP: a stack of reload
requests, in installation order. The handler calls each, then the handler that was installed
before the first of them (if it is a Python callable). Removing a registry takes it off the
stack, whatever the order; when the stack is empty the handler that was there before comes
back. Signal handlers can only be installed from the main thread (Python's rule): from another
thread, :func:`install_sighup` raises, and a removal there leaves the (then empty) handler in
place, which passes SIGHUP on exactly as the original disposition would (the default one
terminates the process).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["install_sighup", "can_install_sighup", "sighup_handlers"]

logger = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], Any]

# (token, request_reload) in installation order; a list swapped whole (never mutated in place)
# so that the handler, which may run between any two bytecodes, always reads a whole one.
_stack: list[tuple[object, Callable[[], None]]] = []
_stack_lock = threading.Lock()
_original: Any = None  # the disposition before our handler (a callable, SIG_DFL, SIG_IGN or None)


def can_install_sighup() -> str | None:
    """``None`` when a SIGHUP handler can be installed here; else why not."""
    if not hasattr(signal, "SIGHUP"):  # pragma: no cover - Windows
        return "this platform has no SIGHUP"
    if threading.current_thread() is not threading.main_thread():
        return "signal handlers can only be installed from the main thread (Python's rule)"
    return None


def sighup_handlers() -> int:
    """How many reload requests SIGHUP serves now."""
    return len(_stack)


def _on_sighup(signum: int, frame: FrameType | None) -> None:
    entries = _stack
    for _, request in entries:
        request()
    original = _original
    if callable(original):
        original(signum, frame)
    elif not entries and original in (signal.SIG_DFL, None):
        # nobody is left, and we could not be removed (a close on another thread): do what
        # the default would have done
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGHUP)


def install_sighup(request_reload: Callable[[], None]) -> Callable[[], None]:
    """Add ``request_reload`` (which must be lock-free) to the SIGHUP stack, installing the
    process's handler if it is not. Returns the function that takes it off again (from any
    thread; idempotent). Raises ``RuntimeError`` when not on the main thread."""
    global _original, _stack
    reason = can_install_sighup()
    if reason is not None:
        raise RuntimeError(f"cannot handle SIGHUP: {reason}; call reload() yourself")
    token = object()
    with _stack_lock:
        if signal.getsignal(signal.SIGHUP) is not _on_sighup:
            _original = signal.getsignal(signal.SIGHUP)
            signal.signal(signal.SIGHUP, _on_sighup)
        _stack = [*_stack, (token, request_reload)]
    logger.debug("SIGHUP handler installed (%d registr%s)", len(_stack),
                 "y" if len(_stack) == 1 else "ies")

    def remove() -> None:
        global _stack
        with _stack_lock:
            if not any(entry is token for entry, _ in _stack):
                return
            _stack = [(entry, request) for entry, request in _stack if entry is not token]
            if _stack or signal.getsignal(signal.SIGHUP) is not _on_sighup:
                return
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGHUP, _original if _original is not None
                              else signal.SIG_DFL)
                logger.debug("SIGHUP handler removed: the previous one is back")

    return remove
