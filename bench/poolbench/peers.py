"""The subjects: the floors (the least a pool can do), our pool and registry handle, and the
peer pools, each built over ``n`` open autocommit connections."""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.pool
import psycopg2_pool
import psycopg_pool
from pgregistry import Registry
from pgregistry.pools import ConnectionPool
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
from sqlalchemy.pool import QueuePool

from .env import AutocommitConnection, Env, wait_open

# our pool's default reuse order (the W2 target compares it with the floor of the same order)
OUR_REUSE = str(inspect.signature(ConnectionPool).parameters["reuse"].default)
OTHER_REUSE = "lifo" if OUR_REUSE == "fifo" else "fifo"


class FifoFloor:
    """threading.Lock + collections.deque over already-open connections: popleft/append."""

    def __init__(self, conns: list[Any]) -> None:
        self.conns = list(conns)
        self._lock = threading.Lock()
        self._idle = deque(conns)

    def getconn(self) -> Any:
        with self._lock:
            return self._idle.popleft()

    def putconn(self, conn: Any) -> None:
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        for c in self.conns:
            c.close()


class LifoFloor(FifoFloor):
    """The same with pop/append: the most recently returned connection goes out first."""

    def getconn(self) -> Any:
        with self._lock:
            return self._idle.pop()


class BlockingFloor(FifoFloor):
    """For more threads than connections: a Condition over the lock and deque; a taker waits
    while the deque is empty, a return notifies one waiter (no handoff: a running thread may
    take the connection before the woken one)."""

    def __init__(self, conns: list[Any]) -> None:
        super().__init__(conns)
        self._cond = threading.Condition(self._lock)

    def getconn(self) -> Any:
        with self._cond:
            while not self._idle:
                self._cond.wait()
            return self._idle.popleft()

    def putconn(self, conn: Any) -> None:
        with self._cond:
            self._idle.append(conn)
            self._cond.notify()


# Columns of the summary: key -> short name
PEERS = {
    "pg2pool": "psycopg2.pool",
    "pg2_pool": "psycopg2_pool",
    "pg3pool": "psycopg_pool",
    "sa": "SQLAlchemy",
}


@dataclass
class Subject:
    key: str
    label: str
    kind: str  # "getput": get()/put(c); "cm": with cm() as c; "handle": registry; "sa": fairy
    base: str  # the floor it is compared with
    app: str  # application_name of its connections
    maxconn: int
    get: Callable[..., Any] | None = None
    put: Callable[[Any], None] | None = None
    cm: Callable[[], Any] | None = None
    registry: Registry | None = None
    handle_name: str = ""
    close: Callable[[], None] = lambda: None
    order: str = "fifo"  # reuse order: which floor is "the same order"

    @property
    def same_order_base(self) -> str:
        return "floor_lifo" if self.order == "lifo" and self.base == "floor" else self.base


def _autocommit_all(pool: psycopg2.pool.AbstractConnectionPool, n: int) -> None:
    """psycopg2.pool: every connection out, autocommit on, all back (they never change)."""
    conns = [pool.getconn() for _ in range(n)]
    for c in conns:
        c.autocommit = True
    for c in conns:
        pool.putconn(c)


def _prefill_sa(pool: Any, n: int) -> None:
    fairies = [pool.connect() for _ in range(n)]
    for f in fairies:
        f.close()


