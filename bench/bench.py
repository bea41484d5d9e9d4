#!/usr/bin/env python3
"""pgregistry benchmark: our ConnectionPool and registry handle against psycopg2.pool,
psycopg2_pool, psycopg_pool and SQLAlchemy's QueuePool, and against a "floor" (a lock and a
deque over already-open connections), in one process, on a PostgreSQL server it starts itself.

Workloads (all SELECT 1s run on autocommit connections: one round trip, nothing to roll back):

  W1  checkout + return, no query, 1 thread, pool of 4 (all open)
  W2  checkout + SELECT 1 + return, 1 thread, pool of 4
  W3  8 threads, pool of 8, checkout + SELECT 1 + return, fixed-duration slices
  W4  32 threads, pool of 8: throughput, Jain's fairness, p99 checkout wait, starved threads,
      the most server backends seen per pool
  W5  cold start: constructing a pool of 8 -> first SELECT 1 by the caller, and -> 8 open
  H   getconn latency percentiles on a warm pool of ours while the supervisor prewarms a
      second pool whose host accepts TCP and never answers

W1/W2 run every subject in short slices (~5 ms), round-robin in a shuffled order per round;
W3/W4 in 0.5 s slices, same interleaving. A ratio is the median over rounds of the per-round
ratio (subject / its floor in the same round), so drifts of the machine cancel out.

  python bench/bench.py            # the full run (under two minutes)
  python bench/bench.py --quick    # a smoke run (seconds); what the test suite runs
  python bench/bench.py --json out.json --cpu 1 --only w1,w2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import json
import logging
import math
import operator
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.pool
from pgregistry import Registry
from pgregistry.pools import ConnectionPool
from pgregistry.testing.cluster import LocalCluster

try:  # the `bench` extra
    import psycopg
    import psycopg2_pool
    import psycopg_pool
    from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
    from sqlalchemy.pool import QueuePool
except ImportError as _exc:  # pragma: no cover - reported by main()
    _MISSING: ImportError | None = _exc
else:
    _MISSING = None

SQL = "SELECT 1"
# our pool's default reuse order (the W2 target compares it with the floor of the same order)
OUR_REUSE = str(inspect.signature(ConnectionPool).parameters["reuse"].default)
OTHER_REUSE = "lifo" if OUR_REUSE == "fifo" else "fifo"
perf_counter = time.perf_counter
perf_counter_ns = time.perf_counter_ns


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    quick: bool
    w12_rounds: int
    w12_slice_s: float  # target length of one W1/W2 slice
    w34_rounds: int
    w34_slice_s: float
    w5_reps: int
    hang_s: float  # each of the two hanging-host phases (baseline, then with the hang)
    hang_connect_timeout: int = 2
    small: int = 4  # pool size of W1/W2
    big: int = 8  # maxconn of W3/W4/W5
    w3_threads: int = 8
    w4_threads: int = 32
    seed: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            s = cls(True, 1, 0.001, 1, 0.1, 1, 0.5)
        else:
            s = cls(False, 80, 0.005, 8, 0.5, 11, 6.0)
        changes: dict[str, Any] = {}
        if args.rounds is not None:
            changes["w12_rounds"] = args.rounds
        if args.slice is not None:
            changes["w34_slice_s"] = args.slice
        if args.seed is not None:
            changes["seed"] = args.seed
        return dataclasses.replace(s, **changes)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank of ``values`` (any order)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def jain(counts: Sequence[int]) -> float:
    """Jain's fairness index: 1 = every thread got the same share, 1/n = one got everything."""
    total = sum(counts)
    squares = sum(c * c for c in counts)
    return (total * total) / (len(counts) * squares) if squares else math.nan


