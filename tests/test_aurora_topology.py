"""Aurora as it really is, end to end from ``Registry.from_yaml``: an Aurora-faithful local
cluster (``aurora_cluster``: a writer and 3 readers publishing ``aurora_replica_status()``; the
reader endpoint a CNAME to ONE reader per query, TTL 1 s; the cluster endpoint a CNAME that
follows a failover 30 s late) and pools with ``discovery: aurora``.

Issue 12, "What it must show" 2 (readers spread at once; a new reader gets its share), 3 (writer
failover while DNS lags 30 s, under load) and 4 (bad topology: DNS discovery keeps serving)."""

from __future__ import annotations

import logging
import threading
import time

import psycopg2
import pytest
import yaml
from helpers import SENTINEL_ENV, run_load_for, wait_until
from pgregistry import Registry
from pgregistry.pools import PoolError
from pgregistry.testing.aurora import APP_ROLE

APP = "aurora-topo"


def write_yaml(path, cluster, dns, *, writer=None, readers=None, defaults=None):
    config = {
        "version": 1,
        "dns": {"nameservers": ["127.0.0.1"], "port": dns.port, "lifetime": 1.0,
                "timeout": 0.5, "families": ["ipv4"]},
        "defaults": {
            "user": "postgres", "dbname": "postgres", "port": cluster.port,
            "password_env": SENTINEL_ENV, "connect_timeout": 1, "timeout": 5,
            "application_name": APP, "address_ban": 0.2, "address_ban_max": 1.0,
            "reconnect_backoff": 0.2, "reconnect_backoff_max": 1.0,
            "discovery": "aurora", **(defaults or {}),
        },
        "pools": {},
    }
    if writer is not None:
        config["pools"]["writer"] = {"host": cluster.writer_endpoint, "role": "writer",
                                     "minconn": 2, "maxconn": 8, **writer}
    if readers is not None:
        config["pools"]["readers"] = {"host": cluster.reader_endpoint, "role": "reader",
                                      "minconn": 6, "maxconn": 6, **readers}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def make_registry(aurora_cluster, dns_server, tmp_path):
    made = []

    def make(**kw):
        path = write_yaml(tmp_path / f"pools{len(made)}.yaml", aurora_cluster, dns_server, **kw)
        reg = Registry.from_yaml(path, install_sighup=False)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.close()


def spread(cluster, servers=None):
    """Connections of the test's pools per server, as the servers count them."""
    return {s.name: s.backend_count(APP) for s in (servers or cluster.replicas) if s.running}


def read_host(reg, pool="readers"):
    with reg.get(pool).conn(timeout=5) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('cluster_name'), pg_is_in_recovery()")
        return cur.fetchone()


# -- must-show 2: readers spread at once, a new reader gets its share --------------------------


def test_readers_spread_over_every_reader_at_once(aurora_cluster, make_registry):
    t0 = time.monotonic()
    reg = make_registry(readers={})
    assert wait_until(lambda: sorted(spread(aurora_cluster).values()) == [2, 2, 2], 5), \
        spread(aurora_cluster)
    took = time.monotonic() - t0
    assert aurora_cluster.primary.backend_count(APP) == 0  # readers only
    s = reg.stats()["readers"]
    assert s["discovery"] == "aurora" and s["members_from"] == "topology"
    topo = s["topology"]
    assert topo["state"] == "ok" and topo["source"] in {x.name for x in aurora_cluster.servers}
    # the query ran on the supervisor's I/O workers: no thread of the topology's own
    assert not [t.name for t in threading.enumerate() if t.name.startswith("pgregistry-topo")]
    roles = {iid: i["role"] for iid, i in topo["instances"].items()}
    assert roles == {aurora_cluster.primary.name: "writer",
                     **{r.name: "reader" for r in aurora_cluster.replicas}}
    print(f"\nreaders 2/2/2 on the servers {took:.2f} s after Registry.from_yaml")


