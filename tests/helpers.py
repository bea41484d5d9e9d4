"""Small helpers shared by the test modules."""

from __future__ import annotations

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
