"""What every workload runs in: the settings of a run, the server it starts, client and server
pinned to one CPU, the machine line of the report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg
import psycopg2
import psycopg2.extensions
from pgregistry.pools import ConnectionPool
from pgregistry.testing.cluster import LocalCluster

perf_counter = time.perf_counter


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
    otel: bool = False  # our pools instrumented with OpenTelemetry (the SDK, an in-memory reader)

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
        if args.otel:
            changes["otel"] = True
        return dataclasses.replace(s, **changes)


class AutocommitConnection(psycopg2.extensions.connection):
    """A psycopg2 connection in autocommit mode from birth (for pools that open connections
    at any time, where setting the flag once after creating the pool is not enough)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.autocommit = True


@dataclass
class Env:
    cluster: LocalCluster
    dsn: str
    monitor: Any  # an autocommit psycopg2 connection, application_name bench-monitor
    tmp: Path
    settings: Settings
    pinned: str = "not pinned"
    meter_provider: Any = None

    def instrument(self, pool: Any = None, registry: Any = None) -> None:
        """With --otel: report ``pool`` (or ``registry``'s pools) through OpenTelemetry, as an
        application with the SDK would (the cost of the ``otel`` extra in use)."""
        if not self.settings.otel:
            return
        if self.meter_provider is None:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            self.meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        if registry is not None:
            registry.instrument_otel(self.meter_provider)
        else:
            from pgregistry.otel import instrument_pools

            instrument_pools(pool, meter_provider=self.meter_provider)

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


@contextlib.contextmanager
def server() -> Iterator[LocalCluster]:
    cluster = LocalCluster(n_replicas=0).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def wait_open(pool: ConnectionPool, n: int, timeout: float = 30.0) -> None:
    deadline = perf_counter() + timeout
    while True:
        s = pool.stats()
        if s["idle"] + s["in_use"] >= n:
            return
        if perf_counter() > deadline:
            raise RuntimeError(f"pool {pool.name} did not open {n} connections: {s}")
        time.sleep(0.002)