def test_a_new_reader_gets_its_share_within_one_refresh(aurora_cluster, make_registry):
    interval = 2.0
    reg = make_registry(readers={"topology_refresh_interval": interval})
    assert wait_until(lambda: sorted(spread(aurora_cluster).values()) == [2, 2, 2], 5)
    failures: list[str] = []
    checkouts = [0]
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                read_host(reg)
                checkouts[0] += 1
            except (psycopg2.Error, PoolError) as exc:  # asserted below
                failures.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        run_load_for(0.3)
        new = aurora_cluster.add_replica()
        t_added = time.monotonic()
        assert wait_until(lambda: new.backend_count(APP) >= 1, interval + 5), \
            spread(aurora_cluster)
        first = time.monotonic() - t_added

        def even() -> bool:  # 6 connections over 4 readers: 2/2/1/1
            counts = spread(aurora_cluster).values()
            return max(counts) - min(counts) <= 1

        assert wait_until(even, interval + 5), spread(aurora_cluster)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failures == [], failures[:3]
    assert checkouts[0] > 50
    print(f"\nthe 4th reader got connections {first:.2f} s after it joined "
          f"(topology_refresh_interval {interval:g} s); {checkouts[0]} checkouts, 0 failed")


# -- must-show 3: writer failover while the cluster endpoint's DNS lags 30 s ------------------


