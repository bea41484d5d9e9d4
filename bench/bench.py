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

This file parses the options and runs the workloads in order; the package beside it holds the
rest: ``poolbench.env`` (settings, the server, CPU pinning), ``poolbench.peers`` (the floors,
our pool and the peer pools as subjects), ``poolbench.workloads`` (W1-W5 and H, raw numbers),
``poolbench.report`` (tables, summary, targets) and ``poolbench.measure`` (statistics).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# the `bench` extra: the peers (checked before the modules that import them)
EXTRA = ("psycopg", "psycopg2_pool", "psycopg_pool", "sqlalchemy")
perf_counter = time.perf_counter


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
    ap.add_argument("--otel", action="store_true",
                    help="instrument our pools with OpenTelemetry (needs opentelemetry-sdk)")
    args = ap.parse_args(argv)
    if args.only:
        bad = set(args.only.split(",")) - set(WORKLOADS)
        if bad:
            ap.error(f"unknown workload(s) {sorted(bad)}; choose from {WORKLOADS}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [m for m in EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        print(f"bench: the `bench` extra is not installed (no {', '.join(missing)}); run "
              "`make bench` or pip install -e '.[test,dev,bench]'", file=sys.stderr)
        return 2
    return run(args)


def run(args: argparse.Namespace) -> int:
    import psycopg2
    from poolbench.env import Env, Settings, machine_line, pin, server
    from poolbench.peers import OUR_REUSE, build_subjects, close_subjects
    from poolbench.report import (
        LogCapture,
        print_hang,
        print_sliced,
        print_targets,
        print_threads,
        print_w5,
        summary,
        targets,
    )
    from poolbench.workloads import run_hang, run_sliced, run_threads, run_w5, slice_w1, slice_w2

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
        if cfg.otel:
            print("          --otel: our pools and the registry instrumented with OpenTelemetry "
                  "(SDK MeterProvider, in-memory reader): every checkout and return recorded")

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
                    w1 = run_sliced(subjects, slice_w1, cfg.w12_rounds, cfg.w12_slice_s, rng)
                    print_sliced(f"W1  checkout + return, no query, 1 thread, pool of {cfg.small}"
                                 " (all open)", subjects, w1, cfg.w12_rounds)
                    raw["w1"] = w1.__dict__
                if "w2" in only:
                    w2_subjects = [s for s in subjects if s.key != "sa_ping"]
                    w2 = run_sliced(w2_subjects, slice_w2, cfg.w12_rounds, cfg.w12_slice_s, rng)
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
