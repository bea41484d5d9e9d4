"""Shared parts of the reliability tests (issue 11): a server of the module's own that tests may
freeze, restart or reconfigure; a connection class whose methods can be made to raise an
interrupt once (a real connection to a real server: only the moment of the interrupt is
chosen by the test); book checks; server-log counting."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from helpers import wait_until
from pgregistry.pools import ConnectionPool, Supervisor
from pgregistry.testing.cluster import LocalCluster, PgServer


class Interrupt(BaseException):
    """What the tests throw into a pool: like KeyboardInterrupt, not an Exception."""


def new_app(tag: str) -> str:
    """An application_name of the test's own, to count its backends on the server."""
    return f"pgr-rel-{tag}-{uuid.uuid4().hex[:8]}"


class Armed:
    """Which connection methods raise :class:`Interrupt` at their next call (once each), and
    whether before or after the real call ran. Shared by every connection of a factory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[str, str] = {}
        self.fired: list[str] = []

    def arm(self, method: str, when: str = "before") -> None:
        with self._lock:
            self._armed[method] = when

    def fire(self, method: str, when: str) -> None:
        with self._lock:
            if self._armed.get(method) != when:
                return
            del self._armed[method]
            self.fired.append(method)
        raise Interrupt(f"interrupt {when} {method}")


def interruptible(armed: Armed) -> type[psycopg2.extensions.connection]:
    """A connection class (``connection_factory=``) that raises :class:`Interrupt` where
    ``armed`` says: ``__init__`` (after the connection opened), ``rollback``, ``cursor``,
    ``close``, ``reset``, ``autocommit`` (the setter)."""

    class InterruptibleConnection(psycopg2.extensions.connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            armed.fire("__init__", "after")

        def rollback(self) -> None:
            armed.fire("rollback", "before")
            super().rollback()
            armed.fire("rollback", "after")

        def cursor(self, *args: Any, **kwargs: Any) -> Any:
            armed.fire("cursor", "before")
            return super().cursor(*args, **kwargs)

        def close(self) -> None:
            armed.fire("close", "before")
            super().close()

        def reset(self) -> None:
            armed.fire("reset", "before")
            super().reset()

        @property  # type: ignore[override]
        def autocommit(self) -> bool:
            return bool(psycopg2.extensions.connection.autocommit.__get__(self))

        @autocommit.setter
        def autocommit(self, value: bool) -> None:
            armed.fire("autocommit", "before")
            psycopg2.extensions.connection.autocommit.__set__(self, value)

    return InterruptibleConnection


def books_exact(pool: ConnectionPool, server: Any, app: str, timeout: float = 10.0) -> str:
    """'' when the pool's books are exact at rest: nothing opening, in use or waiting, and the
    server holding exactly ``size`` backends of ``app``; else what differs."""
    last = {"why": ""}

    def check() -> bool:
        st = pool.stats()
        on_server = server.backend_count(app)
        problems = []
        if st["opening"]:
            problems.append(f"opening={st['opening']}")
        if st["in_use"]:
            problems.append(f"in_use={st['in_use']}")
        if st["waiting"]:
            problems.append(f"waiting={st['waiting']}")
        if st["size"] != st["idle"]:
            problems.append(f"size={st['size']} idle={st['idle']}")
        if on_server != st["size"]:
            problems.append(f"server backends={on_server} size={st['size']}")
        last["why"] = ", ".join(problems)
        return not problems

    wait_until(check, timeout)
    return last["why"]


def all_slots_usable(pool: ConnectionPool, n: int, timeout: float = 5.0) -> list[int]:
    """Check out ``n`` connections at once (each runs a query), give them back; their pids."""
    conns = []
    try:
        for _ in range(n):
            conns.append(pool.getconn(timeout=timeout))
        pids = []
        for conn in conns:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                pids.append(int(cur.fetchone()[0]))
        return pids
    finally:
        for conn in conns:
            pool.putconn(conn)


class ServerLog:
    """Counts lines of a server's log written after this object was made."""

    def __init__(self, server: PgServer) -> None:
        self.path = Path(server.log_path)
        self.start = self.path.stat().st_size if self.path.exists() else 0

    def count(self, pattern: str) -> int:
        with self.path.open("rb") as fh:
            fh.seek(self.start)
            text = fh.read().decode("utf-8", "replace")
        return len(re.findall(pattern, text))


@pytest.fixture(scope="module")
def solo_server() -> Iterator[PgServer]:
    """A primary of this module's own (no replicas): tests may freeze it (and thaw it in
    ``finally``), restart it, or add roles to it."""
    cluster = LocalCluster(n_replicas=0).start()
    try:
        yield cluster.primary
    finally:
        cluster.primary.thaw()
        cluster.stop()


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    """A real-time supervisor (own thread) for this test's pools only."""
    sup = Supervisor()
    yield sup
    sup.stop()


@pytest.fixture
def closer() -> Iterator[Callable[[Any], None]]:
    """``closer(pool)``: closed (with whatever it gave out) at the end of the test."""
    things: list[Any] = []
    yield things.append
    for thing in reversed(things):
        thing.close_all()