def test_writer_failover_with_dns_lagging_30s(aurora_cluster, dns_server, make_registry, caplog):
    caplog.set_level(logging.INFO, logger="pgregistry")
    cluster = aurora_cluster
    cluster.primary.execute("CREATE TABLE aurora_writes (id serial PRIMARY KEY, v int)")
    cluster.wait_replicated()
    reg = make_registry(writer={}, readers={"minconn": 3})
    assert wait_until(lambda: reg.stats()["writer"]["idle"] == 2
                      and reg.stats()["readers"]["idle"] == 3, 5)
    lock = threading.Lock()
    writes_ok: list[float] = []
    in_recovery: list[tuple[float, str]] = []  # writer checkouts on a server in recovery
    write_errors: list[tuple[float, str]] = []
    read_errors: list[str] = []
    reads = [0]
    stop = threading.Event()

    def writer(i):
        n = 0
        handle = reg.get("writer")
        while not stop.is_set():
            n += 1
            try:
                with handle.conn(timeout=5) as conn, conn.cursor() as cur:
                    handed_out = time.monotonic()
                    cur.execute("SELECT pg_is_in_recovery(), current_setting('cluster_name')")
                    recovering, where = cur.fetchone()
                    if recovering:
                        with lock:
                            in_recovery.append((handed_out, where))
                    cur.execute("INSERT INTO aurora_writes (v) VALUES (%s)", (i * 100000 + n,))
                    conn.commit()
                with lock:
                    writes_ok.append(time.monotonic())
            except (psycopg2.Error, PoolError) as exc:
                with lock:
                    write_errors.append((time.monotonic(), type(exc).__name__))
                stop.wait(0.01)

    def reader():
        handle = reg.get("readers")
        while not stop.is_set():
            try:
                with handle.conn(timeout=5) as conn, conn.cursor() as cur:
                    cur.execute("SELECT 1")
                with lock:
                    reads[0] += 1
            except (psycopg2.Error, PoolError) as exc:  # asserted below
                read_errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        run_load_for(0.5)
        old = cluster.primary
        new = cluster.failover()  # stop the writer, promote a replica, the topology follows
        t_promoted = time.monotonic()
        # the cluster endpoint still names the old writer (30 s of DNS lag)
        assert dns_server.targets(cluster.writer_endpoint) == [cluster.instance_endpoint(old)]
        assert wait_until(lambda: any(t > t_promoted for t in writes_ok), 5), \
            "no write succeeded within 5 s of the promotion"
        recovered = min(t for t in writes_ok if t > t_promoted) - t_promoted
        run_load_for(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert dns_server.targets(cluster.writer_endpoint) == [cluster.instance_endpoint(old)]
    assert recovered <= 5.0
    assert sum(1 for t in writes_ok if t > t_promoted + recovered) > 10, "writes did not go on"
    late = [(t, w) for t, w in in_recovery if t > t_promoted]
    assert late == [], f"writer connections handed out in recovery after the promotion: {late}"
    assert read_errors == [], read_errors[:5]
    assert reads[0] > 100
    topo = reg.stats()["writer"]["topology"]
    assert topo["instances"][new.name]["role"] == "writer" and topo["state"] == "ok"
    assert "new writer" in caplog.text
    failed_after = sum(1 for t, _ in write_errors if t > t_promoted)
    print(f"\nfailover, cluster endpoint DNS lagging 30 s: writes back {recovered:.2f} s after "
          f"the promotion; {len(writes_ok)} writes, {len(write_errors)} write errors "
          f"({failed_after} after the promotion), {reads[0]} reads, 0 read errors, "
          f"0 writer checkouts in recovery")


# -- must-show 4: bad topology, DNS discovery keeps serving ------------------------------------


def served_by_dns(reg, cluster, caplog, text):
    assert wait_until(lambda: text in caplog.text, 5), caplog.text[-2000:]
    hosts = {read_host(reg)[0] for _ in range(20)}
    assert hosts <= {r.name for r in cluster.replicas} and hosts
    s = reg.stats()["readers"]
    assert s["members_from"] == "dns"
    return s


def test_topology_function_missing_falls_back_to_dns(aurora_cluster, make_registry, caplog):
    caplog.set_level(logging.WARNING, logger="pgregistry")
    aurora_cluster.drop_topology_function()
    aurora_cluster.wait_replicated()
    reg = make_registry(readers={"minconn": 2})
    s = served_by_dns(reg, aurora_cluster, caplog, "does not exist here (not Aurora PostgreSQL?)")
    assert s["topology"]["state"] == "unavailable"
    assert caplog.text.count("does not exist here") == 1


def test_topology_permission_denied_falls_back_to_dns(aurora_cluster, make_registry, caplog):
    caplog.set_level(logging.WARNING, logger="pgregistry")
    aurora_cluster.revoke_topology()
    aurora_cluster.wait_replicated()
    reg = make_registry(readers={"minconn": 2}, defaults={"user": APP_ROLE})
    s = served_by_dns(reg, aurora_cluster, caplog, "permission denied for aurora_replica_status")
    assert "grant EXECUTE" in s["topology"]["last_error"]


def test_an_instance_without_dns_record_is_skipped(aurora_cluster, make_registry, caplog):
    caplog.set_level(logging.WARNING, logger="pgregistry")
    aurora_cluster.add_topology_row("ghost-instance")
    aurora_cluster.wait_replicated()
    reg = make_registry(readers={})
    assert wait_until(lambda: "ghost-instance" in caplog.text, 5)
    assert "does not resolve" in caplog.text
    assert wait_until(lambda: sorted(spread(aurora_cluster).values()) == [2, 2, 2], 5)
    assert reg.stats()["readers"]["members_from"] == "topology"


def test_a_wrong_instance_host_pattern_falls_back_to_dns(aurora_cluster, make_registry, caplog):
    caplog.set_level(logging.WARNING, logger="pgregistry")
    reg = make_registry(readers={"minconn": 2,
                                 "instance_host_pattern": "?.nowhere.invalid-region.rds.test"})
    served_by_dns(reg, aurora_cluster, caplog, "no instance endpoint of the topology resolves")


def test_metrics_show_the_topology(aurora_cluster, make_registry):
    pytest.importorskip("prometheus_client")
    from pgregistry.prometheus import register_registry
    from prometheus_client import CollectorRegistry, generate_latest

    reg = make_registry(readers={"minconn": 2})
    assert wait_until(lambda: reg.stats()["readers"]["topology"]["state"] == "ok", 5)
    registry = CollectorRegistry()
    register_registry(reg, collector_registry=registry)
    text = generate_latest(registry).decode()
    pattern = aurora_cluster.instance_host_pattern
    assert (f'pgregistry_topology_instances{{cluster="{pattern}",pool="readers",role="reader"}} '
            "3.0") in text
    assert f'pgregistry_topology_available{{cluster="{pattern}",pool="readers"}} 1.0' in text
