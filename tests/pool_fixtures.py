"""Fixtures for pool tests: a stepped supervisor on a fake clock, a pool factory that cleans up,
and loopback ports that refuse or hang."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import SENTINEL_PASSWORD
from pgregistry.pools import ConnectionPool, FakeClock, Supervisor
from pgregistry.testing.cluster import PgServer

_DEFAULT = object()


@pytest.fixture
def stepped() -> Supervisor:
    """A supervisor with no thread, on a FakeClock: tests call ``run_until_idle()``."""
    return Supervisor(clock=FakeClock(), start=False)


@pytest.fixture
def make_pool(pg_server: Any, stepped: Supervisor) -> Iterator[Any]:
    """``make_pool(**kw)``: a ConnectionPool on the primary, maintained by ``stepped`` (pass
    ``supervisor=None`` for the process's real one). Each pool gets its own application_name,
    kept as ``pool.app``, so tests can count its backends on the server."""
    made: list[ConnectionPool] = []

    def make(supervisor: Any = _DEFAULT, **kw: Any) -> ConnectionPool:
        app = f"pgr-test-{uuid.uuid4().hex[:10]}"
        # local servers trust loopback: the sentinel password rides along unchecked
        local = isinstance(pg_server, PgServer)
        kw.setdefault("dsn", pg_server.dsn(password=SENTINEL_PASSWORD) if local
                      else pg_server.dsn())
        kw.setdefault("application_name", app)
        if supervisor is _DEFAULT:
            kw["supervisor"] = stepped
        elif supervisor is not None:
            kw["supervisor"] = supervisor
        pool = ConnectionPool(**kw)
        pool.app = kw["application_name"]  # type: ignore[attr-defined]
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close_all()


@pytest.fixture
def dead_port() -> int:
    """A loopback port where nothing listens: connections are refused at once."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def hanging_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections (in the kernel) and never answers: a
    libpq connect hangs there until its connect_timeout."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()
