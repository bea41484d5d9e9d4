"""LISTEN/NOTIFY through a pool's listener: order, callbacks, quoting, reconnects with the gap
reported, and a writer failover on a local cluster (stop, promote, DNS flip)."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import psycopg2
import pytest
import yaml
from helpers import wait_until
from pgregistry.pools import ConnectionPool, PoolClosed
from pgregistry.pools.listener import Gap


def notify(server, channel, payload):
    server.execute("SELECT pg_notify(%s, %s)", (channel, payload))


@pytest.fixture
def listener_of(make_pool):
    made = []

    def make(pool=None, **kw):
        pool = pool or make_pool(minconn=0)
        lst = pool.listener(**kw)
        made.append(lst)
        return lst

    yield make
    for lst in made:
        lst.close()


def test_a_thousand_notifications_arrive_in_order(listener_of, pg_primary):
    lst = listener_of()
    lst.listen("orders")
    sender = pg_primary.connect()
    sender.autocommit = True
    with sender.cursor() as cur:
        for i in range(1000):
            cur.execute("NOTIFY orders, %s", (str(i),))
    sender.close()
    got = []
    for n in lst.notifications(timeout=10):
        got.append(n)
        if len(got) == 1000:
            break
    assert [n.payload for n in got] == [str(i) for i in range(1000)]
    assert all(n.channel == "orders" for n in got)
    st = lst.stats()
    assert st["notifications"] == 1000 and st["channels"] == ["orders"]
    assert st["reconnects"] == 0 and st["connected"]


def test_channel_names_are_identifiers_and_callbacks_run_on_the_iterating_thread(
        listener_of, pg_primary):
    seen: list[tuple[str, str, str]] = []
    lst = listener_of(on_notify=lambda n: seen.append(
        ("all", n.channel, threading.current_thread().name)))
    odd = 'Mixed Case"; DROP TABLE x; --'
    lst.listen(odd, callback=lambda n: seen.append(
        ("odd", n.payload, threading.current_thread().name)))
    lst.listen("plain")
    notify(pg_primary, odd, "p1")
    notify(pg_primary, "plain", "p2")
    notify(pg_primary, "mixed case", "never")  # another channel: not listened
    items = []
    for n in lst.notifications(timeout=5):
        items.append(n)
        if len(items) == 2:
            break
    me = threading.current_thread().name
    assert [(n.channel, n.payload) for n in items] == [(odd, "p1"), ("plain", "p2")]
    assert seen == [("all", odd, me), ("odd", "p1", me), ("all", "plain", me)]
    lst.unlisten(odd)
    notify(pg_primary, odd, "after")
    notify(pg_primary, "plain", "p3")
    assert [n.payload for n in lst.notifications(timeout=0.5)] == ["p3"]


def test_the_iteration_ends_at_its_timeout(listener_of):
    lst = listener_of()
    lst.listen("quiet")
    t0 = time.monotonic()
    assert list(lst.notifications(timeout=0.3)) == []
    assert 0.25 <= time.monotonic() - t0 < 1.5
    assert lst.poll() == []


def test_bad_channel_names_are_refused_clearly(listener_of):
    lst = listener_of()
    with pytest.raises(TypeError):
        lst.listen(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        lst.listen("")
    assert lst.channels == ()


def test_the_listener_is_outside_maxconn_and_in_stats(make_pool, pg_primary):
    pool = make_pool(minconn=0, maxconn=1)
    lst = pool.listener()
    try:
        lst.listen("c")
        with pool.conn(timeout=1):  # the pool's one connection is still there
            pass
        assert pool.stats()["size"] == 1
        rows = pool.stats()["listeners"]
        assert rows == [lst.stats()] and rows[0]["channels"] == ["c"]
        assert pg_primary.backend_count(pool.app) == 2
    finally:
        lst.close()
    assert pool.stats()["listeners"] == []
    assert wait_until(lambda: pg_primary.backend_count(pool.app) == 1, 5)


def test_closing_the_pool_closes_its_listeners(make_pool):
    pool = make_pool(minconn=0)
    lst = pool.listener()
    lst.listen("x")
    pool.close()
    assert lst.closed
    assert list(lst.notifications(timeout=0.1)) == []
    with pytest.raises(PoolClosed):
        lst.listen("y")
    with pytest.raises(PoolClosed):
        pool.listener()


def test_a_killed_connection_comes_back_listening_and_reports_the_gap(listener_of, pg_primary):
    gaps: list[Gap] = []
    lst = listener_of(on_reconnect=gaps.append)
    lst.listen("jobs")
    notify(pg_primary, "jobs", "before")
    assert [n.payload for n in lst.notifications(timeout=2)][:1] == ["before"]
    pg_primary.execute("SELECT pg_terminate_backend(%s)", (lst.backend_pid(),))
    notify(pg_primary, "jobs", "in the gap")  # nobody listens: lost (reported as a gap)
    items = []

    def collect():
        items.extend(lst.notifications(timeout=0.2))
        if items and isinstance(items[0], Gap) and not any(
                getattr(i, "payload", None) == "after" for i in items):
            notify(pg_primary, "jobs", "after")
        return any(getattr(i, "payload", None) == "after" for i in items)

    assert wait_until(collect, 10)
    assert isinstance(items[0], Gap) and items[0].reason == "lost"
    assert items[0].channels == ("jobs",) and items[0].duration_s >= 0
    assert gaps == [items[0]]
    assert lst.stats()["reconnects"] == 1


def test_close_from_another_thread_ends_the_iteration(listener_of):
    lst = listener_of()
    lst.listen("x")
    done = threading.Event()

    def run():
        for _ in lst.notifications():
            pass
        done.set()

    t = threading.Thread(target=run)
    t.start()
    lst.close()
    assert done.wait(3)
    t.join(3)
    with pytest.raises(PoolClosed):
        lst.listen("y")
    lst.close()  # idempotent


def test_a_listener_on_a_standby_says_it_needs_the_primary(pg_cluster, stepped):
    replica = pg_cluster.replicas[0]
    pool = ConnectionPool(minconn=0, dsn=replica.dsn(), supervisor=stepped)
    try:
        with pytest.raises(psycopg2.Error, match="needs the primary"):
            pool.listener().listen("x")
    finally:
        pool.close()


# -- through the registry, across a writer failover ----------------------------------------------


@pytest.fixture
def writer_registry(fresh_cluster, dns_server, tmp_path):
    from pgregistry import Registry

    primary = fresh_cluster.primary
    dns_server.set_a("writer.listen.test", [primary.host], ttl=1)
    config = {
        "version": 1,
        "dns": {"nameservers": ["127.0.0.1"], "port": dns_server.port, "lifetime": 1.0,
                "timeout": 0.5},
        "pools": {
            "writer": {"host": "writer.listen.test", "port": fresh_cluster.port,
                       "user": "postgres", "dbname": "postgres", "role": "writer",
                       "minconn": 1, "maxconn": 4, "connect_timeout": 1, "address_ban": 0.2,
                       "address_ban_max": 1.0, "role_check_interval": 0.2},
        },
    }
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    reg = Registry.from_yaml(path, install_sighup=False)
    yield fresh_cluster, dns_server, reg, path
    reg.close()


def test_a_writer_listener_survives_a_failover_and_reports_the_gap(writer_registry, capsys):
    cluster, dns, reg, _ = writer_registry
    old = cluster.primary
    gaps: list[Gap] = []
    lst = reg.get("writer").listener(on_reconnect=gaps.append)
    lst.listen("events")
    assert lst.address == f"{old.host}:{cluster.port}"

    # 1,000 notifications from another session, all in order
    sender = old.connect()
    sender.autocommit = True
    with sender.cursor() as cur:
        for i in range(1000):
            cur.execute("SELECT pg_notify('events', %s)", (str(i),))
    sender.close()
    got = []
    for n in lst.notifications(timeout=10):
        got.append(n.payload)
        if len(got) == 1000:
            break
    assert got == [str(i) for i in range(1000)]
    assert reg.stats()["writer"]["listeners"][0]["notifications"] == 1000

    # the writer fails over: stopped, a replica promoted, DNS flipped
    t_fail = time.monotonic()
    new = cluster.failover()
    t_promoted = time.monotonic()
    dns.set_a("writer.listen.test", [new.host], ttl=1)
    stop = threading.Event()

    def keep_notifying():  # the application keeps writing on whatever is the writer now
        k = 0
        while not stop.is_set():
            try:
                new.execute("SELECT pg_notify('events', %s)", (f"after-{k}",))
                k += 1
            except psycopg2.Error:
                pass
            stop.wait(0.02)

    t = threading.Thread(target=keep_notifying)
    t.start()
    items: list[object] = []
    first_after = None
    try:
        for item in lst.notifications(timeout=10):
            items.append(item)
            if not isinstance(item, Gap) and item.payload.startswith("after-"):
                first_after = time.monotonic()
                break
    finally:
        stop.set()
        t.join(5)
    assert first_after is not None, f"nothing received after the failover: {items}"
    assert isinstance(items[0], Gap), items[:3]
    gap = items[0]
    assert gap.reason == "lost" and gap.address == f"{new.host}:{cluster.port}"
    assert gaps == [gap]
    assert lst.address == f"{new.host}:{cluster.port}"
    back_s = first_after - t_promoted
    assert back_s <= 3.0, f"receiving again {back_s:.2f} s after the promotion"
    s = reg.stats()["writer"]["listeners"][0]
    assert s["reconnects"] == 1 and s["connected"] and s["channels"] == ["events"]
    with capsys.disabled():
        print(f"\nlistener failover: 1000/1000 in order; gap {gap.duration_s:.2f} s; "
              f"receiving {back_s:.2f} s after the promotion "
              f"({first_after - t_fail:.2f} s after the writer stopped)")


def test_a_reload_that_replaces_the_pool_moves_the_listener(writer_registry):
    cluster, dns, reg, path = writer_registry
    lst = reg.get("writer").listener()
    lst.listen("moves")
    old_pool = reg.get("writer").pool
    config = yaml.safe_load(path.read_text())
    config["pools"]["writer"]["application_name"] = "moved"  # connection identity: a new pool
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert reg.reload().replaced == ("writer",)
    assert reg.get("writer").pool is not old_pool
    items = []

    def moved():
        items.extend(lst.notifications(timeout=0.2))
        return any(isinstance(i, Gap) for i in items)

    assert wait_until(moved, 5)
    assert [i.reason for i in items if isinstance(i, Gap)] == ["moved"]
    cluster.primary.execute("SELECT pg_notify('moves', 'x')")
    assert [n.payload for n in lst.notifications(timeout=2)][:1] == ["x"]
    rows = cluster.primary.execute(
        "SELECT application_name FROM pg_stat_activity WHERE pid = %s", (lst.backend_pid(),))
    assert rows == [("moved",)]
    # removing the name closes its listeners; so does closing the registry
    del config["pools"]["writer"]
    config["pools"]["other"] = {"host": cluster.primary.host, "port": cluster.port,
                                "user": "postgres", "dbname": "postgres", "minconn": 0}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    reg.reload()
    assert lst.closed
    lst2 = reg.get("other").listener()
    reg.close()
    assert lst2.closed


def test_a_writer_listener_follows_the_aurora_topology_not_the_late_dns(aurora_cluster,
                                                                         dns_server, tmp_path,
                                                                         capsys):
    from pgregistry import Registry

    cluster = aurora_cluster  # the cluster endpoint's DNS follows a failover 30 s late
    config = {
        "version": 1,
        "dns": {"nameservers": ["127.0.0.1"], "port": dns_server.port, "lifetime": 1.0,
                "timeout": 0.5},
        "pools": {"writer": {
            "host": cluster.writer_endpoint, "port": cluster.port, "user": "postgres",
            "dbname": "postgres", "role": "writer", "minconn": 1, "maxconn": 4,
            "connect_timeout": 1, "address_ban": 0.2, "address_ban_max": 1.0}},
    }
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with Registry.from_yaml(path, install_sighup=False) as reg:
        old = cluster.primary
        topology = reg.get("writer").pool._connector.topology
        assert wait_until(lambda: topology.snapshot is not None, 10)  # a running app knows it
        lst = reg.get("writer").listener()
        lst.listen("events")
        assert lst.address == f"{old.host}:{cluster.port}"
        new = cluster.failover()
        t_promoted = time.monotonic()
        stop = threading.Event()

        def keep_notifying():
            while not stop.is_set():
                with contextlib.suppress(psycopg2.Error):  # until it accepts connections
                    new.execute("SELECT pg_notify('events', 'after')")
                stop.wait(0.02)

        t = threading.Thread(target=keep_notifying)
        t.start()
        items: list[object] = []
        try:
            for item in lst.notifications(timeout=10):
                items.append(item)
                if not isinstance(item, Gap):
                    break
        finally:
            stop.set()
            t.join(5)
        back_s = time.monotonic() - t_promoted
    assert items and isinstance(items[0], Gap) and not isinstance(items[-1], Gap), items
    assert items[0].address == f"{new.host}:{cluster.port}"
    assert back_s <= 3.0, back_s
    with capsys.disabled():
        print(f"\nlistener, Aurora topology failover (writer DNS 30 s late): receiving "
              f"{back_s:.2f} s after the promotion")


def test_a_forked_child_listens_on_its_own_connection(listener_of, pg_primary):
    lst = listener_of()
    lst.listen("forked")
    parent_pid = lst.backend_pid()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            # the parent's session is detached; the child listens on a connection of its own
            first = next(iter(lst.notifications(timeout=5)), None)
            if isinstance(first, Gap) and first.reason == "fork" \
                    and lst.backend_pid() != parent_pid:
                notify(pg_primary, "forked", "to-child")
                got = [n.payload for n in lst.notifications(timeout=3)
                       if not isinstance(n, Gap)]
                code = 0 if "to-child" in got else 2
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.close(write_end)
    try:
        result = os.read(read_end, 1)
    finally:
        os.close(read_end)
        os.waitpid(child, 0)
    assert result == b"\x00", result
    # the parent's session was never touched by the child
    assert lst.backend_pid() == parent_pid
    notify(pg_primary, "forked", "to-parent")
    assert [n.payload for n in lst.notifications(timeout=2)
            if not isinstance(n, Gap)][:2] == ["to-child", "to-parent"]
