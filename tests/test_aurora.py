"""The writer guard and failover on plain round-robin DNS (``discovery: dns``): writer failover
under load, fast failure while the writer is gone, reader fallback, promoted replicas.

Each test has its own cluster (``fresh_cluster``: primary 127.0.0.11, replicas .12 and .13) and
names with one A record per server (TTL 1 s), as many round-robin DNS setups have. Aurora as it
really is (rotating CNAMEs, a lagging writer endpoint, the topology) is in
``test_aurora_topology.py``."""

from __future__ import annotations

import logging
import threading
import time

import psycopg2
import pytest
import yaml
from helpers import run_load_for, wait_until
from pgregistry import Registry
from pgregistry.pools import ConnectError

TTL = 1




def write_yaml(path, cluster, dns, readers_extra=None, writer_extra=None):
    config = {
        "version": 1,
        "dns": {"nameservers": ["127.0.0.1"], "port": dns.port, "lifetime": 1.0, "timeout": 0.5},
        "defaults": {
            "user": "postgres", "dbname": "postgres", "port": cluster.port,
            "connect_timeout": 1, "timeout": 5, "application_name": "aurora-test",
            "address_ban": 0.2, "address_ban_max": 1.0, "reconnect_backoff": 0.2,
            "reconnect_backoff_max": 1.0, "role_check_interval": 0.2,
        },
        "pools": {
            "writer": {"host": "writer.aurora.test", "role": "writer", "minconn": 2,
                       "maxconn": 8, **(writer_extra or {})},
            "readers": {"host": "readers.aurora.test", "role": "reader", "minconn": 2,
                        "maxconn": 8, **(readers_extra or {})},
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def aurora(fresh_cluster, dns_server, tmp_path):
    primary, r1, r2 = fresh_cluster.servers
    dns_server.set_a("writer.aurora.test", [primary.host], ttl=TTL)
    dns_server.set_a("readers.aurora.test", [r1.host, r2.host], ttl=TTL)
    primary.execute("CREATE TABLE IF NOT EXISTS aurora_writes (id serial PRIMARY KEY, v int)")
    made = []

    def registry(**kw):
        path = write_yaml(tmp_path / "pools.yaml", fresh_cluster, dns_server, **kw)
        reg = Registry.from_yaml(path, install_sighup=False)
        made.append(reg)
        return reg

    yield fresh_cluster, dns_server, registry
    for reg in made:
        reg.close()


def hostaddr(conn) -> str:
    return conn.get_dsn_parameters().get("hostaddr", "")


# -- failover under load ----------------------------------------------------------------------


def test_writer_failover_under_16_threads(aurora, caplog):
    caplog.set_level(logging.WARNING)
    cluster, dns, make = aurora
    reg = make()
    old = cluster.primary
    assert wait_until(lambda: reg.stats()["writer"]["idle"] == 2
                      and reg.stats()["readers"]["idle"] == 2)

    lock = threading.Lock()
    checkouts: list[tuple[float, str]] = []  # (checkout started, address handed out)
    writes_ok: list[float] = []
    read_only_at: list[float] = []  # each 25006, when its checkout was back in the pool
    write_errors: list[str] = []
    read_errors: list[str] = []
    reads = [0]
    stop = threading.Event()

    def writer(i):
        handle = reg.get("writer")
        n = 0
        while not stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                with handle.conn(timeout=5) as conn:
                    with lock:
                        checkouts.append((started, hostaddr(conn)))
                    with conn.cursor() as cur:
                        cur.execute("INSERT INTO aurora_writes (v) VALUES (%s)", (i * 100000 + n,))
                    conn.commit()
                with lock:
                    writes_ok.append(time.monotonic())
            except psycopg2.errors.ReadOnlySqlTransaction:
                with lock:
                    read_only_at.append(time.monotonic())
            except (psycopg2.Error, ConnectError) as exc:
                with lock:
                    write_errors.append(type(exc).__name__)
                time.sleep(0.01)

    def reader():
        handle = reg.get("readers")
        while not stop.is_set():
            try:
                with handle.conn(timeout=5) as conn, conn.cursor() as cur:
                    cur.execute("SELECT 1")
                reads[0] += 1
            except psycopg2.Error as exc:  # pragma: no cover - asserted below
                read_errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        run_load_for(0.5)
        # Aurora demotes the writer: it refuses writes, its DNS answer lingers for a TTL
        t_demote = time.monotonic()
        old.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        old.execute("SELECT pg_reload_conf()")
        assert wait_until(lambda: bool(read_only_at), 5), "no write ever hit the read-only writer"
        run_load_for(0.3)
        new = cluster.failover()  # stop the old writer, promote a replica, re-point the other
        t_flip = time.monotonic()
        dns.set_a("writer.aurora.test", [new.host], ttl=TTL)
        dns.set_a("readers.aurora.test", [r.host for r in cluster.replicas], ttl=TTL)
        assert wait_until(lambda: any(t > t_flip for t in writes_ok), TTL + 2)
        recovered = min(t for t in writes_ok if t > t_flip)
        run_load_for(1.0)  # and it keeps working
    finally:
        stop.set()
        for t in threads:
            t.join(30)

    old_addr = old.host
    first_25006 = min(read_only_at)
    late = [(t, a) for t, a in checkouts if t > first_25006 and a == old_addr]
    assert late == [], f"{len(late)} checkouts to the demoted writer after the first 25006"
    assert recovered - t_flip <= TTL + 1.0, f"writes resumed {recovered - t_flip:.2f} s after DNS"
    assert sum(1 for t in writes_ok if t > recovered) > 10, "writes did not keep going"
    assert read_errors == [], read_errors[:5]
    assert reads[0] > 100
    s = reg.stats()["writer"]
    assert s["role_changes"] >= 1 and s["closed_by_reason"].get("demoted_writer", 0) >= 1
    assert "is no longer the writer" in caplog.text
    print(f"\nfailover: first 25006 {first_25006 - t_demote:.3f} s after the demotion; "
          f"writes back {recovered - t_flip:.3f} s after the DNS flip "
          f"({recovered - t_demote:.3f} s after the demotion); {len(writes_ok)} writes, "
          f"{len(read_only_at)} read-only errors, {len(write_errors)} other write errors, "
          f"{reads[0]} reads, 0 read errors")


def test_checkouts_fail_fast_while_the_writer_is_gone_then_recover(aurora):
    cluster, dns, make = aurora
    reg = make()
    old = cluster.primary
    assert wait_until(lambda: reg.stats()["writer"]["idle"] == 2)
    old.stop("immediate")
    t0 = time.monotonic()
    errors = []
    for _ in range(5):
        try:
            with reg.get("writer").conn(timeout=5) as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
        except (psycopg2.OperationalError, ConnectError) as exc:
            errors.append(exc)
    elapsed = time.monotonic() - t0
    assert len(errors) == 5 and elapsed < 3.0  # fast, not after minutes
    connect_errors = [e for e in errors if isinstance(e, ConnectError)]
    assert connect_errors and "writer" in str(connect_errors[-1])
    assert f"{old.host}:{cluster.port}" in str(connect_errors[-1])
    # the cluster promotes a replica; DNS names it: checkouts work again, nothing to do
    new = cluster.replicas[0]
    new.promote()
    t_flip = time.monotonic()
    dns.set_a("writer.aurora.test", [new.host], ttl=TTL)

    def writes():
        try:
            with reg.get("writer").conn(timeout=1) as conn, conn.cursor() as cur:
                cur.execute("SELECT host(inet_server_addr())")
                return cur.fetchone()[0] == new.host
        except (psycopg2.Error, ConnectError):
            return False

    assert wait_until(writes, TTL + 2)
    assert time.monotonic() - t_flip <= TTL + 1.5


# -- readers --------------------------------------------------------------------------------------


def test_reader_fallback_to_the_writer_and_back(aurora, caplog):
    caplog.set_level(logging.WARNING)
    cluster, dns, make = aurora
    reg = make(readers_extra={"fallback": "writer"})
    r1, r2 = cluster.replicas
    assert wait_until(lambda: reg.stats()["readers"]["idle"] == 2)
    r1.stop("immediate")
    r2.stop("immediate")

    def in_recovery():
        with reg.get("readers").conn(timeout=5) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery()")
            return cur.fetchone()[0]

    # the first checkouts may meet the dead replicas' connections; then the writer serves
    assert wait_until(lambda: _quietly(in_recovery) is False, 10)
    for _ in range(5):
        assert in_recovery() is False  # served by the writer
    fb = reg.stats()["readers"]["fallback"]
    assert fb["active"] and fb["to"] == "writer" and fb["checkouts"] >= 5
    assert "serving it from writer" in caplog.text
    # a replica comes back: readers move back to it
    r1.start()
    assert wait_until(lambda: _quietly(in_recovery) is True, 15)
    assert not reg.stats()["readers"]["fallback"]["active"]
    assert "serves again" in caplog.text


def _quietly(fn):
    try:
        return fn()
    except (psycopg2.Error, ConnectError):
        return None


def test_without_fallback_reads_fail_clearly_when_no_replica_answers(aurora):
    cluster, dns, make = aurora
    reg = make()
    for r in cluster.replicas:
        r.stop("immediate")
    reg.get("readers").pool.clear_idle()
    with pytest.raises(ConnectError, match="readers"), reg.get("readers").conn(timeout=1):
        pass


def test_a_promoted_replica_is_retired_like_a_dns_change(aurora):
    cluster, dns, make = aurora
    reg = make(readers_extra={"minconn": 4})
    r1, r2 = cluster.replicas
    pool = reg.get("readers").pool
    assert wait_until(lambda: pool.stats()["idle"] == 4)
    before = {e.backend_pid for e in pool._bag.entries.values() if e.address.startswith(r1.host)}
    assert before
    r1.promote()  # it changes role under the pool's feet

    def use() -> bool:  # the supervisor flags idle connections; their next checkout pings
        for _ in range(4):
            with reg.get("readers").conn() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
        return pool.stats()["closed_by_reason"].get("role_change", 0) >= len(before)

    assert wait_until(use)
    after = {e.backend_pid for e in pool._bag.entries.values()}
    assert not (before & after)  # every connection opened before the promotion is gone
    assert pool.stats()["role_changes"] >= 1