def fmt_time(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(r: float) -> str:
    return "-" if math.isnan(r) else f"{r:.2f}x"


def fmt_rate(r: float) -> str:
    return "-" if math.isnan(r) else f"{r / 1000:.1f}k/s"


def table(rows: list[list[str]], indent: str = "  ", right: Sequence[int] = ()) -> str:
    """Aligned columns; ``right``: indexes of right-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        out.append(indent + "  ".join(cells).rstrip())
    return "\n".join(out)


class AutocommitConnection(psycopg2.extensions.connection):
    """A psycopg2 connection in autocommit mode from birth (for pools that open connections
    at any time, where setting the flag once after creating the pool is not enough)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.autocommit = True


class LogCapture(logging.Handler):
    """Keeps the pools' warnings for the end of the run: the hanging host's connect failures
    are expected and only counted; anything else is printed in full."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def report(self) -> None:
        expected = [r for r in self.records if "bench-hanging" in r.getMessage()]
        other = [r for r in self.records if r not in expected]
        print(f"log       {len(self.records)} warning(s) from the pools: {len(expected)} from the "
              f"hanging host's pool (expected), {len(other)} other(s)")
        for r in other[:20]:
            print(f"  {r.levelname} {r.name}: {r.getMessage()}")


# ----------------------------------------------------------------------------------------------
# Floors: the least a pool can do
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The server, the pinning, the machine line
# ----------------------------------------------------------------------------------------------


@dataclass
class Env:
    cluster: LocalCluster
    dsn: str
    monitor: Any  # an autocommit psycopg2 connection, application_name bench-monitor
    tmp: Path
    settings: Settings
    pinned: str = "not pinned"

    def connect2(self, app: str) -> Any:
        conn = psycopg2.connect(self.dsn, application_name=app)
        conn.autocommit = True
        return conn

    def connect3(self, app: str) -> Any:
        return psycopg.connect(self.dsn, autocommit=True, application_name=app)

    def backends(self, app: str) -> int:
        with self.monitor.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND application_name = %s",
                (app,),
            )
            return int(cur.fetchone()[0])

    def wait_backends_gone(self, app: str, timeout: float = 3.0) -> None:
        deadline = perf_counter() + timeout
        while self.backends(app) and perf_counter() < deadline:
            time.sleep(0.005)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry.name))
    return out


def _pin_tasks(pid: int | str, cpu: int) -> int:
    """Pin every thread of ``pid`` to ``cpu``; returns how many (0: the process is gone, as a
    short-lived server child may be by now)."""
    n = 0
    try:
        tasks = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except FileNotFoundError:
        return 0
    for tid in tasks:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, {cpu})
            n += 1
    return n


def pin(env: Env, cpu: int) -> str:
    """Client (every thread) and the postmaster with its children on ``cpu``. Backends forked
    later inherit the postmaster's affinity, so this runs before any pool connects."""
    postmaster = env.cluster.primary.pid
    assert postmaster is not None
    server = [postmaster, *_children(postmaster)]
    server = [pid for pid in server if _pin_tasks(pid, cpu)]
    _pin_tasks("self", cpu)
    ok = os.sched_getaffinity(0) == {cpu} and os.sched_getaffinity(postmaster) == {cpu}
    return (
        f"client (pid {os.getpid()}) and server (postmaster {postmaster} + "
        f"{len(server) - 1} children, backends inherit) pinned to CPU {cpu}"
        + ("" if ok else " (VERIFY FAILED)")
    )


def machine_line(env: Env) -> list[str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with env.monitor.cursor() as cur:
        cur.execute("SHOW server_version")
        server = cur.fetchone()[0]

    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    lib2 = psycopg2.extensions.libpq_version()
    lib3 = psycopg.pq.version()
    return [
        f"machine   {model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"{env.pinned}",
        f"software  Python {platform.python_version()}; psycopg2 "
        f"{psycopg2.__version__.split()[0]} (libpq {lib2 // 10000}.{lib2 % 10000}); "
        f"PostgreSQL {server}; psycopg2_pool {v('psycopg2-pool')}; psycopg_pool "
        f"{v('psycopg-pool')} on psycopg {v('psycopg')} ({psycopg.pq.__impl__}, libpq "
        f"{lib3 // 10000}.{lib3 % 10000}); SQLAlchemy {v('SQLAlchemy')}",
    ]


# ----------------------------------------------------------------------------------------------
# Subjects
# ----------------------------------------------------------------------------------------------

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


def _wait_ours(pool: ConnectionPool, n: int, timeout: float = 30.0) -> None:
    deadline = perf_counter() + timeout
    while True:
        s = pool.stats()
        if s["idle"] + s["in_use"] >= n:
            return
        if perf_counter() > deadline:
            raise RuntimeError(f"pool {pool.name} did not open {n} connections: {s}")
        time.sleep(0.002)


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
    _wait_ours(ours, n)
    subjects.append(Subject(
        "ours", f"ours: ConnectionPool getconn/putconn ({OUR_REUSE.upper()})", "getput", "floor",
        app("ours"), n, ours.getconn, ours.putconn, close=ours.close, order=OUR_REUSE))
    if not blocking:
        other = ConnectionPool(minconn=n, maxconn=n, dsn=dsn, autocommit=True,
                               reuse=OTHER_REUSE, name=app("ours_other"),
                               application_name=app("ours_other"))
        _wait_ours(other, n)
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
        _wait_ours(reg.get("bench").pool, n)
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


# ----------------------------------------------------------------------------------------------
# W1 / W2: single-thread slices
# ----------------------------------------------------------------------------------------------


def _slice_w1(s: Subject, n: int) -> int:
    """n checkout+return pairs; elapsed ns."""
    if s.kind == "getput":
        get, put = s.get, s.put
        assert get is not None and put is not None
        t0 = perf_counter_ns()
        for _ in range(n):
            c = get()
            put(c)
        return perf_counter_ns() - t0
    if s.kind == "cm":
        cm = s.cm
        assert cm is not None
        t0 = perf_counter_ns()
        for _ in range(n):
            with cm():
                pass
        return perf_counter_ns() - t0
    if s.kind == "handle":
        assert s.registry is not None
        reg_get, name = s.registry.get, s.handle_name
        t0 = perf_counter_ns()
        for _ in range(n):
            with reg_get(name).conn():
                pass
        return perf_counter_ns() - t0
    connect = s.get
    assert connect is not None
    t0 = perf_counter_ns()
    for _ in range(n):
        c = connect()
        c.close()
    return perf_counter_ns() - t0


def _slice_w2(s: Subject, n: int) -> int:
    """n checkout + SELECT 1 + return; elapsed ns."""
    if s.kind == "getput":
        get, put = s.get, s.put
        assert get is not None and put is not None
        t0 = perf_counter_ns()
        for _ in range(n):
            c = get()
            cur = c.cursor()
            cur.execute(SQL)
            cur.fetchone()
            cur.close()
            put(c)
        return perf_counter_ns() - t0
    if s.kind == "cm":
        cm = s.cm
        assert cm is not None
        t0 = perf_counter_ns()
        for _ in range(n):
            with cm() as c:
                cur = c.cursor()
                cur.execute(SQL)
                cur.fetchone()
                cur.close()
        return perf_counter_ns() - t0
    if s.kind == "handle":
        assert s.registry is not None
        reg_get, name = s.registry.get, s.handle_name
        t0 = perf_counter_ns()
        for _ in range(n):
            with reg_get(name).conn() as c:
                cur = c.cursor()
                cur.execute(SQL)
                cur.fetchone()
                cur.close()
        return perf_counter_ns() - t0
    connect = s.get
    assert connect is not None
    t0 = perf_counter_ns()
    for _ in range(n):
        c = connect()
        cur = c.cursor()
        cur.execute(SQL)
        cur.fetchone()
        cur.close()
        c.close()
    return perf_counter_ns() - t0


@dataclass
class SliceResult:
    """Per subject: one value per round (seconds per op), and the ratio to its floor in the
    same round."""

    values: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    same_order: dict[str, list[float]] = field(default_factory=dict)  # vs same-order floor
    ops_per_slice: dict[str, int] = field(default_factory=dict)


def run_sliced(
    subjects: list[Subject], fn: Callable[[Subject, int], int], rounds: int, target_s: float,
    rng: random.Random,
) -> SliceResult:
    res = SliceResult()
    # warm-up and calibration: slices of about target_s for every subject
    for s in subjects:
        fn(s, 20)
        per_op = fn(s, 50) / 50 / 1e9
        res.ops_per_slice[s.key] = max(20, min(200_000, int(target_s / max(per_op, 1e-9))))
        res.values[s.key] = []
        res.ratios[s.key] = []
        res.same_order[s.key] = []
    gc.collect()
    order = list(subjects)
    for _ in range(rounds):
        rng.shuffle(order)
        this_round: dict[str, float] = {}
        for s in order:
            n = res.ops_per_slice[s.key]
            this_round[s.key] = fn(s, n) / n / 1e9
        for s in subjects:
            res.values[s.key].append(this_round[s.key])
            res.ratios[s.key].append(this_round[s.key] / this_round[s.base])
            if s.same_order_base in this_round:
                res.same_order[s.key].append(this_round[s.key] / this_round[s.same_order_base])
    return res


def print_sliced(title: str, subjects: list[Subject], res: SliceResult, rounds: int) -> None:
    print(f"\n{title}")
    print(f"  {rounds} round(s), subjects interleaved in shuffled order; median time per op, "
          "interquartile range, median of per-round ratios to the floor")
    print("  x floor: against the FIFO floor of its driver; x same order: against the floor "
          "with its reuse order (LIFO floor for the LIFO pools)")
    rows = [["subject", "median", "p25-p75", "x floor", "x same order"]]
    for s in subjects:
        vals = res.values[s.key]
        iqr = f"{fmt_time(pct(vals, 0.25))} - {fmt_time(pct(vals, 0.75))}"
        rows.append([s.label, fmt_time(median(vals)), iqr, fmt_ratio(median(res.ratios[s.key])),
                     fmt_ratio(median(res.same_order[s.key]))])
    print(table(rows, right=(1, 3, 4)))


# ----------------------------------------------------------------------------------------------
# W3 / W4: threads
# ----------------------------------------------------------------------------------------------


@dataclass
class ThreadSlice:
    ops: int
    elapsed: float
    counts: list[int]
    wait_p99: float
    wait_p50: float
    errors: int
    error_kinds: dict[str, int]
    max_backends: int

    @property
    def throughput(self) -> float:
        return self.ops / self.elapsed


def run_thread_slice(env: Env, s: Subject, threads: int, duration: float) -> ThreadSlice:
    counts = [0] * threads
    waits: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    kinds: dict[str, int] = {}
    kinds_lock = threading.Lock()
    deadline = [math.inf]
    barrier = threading.Barrier(threads + 1)

    def failed(i: int, exc: BaseException) -> None:
        errors[i] += 1
        with kinds_lock:
            name = type(exc).__module__.split(".")[0] + "." + type(exc).__name__
            kinds[name] = kinds.get(name, 0) + 1
        time.sleep(0.001)  # an app would back off (or fail the request) too

    # how a connection goes back: put() for every pool but SQLAlchemy's, whose connection
    # proxy goes back to its QueuePool on close()
    get = s.get
    release = operator.methodcaller("close") if s.kind == "sa" else s.put
    assert get is not None and release is not None

    def body(i: int) -> None:
        n, w = 0, waits[i]
        barrier.wait()
        while True:
            t0 = perf_counter()
            try:
                c = get()
            except Exception as exc:
                failed(i, exc)
                if perf_counter() >= deadline[0]:
                    break
                continue
            t1 = perf_counter()
            cur = c.cursor()
            cur.execute(SQL)
            cur.fetchone()
            cur.close()
            release(c)
            if perf_counter() >= deadline[0]:
                break
            w.append(t1 - t0)
            n += 1
        counts[i] = n

    fatal: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            body(i)
        except BaseException as exc:  # a query failed: the run is void, said after the join
            fatal.append(exc)
            barrier.abort()

    pool = [threading.Thread(target=worker, args=(i,), daemon=True, name=f"bench-{i}")
            for i in range(threads)]
    for t in pool:
        t.start()
    max_backends = env.backends(s.app)
    barrier.wait(30)
    t_start = perf_counter()
    deadline[0] = t_start + duration
    while True:  # sample the server's view of this subject while the threads run
        left = deadline[0] - perf_counter()
        if left <= 0:
            break
        time.sleep(min(0.1, left))
        max_backends = max(max_backends, env.backends(s.app))
    for t in pool:
        t.join(60)
        if t.is_alive():
            raise RuntimeError(f"{s.label}: a worker thread is stuck")
    if fatal:
        raise RuntimeError(f"{s.label}: a worker failed: {fatal[0]!r}") from fatal[0]
    max_backends = max(max_backends, env.backends(s.app))
    all_waits = [x for w in waits for x in w]
    return ThreadSlice(
        ops=sum(counts), elapsed=duration, counts=counts, wait_p99=pct(all_waits, 0.99),
        wait_p50=pct(all_waits, 0.5), errors=sum(errors), error_kinds=kinds,
        max_backends=max_backends)


def run_threads(
    env: Env, subjects: list[Subject], threads: int, rounds: int, duration: float,
    rng: random.Random,
) -> dict[str, list[ThreadSlice]]:
    out: dict[str, list[ThreadSlice]] = {s.key: [] for s in subjects}
    for s in subjects:  # warm-up: threads, first pings, psycopg2_pool's growth
        run_thread_slice(env, s, threads, min(duration, 0.1) / 2)
    gc.collect()
    order = list(subjects)
    for _ in range(rounds):
        rng.shuffle(order)
        for s in order:
            out[s.key].append(run_thread_slice(env, s, threads, duration))
    return out


def thread_ratios(res: dict[str, list[ThreadSlice]], subjects: list[Subject]) -> dict[str, float]:
    """Median over rounds of floor throughput / subject throughput (>1 = slower)."""
    out = {}
    for s in subjects:
        rs = [b.throughput / x.throughput if x.ops else math.inf
              for x, b in zip(res[s.key], res[s.base], strict=True)]
        out[s.key] = median(rs)
    return out


def print_threads(title: str, subjects: list[Subject], res: dict[str, list[ThreadSlice]],
                  threads: int, rounds: int, duration: float) -> dict[str, float]:
    ratios = thread_ratios(res, subjects)
    print(f"\n{title}")
    print(f"  {rounds} round(s) of {duration:g} s slices per subject, interleaved; medians over "
          "rounds. cost = floor throughput / subject throughput (>1 slower). fairness: Jain's "
          f"index over the {threads} threads' op counts. backends: most seen in "
          "pg_stat_activity (every 0.1 s)")
    rows = [["subject", "ops/s", "cost", "fairness", "wait p50", "wait p99", "starved",
             "errors/s", "backends"]]
    for s in subjects:
        sl = res[s.key]
        starved = median([sum(1 for c in x.counts if c == 0) for x in sl])
        errs = median([x.errors / x.elapsed for x in sl])
        most = max(x.max_backends for x in sl)
        flag = " EXCEEDS" if most > s.maxconn else ""
        rows.append([
            s.label, fmt_rate(median([x.throughput for x in sl])), fmt_ratio(ratios[s.key]),
            f"{median([jain(x.counts) for x in sl]):.3f}",
            fmt_time(median([x.wait_p50 for x in sl])), fmt_time(median([x.wait_p99 for x in sl])),
            f"{starved:g}/{threads}", f"{errs:.0f}", f"{most}/{s.maxconn}{flag}",
        ])
    print(table(rows, right=(1, 2, 3, 4, 5, 6, 7)))
    kinds: dict[str, dict[str, int]] = {}
    for s in subjects:
        for x in res[s.key]:
            for k, v in x.error_kinds.items():
                kinds.setdefault(s.label, {})[k] = kinds.setdefault(s.label, {}).get(k, 0) + v
    for label, ks in kinds.items():
        print(f"  errors of {label}: " + ", ".join(f"{v} x {k}" for k, v in ks.items()))
    return ratios


# ----------------------------------------------------------------------------------------------
# W5: cold start
# ----------------------------------------------------------------------------------------------


def _query(c: Any) -> None:
    cur = c.cursor()
    cur.execute(SQL)
    cur.fetchone()
    cur.close()


def cold_start(env: Env, key: str, n: int) -> tuple[float, float]:
    """(seconds to the caller's first SELECT 1, seconds to n connections open); nan if n/a.
    Everything it opens is closed and gone from the server when it returns."""
    app = f"bench-w5-{key}"
    dsn = env.dsn
    first = everything = math.nan
    if key in ("connect2", "connect3"):
        connect = env.connect2 if key == "connect2" else env.connect3
        t0 = perf_counter()
        c = connect(app)
        first = perf_counter() - t0
        c.close()
        env.wait_backends_gone(app)
        t0 = perf_counter()
        conns = [connect(app) for _ in range(n)]
        everything = perf_counter() - t0
        for c in conns:
            c.close()
    elif key == "ours":
        # All open: a configure callback counts new connections and wakes us at the n-th,
        # then stats() confirms idle + in_use == n. (Polling stats() every 0.2 ms from the
        # start would take ~15% of the one CPU the connects need.)
        opened = [0]
        nth = threading.Event()

        def count(_conn: Any) -> None:
            opened[0] += 1
            if opened[0] >= n:
                nth.set()

        t0 = perf_counter()
        pool = ConnectionPool(minconn=n, maxconn=n, background_prewarm=True, dsn=dsn,
                              autocommit=True, name=app, application_name=app, configure=count)
        with pool.conn() as c:
            _query(c)
        first = perf_counter() - t0
        nth.wait(30)
        deadline = t0 + 30
        while True:
            st = pool.stats()
            if st["idle"] + st["in_use"] >= n:
                everything = perf_counter() - t0
                break
            if perf_counter() > deadline:
                raise RuntimeError(f"our pool did not open {n} connections: {st}")
            time.sleep(0.00005)
        pool.close()
    elif key == "pg2pool":
        t0 = perf_counter()
        p2 = psycopg2.pool.ThreadedConnectionPool(n, n, dsn, application_name=app,
                                                  connection_factory=AutocommitConnection)
        everything = perf_counter() - t0
        c = p2.getconn()
        _query(c)
        p2.putconn(c)
        first = perf_counter() - t0
        p2.closeall()
    elif key == "pg2_pool":
        t0 = perf_counter()
        pp = psycopg2_pool.ThreadSafeConnectionPool(minconn=n, maxconn=n, dsn=dsn,
                                                    application_name=app,
                                                    connection_factory=AutocommitConnection)
        everything = perf_counter() - t0
        c = pp.getconn()
        _query(c)
        pp.putconn(c)
        first = perf_counter() - t0
        pp.clear()
    elif key == "pg3pool":
        t0 = perf_counter()
        p3 = psycopg_pool.ConnectionPool(dsn, min_size=n, max_size=n, open=True, name=app,
                                         kwargs={"autocommit": True, "application_name": app})
        c = p3.getconn()
        _query(c)
        p3.putconn(c)
        first = perf_counter() - t0
        p3.wait(30)
        everything = perf_counter() - t0
        p3.close()
    elif key == "sa":
        t0 = perf_counter()
        sa = QueuePool(lambda: env.connect2(app), pool_size=n, max_overflow=0)
        f = sa.connect()
        _query(f)
        f.close()
        first = perf_counter() - t0
        sa.dispose()  # lazy: nothing opens before it is asked for
    else:
        raise ValueError(key)
    env.wait_backends_gone(app)
    time.sleep(0.01)
    return first, everything


W5_SUBJECTS = {
    "connect2": "psycopg2.connect: 1, then 8 sequential",
    "connect3": "psycopg.connect (3): 1, then 8 sequential",
    "ours": "ours: ConnectionPool(8, 8, background_prewarm)",
    "pg2pool": "psycopg2.pool ThreadedConnectionPool(8, 8)",
    "pg2_pool": "psycopg2_pool ThreadSafeConnectionPool(8, 8)",
    "pg3pool": "psycopg_pool ConnectionPool(min 8, max 8)",
    "sa": "SQLAlchemy QueuePool(pool_size=8)",
}


def run_w5(env: Env, reps: int, n: int, rng: random.Random) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {k: {"first": [], "all": []} for k in W5_SUBJECTS}
    cold_start(env, "connect2", n)  # warm the server's caches once
    keys = list(W5_SUBJECTS)
    for _ in range(reps):
        rng.shuffle(keys)
        for k in keys:
            first, everything = cold_start(env, k, n)
            out[k]["first"].append(first)
            out[k]["all"].append(everything)
    return out


def w5_ratio(res: dict[str, dict[str, list[float]]], key: str, which: str) -> float:
    """Median over repetitions of ``key``'s time / the same driver's connects in that
    repetition (``first``: one connect; ``all``: n sequential connects)."""
    base = res["connect3" if key in ("connect3", "pg3pool") else "connect2"][which]
    return median([x / b for x, b in zip(res[key][which], base, strict=True)])


def print_w5(res: dict[str, dict[str, list[float]]], reps: int, n: int) -> None:
    print(f"\nW5  cold start: construct a pool of {n} -> the caller's first SELECT 1, and -> "
          f"all {n} open")
    print(f"  {reps} repetition(s), subjects in shuffled order, medians; each pool closed and "
          "its backends gone before the next. ratios (median of per-repetition ratios): first "
          f"/ one connect, all / {n} sequential connects, same driver, same repetition. ours: "
          f"all open = a configure callback saw the {n}th connection and stats() shows idle + "
          f"in_use == {n}; psycopg_pool: wait()")
    rows = [["subject", "first query", "x 1 connect", f"all {n} open", f"x {n} connects"]]
    for k, label in W5_SUBJECTS.items():
        f, a = median(res[k]["first"]), median(res[k]["all"])
        rows.append([label, fmt_time(f), fmt_ratio(w5_ratio(res, k, "first")),
                     fmt_time(a) if not math.isnan(a) else "lazy",
                     fmt_ratio(w5_ratio(res, k, "all")) if not math.isnan(a) else "-"])
    print(table(rows, right=(1, 2, 3, 4)))


# ----------------------------------------------------------------------------------------------
# Hanging host
# ----------------------------------------------------------------------------------------------


def run_hang(env: Env, seconds: float, connect_timeout: int) -> dict[str, Any]:
    """getconn latency on a warm pool of ours: first alone, then while the supervisor
    prewarms a pool whose host accepts TCP (the kernel completes the handshake into a backlog
    nobody accepts from) and never answers, so each attempt lasts connect_timeout."""
    app = "bench-hang-warm"
    warm = ConnectionPool(minconn=4, maxconn=4, dsn=env.dsn, autocommit=True, name=app,
                          application_name=app)
    _wait_ours(warm, 4)
    get, put = warm.getconn, warm.putconn

    def phase() -> list[float]:
        lat: list[float] = []
        end = perf_counter() + seconds
        while True:
            t0 = perf_counter()
            c = get()
            t1 = perf_counter()
            cur = c.cursor()
            cur.execute(SQL)
            cur.fetchone()
            cur.close()
            put(c)
            lat.append(t1 - t0)
            if t1 >= end:
                return lat

    for _ in range(2000):  # warm-up
        put(get())
    gc.collect()
    out: dict[str, Any] = {}
    out["baseline"] = phase()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    hanging = ConnectionPool(minconn=4, maxconn=4, background_prewarm=True, host="127.0.0.1",
                             port=port, user="postgres", dbname="postgres",
                             connect_timeout=connect_timeout, name="bench-hanging")
    try:
        out["hanging"] = phase()
        st = hanging.stats()
        out["hang_stats"] = {k: st[k] for k in ("size", "idle", "opening", "connect_errors",
                                                "last_connect_error")}
    finally:
        hanging.close()
        warm.close()
        listener.close()
    out["port"] = port
    return out


def summarise_latencies(lat: list[float]) -> dict[str, float]:
    return {
        "n": len(lat), "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "p99.9": pct(lat, 0.999),
        "max": max(lat) if lat else math.nan, "over_1ms": sum(1 for x in lat if x > 1e-3),
    }


def print_hang(res: dict[str, Any], seconds: float, connect_timeout: int) -> dict[str, Any]:
    base = summarise_latencies(res["baseline"])
    hang = summarise_latencies(res["hanging"])
    st = res["hang_stats"]
    print(f"\nH   getconn latency, warm pool of ours (4 idle, 1 thread, getconn + SELECT 1 + "
          f"putconn, getconn timed), {seconds:g} s per phase")
    print(f"  second pool: minconn 4, background_prewarm, 127.0.0.1:{res['port']} listens and "
          f"never answers, connect_timeout {connect_timeout}; at the end of the phase: "
          f"{st['opening']} connect(s) in progress, {st['idle']} open, "
          f"{st['connect_errors']} connect error(s) so far")
    rows = [["phase", "samples", "p50", "p99", "p99.9", "max", "> 1 ms"]]
    for name, s in (("warm pool alone", base), ("while a hanging host prewarms", hang)):
        rows.append([name, str(s["n"]), fmt_time(s["p50"]), fmt_time(s["p99"]),
                     fmt_time(s["p99.9"]), fmt_time(s["max"]), str(s["over_1ms"])])
    print(table(rows, right=(1, 2, 3, 4, 5, 6)))
    return {"baseline": base, "hanging": hang, "hang_stats": st}


# ----------------------------------------------------------------------------------------------
# Summary, targets
# ----------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    ok: bool | None  # None: not measured


def summary(
    w1: SliceResult | None, w2: SliceResult | None, w3: dict[str, float] | None,
    w4: dict[str, float] | None, w5: dict[str, dict[str, list[float]]] | None,
    w3raw: dict[str, list[ThreadSlice]] | None, w4raw: dict[str, list[ThreadSlice]] | None,
    maxconn: int,
) -> None:
    cols = ["floor", "ours", "registry", *PEERS]
    names = {"floor": "floor", "ours": "ours", "registry": "registry.get().conn()", **PEERS}
    print("\nSUMMARY  cost relative to the floor, medians (>1 = slower; psycopg_pool against the "
          "psycopg 3 floor; W3/W4: floor throughput / throughput; W5: all 8 open / 8 sequential "
          "connects)")
    rows = [["workload", *(names[c] for c in cols)]]

    def sliced_row(label: str, res: SliceResult | None) -> None:
        if res is None:
            return
        row = [label]
        for c in cols:
            if c not in res.values:
                row.append("-")
            elif c == "floor":
                row.append(fmt_time(median(res.values["floor"])))
            else:
                row.append(fmt_ratio(median(res.ratios[c])))
        rows.append(row)

    def thread_row(label: str, ratios: dict[str, float] | None,
                   raw: dict[str, list[ThreadSlice]] | None) -> None:
        if ratios is None or raw is None:
            return
        row = [label]
        for c in cols:
            if c not in ratios:
                row.append("-")
                continue
            sl = raw[c]
            starved = median([sum(1 for n in x.counts if n == 0) for x in sl])
            most = max(x.max_backends for x in sl)
            if c == "floor":
                cell = fmt_rate(median([x.throughput for x in sl]))
            else:
                cell = fmt_ratio(ratios[c])
            if starved:
                cell += f" {starved:g} starve"
            if most > maxconn:
                cell += f" >max ({most})"
            row.append(cell)
        rows.append(row)

    sliced_row("W1 checkout+return", w1)
    sliced_row("W2 + SELECT 1", w2)
    if w2 is not None:
        row = ["W2 vs same-order floor"]
        for c in cols:
            row.append(fmt_ratio(median(w2.same_order[c])) if c in w2.same_order and
                       c != "floor" else "-")
        rows.append(row)
    thread_row("W3 8 thr, max 8", w3, w3raw)
    thread_row("W4 32 thr, max 8", w4, w4raw)
    if w5 is not None:
        eight = median(w5["connect2"]["all"])
        keymap = {"floor": "connect2", "ours": "ours", "registry": None, "pg2pool": "pg2pool",
                  "pg2_pool": "pg2_pool", "pg3pool": "pg3pool", "sa": "sa"}
        row = ["W5 cold, all 8 open"]
        for c in cols:
            k = keymap[c]
            if k is None:
                row.append("-")
            elif c == "floor":
                row.append(fmt_time(eight))
            else:
                a = median(w5[k]["all"])
                row.append("lazy" if math.isnan(a) else fmt_ratio(w5_ratio(w5, k, "all")))
        rows.append(row)
    print(table(rows))

    # ours against each peer: peer cost / our cost (>1: ours is faster)
    print("\nOURS VS PEERS  peer cost / our cost, medians of per-round ratios (>1: ours is "
          "faster; both normalised by their own driver's floor for psycopg_pool)")
    rows = [["workload", *PEERS.values()]]

    def peer_row_sliced(label: str, res: SliceResult | None) -> None:
        if res is None:
            return
        row = [label]
        for p in PEERS:
            rs = [rp / ro for rp, ro in zip(res.ratios[p], res.ratios["ours"], strict=True)]
            row.append(fmt_ratio(median(rs)))
        rows.append(row)

    def peer_row_threads(label: str, raw: dict[str, list[ThreadSlice]] | None) -> None:
        if raw is None:
            return
        row = [label]
        for p in PEERS:
            base_p = "pg3floor" if p == "pg3pool" else "floor"
            rs = []
            for xo, xp, bo, bp in zip(raw["ours"], raw[p], raw["floor"], raw[base_p],
                                      strict=True):
                if not (xo.ops and xp.ops):
                    continue
                rs.append((bp.throughput / xp.throughput) / (bo.throughput / xo.throughput))
            row.append(fmt_ratio(median(rs)))
        rows.append(row)

    peer_row_sliced("W1 checkout+return", w1)
    peer_row_sliced("W2 + SELECT 1", w2)
    if w2 is not None:
        row = ["W2 vs same-order floor"]
        for p in PEERS:
            rs = [rp / ro for rp, ro in zip(w2.same_order[p], w2.same_order["ours"], strict=True)]
            row.append(fmt_ratio(median(rs)))
        rows.append(row)
    peer_row_threads("W3 8 thr, max 8", w3raw)
    peer_row_threads("W4 32 thr, max 8", w4raw)
    if w5 is not None:
        ours_all = w5_ratio(w5, "ours", "all")
        ours_first = w5_ratio(w5, "ours", "first")
        row_a, row_f = ["W5 all 8 open"], ["W5 first query"]
        for p in PEERS:
            a = w5_ratio(w5, p, "all")
            row_a.append("lazy" if math.isnan(a) else fmt_ratio(a / ours_all))
            row_f.append(fmt_ratio(w5_ratio(w5, p, "first") / ours_first))
        rows.extend([row_f, row_a])
    print(table(rows))


def targets(
    w1: SliceResult | None, w2: SliceResult | None,
    w3raw: dict[str, list[ThreadSlice]] | None, w3: dict[str, float] | None,
    w4raw: dict[str, list[ThreadSlice]] | None, w4: dict[str, float] | None,
    w5: dict[str, dict[str, list[float]]] | None, hang: dict[str, Any] | None,
) -> list[Target]:
    out: list[Target] = []
    if w1 is not None:
        r = median(w1.ratios["ours"])
        out.append(Target("W1 checkout+return", "<= 1.60x floor", fmt_ratio(r), r <= 1.6))
    if w2 is not None:
        r = median(w2.same_order["ours"])
        out.append(Target("W2 + SELECT 1", f"<= 1.04x {OUR_REUSE.upper()} floor (ours' default "
                          "order)", fmt_ratio(r), r <= 1.04))
        rs = [a / b for a, b in zip(w2.values["registry"], w2.values["ours_cm"], strict=True)]
        r = median(rs)
        out.append(Target("W2 registry.get(name).conn()", "<= 1.05x pool.conn()", fmt_ratio(r),
                          r <= 1.05))
    if w3 is not None and w3raw is not None:
        r = w3["ours"]
        out.append(Target("W3 8 threads, max 8", "cost <= 1.04x floor", fmt_ratio(r), r <= 1.04))
    if w4 is not None and w4raw is not None:
        tput = 1 / w4["ours"]
        fair = median([jain(x.counts) for x in w4raw["ours"]])
        p99 = median([x.wait_p99 for x in w4raw["ours"]])
        p99_3 = median([x.wait_p99 for x in w4raw["pg3pool"]])
        out.append(Target("W4 32 threads, max 8: throughput", ">= 1.10x floor's",
                          fmt_ratio(tput), tput >= 1.1))
        out.append(Target("W4 fairness", ">= 0.95 (Jain)", f"{fair:.3f}", fair >= 0.95))
        out.append(Target("W4 p99 checkout wait", f"<= psycopg_pool's ({fmt_time(p99_3)})",
                          fmt_time(p99), p99 <= p99_3))
    if w5 is not None:
        one, eight = median(w5["connect2"]["first"]), median(w5["connect2"]["all"])
        f, a = median(w5["ours"]["first"]), median(w5["ours"]["all"])
        rf, ra = w5_ratio(w5, "ours", "first"), w5_ratio(w5, "ours", "all")
        out.append(Target("W5 first query", f"<= 1.2 connect times (1 connect: {fmt_time(one)})",
                          f"{rf:.2f} connects ({fmt_time(f)})", rf <= 1.2))
        out.append(Target("W5 all 8 open", f"<= 1.1x 8 sequential connects ({fmt_time(eight)})",
                          f"{ra:.2f}x ({fmt_time(a)})", ra <= 1.1))
    if hang is not None:
        p = hang["hanging"]["p99.9"]
        out.append(Target("H getconn p99.9, hanging host prewarming", "< 1 ms", fmt_time(p),
                          p < 1e-3))
    return out


def print_targets(ts: list[Target], quick: bool) -> None:
    print("\nTARGETS  our pool" + ("  (--quick: too few samples to judge; shown, not meant)"
                                   if quick else ""))
    rows = [["", "target", "goal", "measured"]]
    for t in ts:
        mark = "-" if t.ok is None else ("PASS" if t.ok else "MISS")
        rows.append([mark, t.name, t.goal, t.measured])
    print(table(rows))
    passed = sum(1 for t in ts if t.ok)
    print(f"  {passed}/{len(ts)} targets met")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

WORKLOADS = ("w1", "w2", "w3", "w4", "w5", "hang")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 round, tiny slices")
    ap.add_argument("--cpu", type=int, default=0, help="the CPU client and server share (0)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin client or server")
    ap.add_argument("--json", metavar="FILE", help="save the raw numbers here")
    ap.add_argument("--only", metavar="LIST", help=f"comma-separated subset of {WORKLOADS}")
    ap.add_argument("--rounds", type=int, help="W1/W2 rounds (default 80; --quick 1)")
    ap.add_argument("--slice", type=float, help="W3/W4 slice seconds (default 0.5)")
    ap.add_argument("--seed", type=int, help="seed of the shuffled orders")
    args = ap.parse_args(argv)
    if args.only:
        bad = set(args.only.split(",")) - set(WORKLOADS)
        if bad:
            ap.error(f"unknown workload(s) {sorted(bad)}; choose from {WORKLOADS}")
    return args


@contextlib.contextmanager
def server() -> Iterator[LocalCluster]:
    cluster = LocalCluster(n_replicas=0).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if _MISSING is not None:
        print(f"bench: the `bench` extra is not installed ({_MISSING}); run `make bench` or "
              "pip install -e '.[test,dev,bench]'", file=sys.stderr)
        return 2
    cfg = Settings.from_args(args)
    logs = LogCapture()
    logging.getLogger().addHandler(logs)
    logging.getLogger().setLevel(logging.WARNING)
    only = set(args.only.split(",")) if args.only else set(WORKLOADS)
    rng = random.Random(cfg.seed)
    started = perf_counter()
    print(f"pgregistry benchmark ({'quick smoke run' if cfg.quick else 'full run'})")
    with server() as cluster, tempfile.TemporaryDirectory(prefix="pgregistry-bench-") as tmp:
        dsn = cluster.primary.dsn()
        monitor = psycopg2.connect(dsn, application_name="bench-monitor")
        monitor.autocommit = True
        env = Env(cluster, dsn, monitor, Path(tmp), cfg)
        if not args.no_pin:
            if args.cpu not in os.sched_getaffinity(0):
                print(f"bench: CPU {args.cpu} is not available to this process", file=sys.stderr)
                return 2
            env.pinned = pin(env, args.cpu)
        for line in machine_line(env):
            print(line)
        print(f"server    {dsn} (LocalCluster, data in {cluster.dir})")
        for line in (
            "setup     autocommit connections everywhere: SELECT 1 is one round trip, nothing "
            "to roll back",
            f"          ours: ConnectionPool defaults (test_on_borrow on, validation_bypass 0.5 s,"
            f" {OUR_REUSE.upper()}, timeout 30 s), autocommit=True",
            "          psycopg2.pool: ThreadedConnectionPool (LIFO; never waits: in W4 a failed "
            "checkout is counted and retried after 1 ms), autocommit set once on every "
            "connection",
            "          psycopg2_pool: ThreadSafeConnectionPool (LIFO), autocommit via a "
            "connection_factory (it opens new connections at any time)",
            "          psycopg_pool: ConnectionPool, kwargs autocommit=True, compared with a "
            "psycopg 3 floor",
            "          SQLAlchemy: QueuePool(creator, max_overflow=0), FIFO, reset_on_return "
            "default ('rollback': a client-side no-op on autocommit psycopg2, no round trip)",
            "          floors: W1/W2 Lock+deque FIFO (popleft/append; a LIFO one for reference); "
            "W3/W4 Lock+Condition+deque (waits while empty, notify on return)",
        ):
            print(line)

        raw: dict[str, Any] = {"settings": cfg.__dict__, "machine": machine_line(env)}
        w1 = w2 = None
        w3 = w4 = None
        w3raw = w4raw = None
        w5 = None
        hang = None

        if only & {"w1", "w2"}:
            subjects = build_subjects(env, cfg.small, blocking=False, tag="w12")
            gc.collect()
            gc.freeze()
            try:
                if "w1" in only:
                    w1 = run_sliced(subjects, _slice_w1, cfg.w12_rounds, cfg.w12_slice_s, rng)
                    print_sliced(f"W1  checkout + return, no query, 1 thread, pool of {cfg.small}"
                                 " (all open)", subjects, w1, cfg.w12_rounds)
                    raw["w1"] = w1.__dict__
                if "w2" in only:
                    w2_subjects = [s for s in subjects if s.key != "sa_ping"]
                    w2 = run_sliced(w2_subjects, _slice_w2, cfg.w12_rounds, cfg.w12_slice_s, rng)
                    print_sliced(f"W2  checkout + SELECT 1 + return, 1 thread, pool of "
                                 f"{cfg.small}", w2_subjects, w2, cfg.w12_rounds)
                    raw["w2"] = w2.__dict__
            finally:
                gc.unfreeze()
                close_subjects(env, subjects)

        for key, threads in (("w3", cfg.w3_threads), ("w4", cfg.w4_threads)):
            if key not in only:
                continue
            subjects = build_subjects(env, cfg.big, blocking=True, tag=key)
            gc.collect()
            gc.freeze()
            try:
                res = run_threads(env, subjects, threads, cfg.w34_rounds, cfg.w34_slice_s, rng)
                title = (f"{key.upper()}  {threads} threads, maxconn {cfg.big}, checkout + "
                         "SELECT 1 + return; the floor blocks (Lock+Condition+deque)")
                ratios = print_threads(title, subjects, res, threads, cfg.w34_rounds,
                                       cfg.w34_slice_s)
                raw[key] = {k: [x.__dict__ for x in v] for k, v in res.items()}
                if key == "w3":
                    w3, w3raw = ratios, res
                else:
                    w4, w4raw = ratios, res
            finally:
                gc.unfreeze()
                close_subjects(env, subjects)

        if "w5" in only:
            w5 = run_w5(env, cfg.w5_reps, cfg.big, rng)
            print_w5(w5, cfg.w5_reps, cfg.big)
            raw["w5"] = w5

        if "hang" in only:
            h = run_hang(env, cfg.hang_s, cfg.hang_connect_timeout)
            hang = print_hang(h, cfg.hang_s, cfg.hang_connect_timeout)
            raw["hang"] = {**hang, **{
                f"{phase}_samples_ns": [round(x * 1e9) for x in h[phase]]
                for phase in ("baseline", "hanging")}}

        summary(w1, w2, w3, w4, w5, w3raw, w4raw, cfg.big)
        ts = targets(w1, w2, w3raw, w3, w4raw, w4, w5, hang)
        print_targets(ts, cfg.quick)
        raw["targets"] = [t.__dict__ for t in ts]
        monitor.close()
        if args.json:
            Path(args.json).write_text(json.dumps(raw, default=str))
            print(f"raw numbers saved to {args.json}")
    logs.report()
    print(f"done in {perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
