"""Small helpers shared by the test modules."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout: float = 10.0,
               interval: float = 0.005) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass (a bounded real wait,
    for what happens on servers and threads; timing behaviour uses the fake clock instead)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())

# A password every pool of the suite carries (the servers trust loopback, so it is never
# checked): conftest fails the run if it appears in any log line, output or failure text.
SENTINEL_PASSWORD = "Sentinel-Pa55w0rd-4c1d"
SENTINEL_ENV = "PGR_TEST_PASSWORD"


def run_load_for(seconds: float) -> None:
    """Let a threaded workload run for ``seconds`` of real time (a load phase, not a timing
    behaviour: those run on the fake clock)."""
    threading.Event().wait(seconds)


def hold(seconds: float) -> None:
    """Keep a checked-out connection busy for a moment, as real work would (stress tests)."""
    threading.Event().wait(seconds)
