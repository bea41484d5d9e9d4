"""The workloads: W1/W2 single-thread slices, W3/W4 threads, W5 cold start, H a hanging host.
Each returns raw numbers; ``report`` prints them."""

from __future__ import annotations

import gc
import math
import operator
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg2.pool
import psycopg2_pool
import psycopg_pool
from pgregistry.pools import ConnectionPool
from sqlalchemy.pool import QueuePool

from .env import AutocommitConnection, Env, wait_open
from .measure import median, pct
from .peers import Subject

SQL = "SELECT 1"
perf_counter = time.perf_counter
perf_counter_ns = time.perf_counter_ns


def slice_w1(s: Subject, n: int) -> int:
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


def slice_w2(s: Subject, n: int) -> int:
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


def run_hang(env: Env, seconds: float, connect_timeout: int) -> dict[str, Any]:
    """getconn latency on a warm pool of ours: first alone, then while the supervisor
    prewarms a pool whose host accepts TCP (the kernel completes the handshake into a backlog
    nobody accepts from) and never answers, so each attempt lasts connect_timeout."""
    app = "bench-hang-warm"
    warm = ConnectionPool(minconn=4, maxconn=4, dsn=env.dsn, autocommit=True, name=app,
                          application_name=app)
    wait_open(warm, 4)
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
