"""Lag-aware readers: a replica whose replay is paused (``pg_wal_replay_pause()``) gets no new
reads within 5 s with ``max_replica_lag: 1``; resumed, it gets its share back. Plus the rules
(least lagging when all lag, live changes) on the fake clock with lags set by hand."""

from __future__ import annotations

import threading
import time
from collections import Counter

import psycopg2
import pytest
from helpers import run_load_for, wait_until
from pgregistry.pools import ConnectionPool
from pgregistry.pools.lag import LagMonitor


def test_a_paused_replica_loses_its_reads_and_gets_them_back(fresh_cluster, capsys):
    primary, r1, r2 = fresh_cluster.servers
    primary.execute("CREATE TABLE IF NOT EXISTS lag_writes (id serial, v int)")
    fresh_cluster.wait_replicated()
    pool = ConnectionPool(
        minconn=4, maxconn=4, dsn=f"host={r1.host},{r2.host} port={fresh_cluster.port} "
        "user=postgres dbname=postgres", role="reader", max_replica_lag=1.0,
        rebalance_interval=0.2, rebalance_fraction=0.5, timeout=5, name="readers")
    lock = threading.Lock()
    reads: list[tuple[float, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def writer():  # WAL keeps flowing, as on a live primary
        conn = primary.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute("INSERT INTO lag_writes (v) VALUES (1)")
                stop.wait(0.02)
        conn.close()

    def reader():
        while not stop.is_set():
            try:
                with pool.conn() as conn, conn.cursor() as cur:
                    cur.execute("SELECT host(inet_server_addr())")
                    addr = cur.fetchone()[0]
                with lock:
                    reads.append((time.monotonic(), addr))
            except psycopg2.Error as exc:  # pragma: no cover - asserted below
                errors.append(repr(exc))
            stop.wait(0.005)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader)
                                                   for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: {a for _, a in reads} == {r1.host, r2.host}, 10)
        r1.execute("SELECT pg_wal_replay_pause()")
        t_pause = time.monotonic()

        def avoided() -> bool:  # no read on r1 in the last 0.5 s
            with lock:
                recent = [a for t, a in reads if t > time.monotonic() - 0.5]
            return time.monotonic() - t_pause > 0.5 and bool(recent) and r1.host not in recent

        assert wait_until(avoided, 5), "reads still reach the paused replica after 5 s"
        with lock:
            last_on_r1 = max(t for t, a in reads if a == r1.host)
        avoid_s = last_on_r1 - t_pause
        s = pool.stats()
        row = s["addresses"][f"{r1.host}:{fresh_cluster.port}"]
        assert row["lagging"] and row["replica_lag_s"] > 1.0, row
        assert s["closed_by_reason"].get("replica_lag", 0) >= 1
        run_load_for(1.0)
        with lock:
            assert all(a == r2.host for t, a in reads if t > last_on_r1)

        r1.execute("SELECT pg_wal_replay_resume()")
        t_resume = time.monotonic()

        def share_back() -> bool:
            spread = pool.stats()["addresses"]
            return all(row["connections"] == 2 for row in spread.values())

        assert wait_until(share_back, 10), pool.stats()["addresses"]
        back_s = time.monotonic() - t_resume
        t_even = time.monotonic()
        run_load_for(1.0)
        with lock:
            after = Counter(a for t, a in reads if t > t_even)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        pool.close_all()
    assert errors == [], errors[:3]
    assert after[r1.host] > 0.25 * sum(after.values()), after  # its share back
    with capsys.disabled():
        print(f"\nlag-aware readers: last read on the paused replica {avoid_s:.2f} s after "
              f"the pause; back to 2/2 connections {back_s:.2f} s after the resume; "
              f"reads in the next second {dict(after)}")


def test_the_rules_on_hand_set_lags(make_pool, pg_cluster, stepped):
    r1, r2 = pg_cluster.replicas
    pool = make_pool(minconn=0, maxconn=4, max_replica_lag=1.0, role="reader",
                     dsn=f"host={r1.host},{r2.host} port={pg_cluster.port} "
                         "user=postgres dbname=postgres")
    lag = pool._lag
    assert isinstance(lag, LagMonitor)
    book = pool._connector.book
    book.labels()  # known from the start (IP literals)
    l1, l2 = f"{r1.host}:{pg_cluster.port}", f"{r2.host}:{pg_cluster.port}"
    lag._apply({l1: 3.0, l2: 0.1})
    assert [a.label for a in book.order(0.0)] == [l2, l1]  # the lagging one last
    conns = [pool.getconn() for _ in range(3)]
    assert {c.get_dsn_parameters()["hostaddr"] for c in conns} == {r2.host}
    for c in conns:
        pool.putconn(c)
    lag._apply({l1: 3.0, l2: 2.0})  # every one over: the least lagging stays usable
    snap = pool.stats()["addresses"]
    assert snap[l2]["lagging"] is False and snap[l1]["lagging"] is True
    lag._apply({l1: None, l2: 0.0})  # unmeasured: kept as it was
    assert pool.stats()["addresses"][l1]["lagging"] is True
    pool.retune(max_replica_lag=5.0)
    assert pool.max_replica_lag == 5.0 and pool._lag is lag
    lag._apply({l1: 3.0, l2: 0.0})
    assert pool.stats()["addresses"][l1]["lagging"] is False
    lag._apply({l1: 9.0, l2: 0.0})
    pool.retune(max_replica_lag=None)  # off: every address usable again
    assert pool._lag is None and not pool.stats()["addresses"][l1]["lagging"]
    with pytest.raises(ValueError, match="max_replica_lag must be > 0"):
        pool.retune(max_replica_lag=0)