def build_subjects(env: Env, n: int, *, blocking: bool, tag: str) -> list[Subject]:
    """Every subject with a pool of ``n`` connections, all open. ``blocking``: floors that wait
    (more threads than connections). ``tag`` makes application names unique per workload."""
    dsn = env.dsn
    subjects: list[Subject] = []

    def app(key: str) -> str:
        return f"bench-{tag}-{key}"

    # floors
    floor_cls = BlockingFloor if blocking else FifoFloor
    floor = floor_cls([env.connect2(app("floor")) for _ in range(n)])
    subjects.append(Subject(
        "floor", f"floor: Lock+{'Condition+' if blocking else ''}deque FIFO, psycopg2",
        "getput", "floor", app("floor"), n, floor.getconn, floor.putconn, close=floor.close))
    if not blocking:
        lifo = LifoFloor([env.connect2(app("floor_lifo")) for _ in range(n)])
        subjects.append(Subject(
            "floor_lifo", "floor: Lock+deque LIFO, psycopg2", "getput", "floor",
            app("floor_lifo"), n, lifo.getconn, lifo.putconn, close=lifo.close, order="lifo"))
    floor3 = floor_cls([env.connect3(app("pg3floor")) for _ in range(n)])
    subjects.append(Subject(
        "pg3floor", f"floor: Lock+{'Condition+' if blocking else ''}deque FIFO, psycopg 3",
        "getput", "pg3floor", app("pg3floor"), n, floor3.getconn, floor3.putconn,
        close=floor3.close))

    # ours: defaults (test_on_borrow on, validation_bypass 0.5, FIFO), autocommit
    ours = ConnectionPool(minconn=n, maxconn=n, dsn=dsn, autocommit=True, name=app("ours"),
                          application_name=app("ours"))
    env.instrument(ours)
    wait_open(ours, n)
    subjects.append(Subject(
        "ours", f"ours: ConnectionPool getconn/putconn ({OUR_REUSE.upper()})", "getput", "floor",
        app("ours"), n, ours.getconn, ours.putconn, close=ours.close, order=OUR_REUSE))
    if not blocking:
        other = ConnectionPool(minconn=n, maxconn=n, dsn=dsn, autocommit=True,
                               reuse=OTHER_REUSE, name=app("ours_other"),
                               application_name=app("ours_other"))
        env.instrument(other)
        wait_open(other, n)
        subjects.append(Subject(
            "ours_other", f"ours: ConnectionPool reuse='{OTHER_REUSE}' getconn/putconn", "getput",
            "floor", app("ours_other"), n, other.getconn, other.putconn, close=other.close,
            order=OTHER_REUSE))

    if not blocking:
        # the registry's pool, through pool.conn() and through registry.get(name).conn()
        yaml = env.tmp / f"pools-{tag}.yaml"
        host, port = env.cluster.primary.host, env.cluster.primary.port
        yaml.write_text(
            "version: 1\npools:\n  bench:\n"
            f"    host: {host}\n    port: {port}\n    user: postgres\n    dbname: postgres\n"
            f"    minconn: {n}\n    maxconn: {n}\n    autocommit: true\n"
            f"    application_name: {app('registry')}\n"
        )
        reg = Registry.from_yaml(yaml, install_sighup=False)
        env.instrument(registry=reg)
        wait_open(reg.get("bench").pool, n)
        order = str(reg.config.pools["bench"].reuse)
        subjects.append(Subject(
            "ours_cm", "ours: pool.conn() (the registry's pool)", "cm", "floor", app("registry"),
            n, cm=reg.get("bench").pool.conn, order=order))
        subjects.append(Subject(
            "registry", "ours: registry.get(name).conn()", "handle", "floor", app("registry"),
            n, registry=reg, handle_name="bench", close=reg.close, order=order))

    # psycopg2.pool: ThreadedConnectionPool (LIFO list; raises when exhausted)
    p2 = psycopg2.pool.ThreadedConnectionPool(n, n, dsn, application_name=app("pg2pool"))
    _autocommit_all(p2, n)
    subjects.append(Subject(
        "pg2pool", "psycopg2.pool ThreadedConnectionPool (LIFO)", "getput", "floor",
        app("pg2pool"), n, p2.getconn, p2.putconn, close=p2.closeall, order="lifo"))

    # psycopg2_pool: ThreadSafeConnectionPool (LIFO deque, RLock). Autocommit through a
    # connection_factory: it refills to minconn on putconn at any time, with new connections.
    pp = psycopg2_pool.ThreadSafeConnectionPool(
        minconn=n, maxconn=n, dsn=dsn, application_name=app("pg2_pool"),
        connection_factory=AutocommitConnection)
    subjects.append(Subject(
        "pg2_pool", "psycopg2_pool ThreadSafeConnectionPool (LIFO)", "getput", "floor",
        app("pg2_pool"), n, pp.getconn, pp.putconn, close=pp.clear, order="lifo"))

    # psycopg_pool (psycopg 3), compared with the psycopg 3 floor
    p3 = psycopg_pool.ConnectionPool(
        dsn, min_size=n, max_size=n, open=True, name=app("pg3pool"),
        kwargs={"autocommit": True, "application_name": app("pg3pool")})
    p3.wait(30)
    subjects.append(Subject(
        "pg3pool", "psycopg_pool ConnectionPool (psycopg 3)", "getput", "pg3floor",
        app("pg3pool"), n, p3.getconn, p3.putconn, close=p3.close))

    # SQLAlchemy QueuePool, default reset_on_return ("rollback": a client-side no-op on an
    # autocommit psycopg2 connection, no round trip)
    def creator_for(name: str) -> Callable[[], Any]:
        return lambda: env.connect2(name)

    sa = QueuePool(creator_for(app("sa")), pool_size=n, max_overflow=0, timeout=30)
    _prefill_sa(sa, n)
    subjects.append(Subject(
        "sa", "SQLAlchemy QueuePool", "sa", "floor", app("sa"), n, sa.connect, close=sa.dispose))
    if not blocking:
        sap = QueuePool(creator_for(app("sa_ping")), pool_size=n, max_overflow=0, timeout=30,
                        pre_ping=True, dialect=PGDialect_psycopg2())
        _prefill_sa(sap, n)
        subjects.append(Subject(
            "sa_ping", "SQLAlchemy QueuePool pre_ping=True", "sa", "floor", app("sa_ping"), n,
            sap.connect, close=sap.dispose))
    return subjects


def close_subjects(env: Env, subjects: list[Subject]) -> None:
    for s in subjects:
        with contextlib.suppress(Exception):
            s.close()
    for s in subjects:
        env.wait_backends_gone(s.app)