def test_lag_is_measured_on_a_worker_not_the_supervisor(make_pool, pg_cluster, stepped):
    primary = pg_cluster.primary
    r1 = pg_cluster.replicas[0]
    pool = make_pool(minconn=0, max_replica_lag=1.0,
                     dsn=f"host={primary.host},{r1.host} port={pg_cluster.port} "
                         "user=postgres dbname=postgres")
    stepped.run_until_idle()  # starts a round on its worker thread
    assert wait_until(lambda: pool._lag.rounds >= 1, 5)
    snap = pool.stats()["addresses"]
    assert all(row["replica_lag_s"] is not None and row["replica_lag_s"] < 1.0
               for row in snap.values()), snap
    assert pool.stats()["max_replica_lag"] == 1.0


def test_every_replica_lagging_falls_back_to_the_writer_and_back(fresh_cluster, tmp_path):
    import yaml
    from pgregistry import Registry

    primary, r1, r2 = fresh_cluster.servers
    primary.execute("CREATE TABLE IF NOT EXISTS lag_writes (id serial, v int)")
    common = {"port": fresh_cluster.port, "user": "postgres", "dbname": "postgres",
              "minconn": 1, "maxconn": 4, "timeout": 5}
    config = {"version": 1, "pools": {
        "writer": {"host": primary.host, **common},
        "readers": {"host": f"{r1.host},{r2.host}", "role": "reader", "max_replica_lag": 1,
                    "fallback": "writer", **common},
    }}
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump(config))
    stop = threading.Event()

    def writer():
        conn = primary.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute("INSERT INTO lag_writes (v) VALUES (1)")
                stop.wait(0.02)
        conn.close()

    def served_by(reg) -> str:
        with reg.get("readers").conn() as conn, conn.cursor() as cur:
            cur.execute("SELECT host(inet_server_addr())")
            return cur.fetchone()[0]

    t = threading.Thread(target=writer)
    t.start()
    try:
        with Registry.from_yaml(path, install_sighup=False) as reg:
            assert served_by(reg) in (r1.host, r2.host)
            for r in (r1, r2):
                r.execute("SELECT pg_wal_replay_pause()")
            try:
                assert wait_until(lambda: served_by(reg) == primary.host, 8)
                fb = reg.stats()["readers"]["fallback"]
                assert fb["active"] and "lags more than max_replica_lag" in fb["reason"]
            finally:
                for r in (r1, r2):
                    r.execute("SELECT pg_wal_replay_resume()")
            assert wait_until(lambda: served_by(reg) in (r1.host, r2.host), 8)
            assert not reg.stats()["readers"]["fallback"]["active"]
    finally:
        stop.set()
        t.join(5)


def test_with_aurora_topology_the_lag_comes_from_replica_lag_in_msec(aurora_cluster,
                                                                     dns_server, tmp_path):
    import yaml
    from pgregistry import Registry

    cluster = aurora_cluster
    config = {
        "version": 1,
        "dns": {"nameservers": ["127.0.0.1"], "port": dns_server.port, "lifetime": 1.0,
                "timeout": 0.5},
        "pools": {"readers": {
            "host": cluster.reader_endpoint, "port": cluster.port, "user": "postgres",
            "dbname": "postgres", "role": "reader", "minconn": 3, "maxconn": 6,
            "max_replica_lag": 1, "topology_refresh_interval": 0.5,
            "rebalance_interval": 0.2}},
    }
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    slow = cluster.replicas[0]
    with Registry.from_yaml(path, install_sighup=False) as reg:
        pool = reg.get("readers").pool

        def rows():
            return {k: v for k, v in pool.stats()["addresses"].items() if v["active"]}

        label = f"{slow.host}:{cluster.port}"
        assert wait_until(lambda: label in rows() and rows()[label]["replica_lag_s"] == 0.0,
                          15), rows()
        cluster.primary.execute("UPDATE pgr_aurora_topology SET replica_lag_in_msec = 4000 "
                                "WHERE server_id = %s", (slow.name,))
        assert wait_until(lambda: rows()[label]["lagging"], 10), rows()[label]
        assert rows()[label]["replica_lag_s"] == 4.0
        assert wait_until(lambda: rows()[label]["connections"] == 0, 5), rows()
        cluster.primary.execute("UPDATE pgr_aurora_topology SET replica_lag_in_msec = 10 "
                                "WHERE server_id = %s", (slow.name,))
        assert wait_until(lambda: not rows()[label]["lagging"], 10), rows()
        assert label in [a.label for a in pool._connector.book.order(0.0)][:3]
