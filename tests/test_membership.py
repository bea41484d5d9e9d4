"""Membership of names whose answers rotate (Aurora's reader endpoint: a CNAME, TTL 1 s, to ONE
reader's instance endpoint picked at random per query): the pool's members are the union of
what the answers named over a window; a rotation never closes a connection by itself.

The book's rules are tested alone; the rest against the loopback DNS server and real servers.
The 15-instance discovery runs on the fake clock (no servers needed: nothing connects)."""

from __future__ import annotations

import logging
import statistics
import threading
import time

import pytest
from helpers import hold, run_load_for, wait_until
from pgregistry.pools import ConnectionPool, FakeClock, Supervisor
from pgregistry.pools.addresses import DEFAULT_MEMBERSHIP_WINDOW_S, AddressBook, Member
from pgregistry.testing.cluster import LocalCluster
from pgregistry.testing.dns import DnsServer

log = logging.getLogger(__name__)

READER = "db.cluster-ro-c1.test"
PORT = "5432"


def dns_stats(pool):
    """``stats()["dns"]`` of the pool, with members and sightings."""
    return pool.stats()["dns"]


def active(book: AddressBook) -> set[str]:
    return set(book.labels())


# -- the book's rules --------------------------------------------------------------------------


def test_observe_keeps_every_address_seen_within_the_window():
    book = AddressBook()
    seen = {"127.0.0.12": 100.0}
    book.observe("r.test", PORT, ["127.0.0.12"], seen, 100.0, 30.0)
    seen["127.0.0.13"] = 101.0
    added, removed = book.observe("r.test", PORT, ["127.0.0.13"], seen, 101.0, 30.0)
    assert added == ["127.0.0.13:5432"] and removed == []
    assert active(book) == {"127.0.0.12:5432", "127.0.0.13:5432"}
    # .12 unseen for 29.9 s: still a member; for 30 s: it leaves
    assert book.observe("r.test", PORT, ["127.0.0.13"], seen, 129.9, 30.0)[1] == []
    assert book.observe("r.test", PORT, ["127.0.0.13"], seen, 130.0, 30.0)[1] == [
        "127.0.0.12:5432"]
    # window 0: each answer exactly
    seen["127.0.0.12"] = 131.0
    book.observe("r.test", PORT, ["127.0.0.12"], seen, 131.0, 0.0)
    assert active(book) == {"127.0.0.12:5432"}


def test_an_address_that_fails_after_its_last_sighting_leaves_at_once():
    book = AddressBook()
    seen = {"127.0.0.12": 100.0, "127.0.0.13": 100.0}
    book.observe("r.test", PORT, ["127.0.0.12", "127.0.0.13"], seen, 100.0, 300.0)
    gone = book.get("127.0.0.13:5432")
    assert gone is not None
    book.reserve(gone)
    book.failed(gone, 101.0, "refused", "connection refused", ban=True)
    # still named by the latest answer: it stays (banned: tried last)
    assert book.observe("r.test", PORT, ["127.0.0.12", "127.0.0.13"], seen, 101.5, 300.0)[1] == []
    seen["127.0.0.13"] = 101.5  # named once more, then failing again and no longer named
    book.reserve(gone)
    book.failed(gone, 103.0, "refused", "connection refused", ban=True)
    _, removed = book.observe("r.test", PORT, ["127.0.0.12"], seen, 103.5, 300.0)
    assert removed == ["127.0.0.13:5432"]
    # named again later: back as a member
    seen["127.0.0.13"] = 110.0
    added, _ = book.observe("r.test", PORT, ["127.0.0.13"], seen, 110.0, 300.0)
    assert added == ["127.0.0.13:5432"]


def test_sources_add_up_and_each_withdraws_only_its_own():
    book = AddressBook()
    book.sync("r.test", PORT, ["127.0.0.12"])
    added, _ = book.set_members("topology", [Member("i2.c1.test", "127.0.0.12", PORT),
                                             Member("i3.c1.test", "127.0.0.13", PORT)])
    assert added == ["127.0.0.13:5432"]
    assert book.get("127.0.0.12:5432").host == "r.test"  # the name it was first reached under
    assert book.sync("r.test", PORT, [])[1] == []  # the topology still lists it
    assert book.get("127.0.0.12:5432").host == "i2.c1.test"  # reached under that name now
    book.sync("r.test", PORT, ["127.0.0.12"])
    assert book.set_members("topology", [])[1] == ["127.0.0.13:5432"]  # .12: DNS still has it
    assert active(book) == {"127.0.0.12:5432"}
    assert book.sources() == {"dns:r.test:5432": ["127.0.0.12:5432"]}


def test_the_default_window_is_sized_for_15_instances_at_1_s():
    # a member of a 15-instance endpoint, sampled once a second, missed by a whole window
    p_window = (14 / 15) ** DEFAULT_MEMBERSHIP_WINDOW_S
    drops_per_hour = 3600 * p_window  # ~3600 window starts an hour (see addresses.py)
    assert p_window < 1.1e-9 and drops_per_hour < 1e-5


# -- a pool on a rotating name (fake clock, stepped supervisor) ---------------------------------


@pytest.fixture
def rotating_pool(make_pool, dns_server, pg_cluster):
    def make(targets, ttl=1, **kw):
        dns_server.set_rotating(READER, targets, ttl=ttl)
        kw.setdefault("dns", {"nameservers": ["127.0.0.1"], "port": dns_server.port,
                              "lifetime": 1.0, "timeout": 0.5})
        return make_pool(dsn=f"host={READER} port={pg_cluster.port} user=postgres"
                             " dbname=postgres", **kw)

    return make


def test_rotation_never_closes_a_connection_and_the_pool_spreads(
    pg_cluster, rotating_pool, stepped
):
    r1, r2 = pg_cluster.replicas
    pool = rotating_pool([r1.host, r2.host], minconn=4, maxconn=4)
    stepped.run_until_idle()
    for _ in range(30):  # 30 s of rotation, sampled at the TTL
        stepped.clock.advance(0.8)
        stepped.run_until_idle()
    stats = pool.stats()
    assert stats["closed_by_reason"].get("dns_change", 0) == 0
    assert [r1.backend_count(pool.app), r2.backend_count(pool.app)] == [2, 2]
    dns = dns_stats(pool)[READER]
    assert dns["queries"] >= 30 and dns["answer_changes"] >= 5
    assert sorted(dns["seen"]) == sorted([r1.host, r2.host])


def test_a_failing_member_that_rotated_out_leaves(pg_cluster, rotating_pool, stepped,
                                                  dns_server):
    r1 = pg_cluster.replicas[0]
    dead = "127.0.0.29"  # nothing listens: refused
    dead_label = f"{dead}:{pg_cluster.port}"
    pool = rotating_pool([r1.host, dead], minconn=2, maxconn=3)
    for _ in range(60):  # until both were named and the pool is warm (on r1)
        stepped.run_until_idle()
        seen = dns_stats(pool)[READER]["seen"]
        if dead in seen and r1.host in seen and pool.stats()["size"] == 2:
            break
        stepped.clock.advance(0.8)
    assert r1.backend_count(pool.app) == 2
    if not pool.stats()["addresses"].get(dead_label, {}).get("active"):
        dns_server.set_rotating(READER, [dead], ttl=1)  # named once more, not tried since
        stepped.clock.advance(0.8)
        stepped.run_until_idle()
    assert pool.stats()["addresses"][dead_label]["active"]  # a member: DNS named it
    dns_server.set_rotating(READER, [r1.host], ttl=1)  # no longer named (still in the window)
    for _ in range(3):
        stepped.clock.advance(0.8)
        stepped.run_until_idle()
    stepped.clock.advance(120)  # past any ban: the next connect tries it first (least loaded)
    stepped.run_until_idle()
    held = [pool.getconn() for _ in range(3)]  # the third opens: refused there, r1 takes it
    assert pool.stats()["addresses"].get(dead_label, {}).get("active") is not True
    assert r1.backend_count(pool.app) == 3
    assert pool.stats()["closed_by_reason"].get("dns_change", 0) == 0
    for c in held:
        pool.putconn(c)


def test_the_membership_window_ends_a_departed_member(pg_cluster, rotating_pool, stepped,
                                                       dns_server):
    r1, r2 = pg_cluster.replicas
    pool = rotating_pool([r1.host, r2.host], minconn=2, maxconn=2)
    pool.retune(dns_membership_window=20.0)
    for _ in range(10):
        stepped.clock.advance(0.8)
        stepped.run_until_idle()
    assert [r1.backend_count(pool.app), r2.backend_count(pool.app)] == [1, 1]
    dns_server.set_rotating(READER, [r1.host], ttl=1)  # r2 left the endpoint (still up)
    for _ in range(20):  # 16 s: inside the window, nothing moves
        stepped.clock.advance(0.8)
        stepped.run_until_idle()
    assert pool.stats()["closed_by_reason"].get("dns_change", 0) == 0
    for _ in range(10):
        stepped.clock.advance(0.8)
        stepped.run_until_idle()
    assert pool.stats()["closed_by_reason"].get("dns_change", 0) == 1
    assert wait_until(lambda: r2.backend_count(pool.app) == 0)
    assert r1.backend_count(pool.app) == 2


def test_members_from_another_source_add_to_dns_and_leave_when_withdrawn(
    pg_cluster, rotating_pool, stepped
):
    r1, r2 = pg_cluster.replicas
    pool = rotating_pool([r1.host], minconn=4, maxconn=4)
    stepped.run_until_idle()
    assert r1.backend_count(pool.app) == 4
    connector = pool._connector
    added, _ = connector.set_members("static", {"replica2.test": r2.host})
    assert added == [f"{r2.host}:{pg_cluster.port}"]
    for _ in range(5):
        stepped.clock.advance(1.0)
        stepped.run_until_idle()
    assert [r1.backend_count(pool.app), r2.backend_count(pool.app)] == [2, 2]
    assert pool.stats()["addresses"][added[0]]["host"] == "replica2.test"
    _, removed = connector.set_members("static", {})
    assert removed == added
    stepped.run_until_idle()
    assert wait_until(lambda: r2.backend_count(pool.app) == 0)
    assert pool.stats()["closed_by_reason"].get("dns_change", 0) == 2
    with pytest.raises(ValueError, match="dns:"):
        connector.set_members("dns:x:1", {})


# -- discovery of all members by DNS alone (fake clock) -----------------------------------------


def discovery_times(dns_server, make_pool, n, runs, ttl=1):
    """Seconds (fake clock) from a pool's first answer until every one of ``n`` instances
    behind a rotating single-answer name is a member, over ``runs`` seeds."""
    ips = [f"127.0.1.{i}" for i in range(1, n + 1)]
    times = []
    for seed in range(runs):
        dns_server.reseed(seed)
        dns_server.set_rotating(READER, ips, ttl=ttl)
        sup = Supervisor(clock=FakeClock(), start=False)
        pool = make_pool(supervisor=sup, minconn=0, maxconn=n,
                         dsn=f"host={READER} port=5432 user=postgres dbname=postgres",
                         dns={"nameservers": ["127.0.0.1"], "port": dns_server.port,
                              "lifetime": 1.0, "timeout": 0.5, "families": ["ipv4"]})
        start = sup.clock.monotonic()
        pool._connector.sync()  # the first answer (a pool resolves at its first connect)
        sup.request(pool._task)
        sup.run_until_idle()
        while len(pool._connector.book.labels()) < n:
            due = pool._connector.refresh_due()  # the supervisor samples the name at its TTL
            assert due is not None and due < float("inf")
            sup.clock.set(max(due, sup.clock.monotonic()))
            sup.run_until_idle()
            assert sup.clock.monotonic() - start < 250, "not all found within the window"
        times.append(sup.clock.monotonic() - start)
        pool.close()
    return times


@pytest.mark.parametrize("n", [3, 15])
def test_discovery_of_all_members_by_dns_alone(dns_server, make_pool, n):
    runs = 60 if n == 15 else 200
    times = sorted(discovery_times(dns_server, make_pool, n, runs))
    mean = statistics.fmean(times)
    p95 = times[int(0.95 * len(times)) - 1]
    # coupon collector: n * H(n) samples to see all n, the first at t=0; one every 0.8 s
    # (the supervisor refreshes at 0.8 of the 1 s TTL)
    expected = (n * sum(1 / k for k in range(1, n + 1)) - 1) * 0.8
    log.warning("discovery of %d instances: mean %.1f s (theory %.1f s), median %.1f s, "
                "p95 %.1f s, max %.1f s over %d runs",
                n, mean, expected, statistics.median(times), p95, times[-1], runs)
    assert 0.75 * expected < mean < 1.25 * expected
    assert times[-1] < DEFAULT_MEMBERSHIP_WINDOW_S  # all found before any could expire


# -- what the issue must show (1): a reader pool of 6, rotating over 3 readers, real time -------


@pytest.fixture
def three_readers():
    cluster = LocalCluster(n_replicas=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_rotation_without_topology_a_reader_pool_of_6_over_3_readers(three_readers, make_pool):
    """A reader pool of 6 on a rotating single-answer CNAME over 3 readers, 25 s of checkouts:
    every reader has connections, the spread within one of even, at most 2 connections closed
    for DNS reasons, at most 14 opened."""
    cluster = three_readers
    readers = cluster.replicas
    with DnsServer(seed=12) as dns:
        for i, r in enumerate(readers, 1):
            dns.set_a(f"r{i}.c1.test", [r.host], ttl=5)
        dns.set_rotating(READER, [f"r{i}.c1.test" for i in range(1, 4)], ttl=1)
        started = time.monotonic()
        pool = make_pool(supervisor=None, minconn=6, maxconn=6, timeout=5,
                         dsn=f"host={READER} port={cluster.port} user=postgres dbname=postgres",
                         dns={"nameservers": ["127.0.0.1"], "port": dns.port,
                              "lifetime": 1.0, "timeout": 0.5})
        stop = threading.Event()
        errors: list[BaseException] = []
        found_all: list[float] = []

        def work() -> None:
            while not stop.is_set():
                try:
                    with pool.conn() as conn, conn.cursor() as cur:
                        cur.execute("SELECT 1")
                        hold(0.005)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

        def watch() -> None:
            while not stop.is_set() and not found_all:
                if len(dns_stats(pool).get(READER, {}).get("members", [])) == 3:
                    found_all.append(time.monotonic() - started)
                threading.Event().wait(0.05)

        threads = [threading.Thread(target=work) for _ in range(4)]
        threads.append(threading.Thread(target=watch))
        for t in threads:
            t.start()
        try:
            run_load_for(25.0)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert not errors, errors[:3]

        def spread() -> list[int]:
            return [r.backend_count(pool.app) for r in readers]

        assert wait_until(lambda: max(spread()) - min(spread()) <= 1 and min(spread()) >= 1,
                          timeout=5), spread()
        stats = pool.stats()
        closed_dns = stats["closed_by_reason"].get("dns_change", 0)
        opened = stats["connections_opened"]
        log.warning("rotation over 3 readers, pool of 6, 25 s: spread %s, opened %d, closed "
                    "for DNS %d, closed to rebalance %d, all 3 members found after %.1f s, "
                    "%d checkouts, %d DNS queries", spread(), opened, closed_dns,
                    stats["closed_by_reason"].get("rebalance", 0),
                    found_all[0] if found_all else -1, stats["checkouts"],
                    dns_stats(pool)[READER]["queries"])
        assert sorted(spread()) == [2, 2, 2]
        assert closed_dns <= 2
        assert opened <= 14
        assert found_all and found_all[0] < 25


# -- the pool key ------------------------------------------------------------------------------


def test_dns_membership_window_from_yaml_and_live_on_reload(tmp_path, dns_server, pg_cluster):
    from pgregistry import ConfigError, Registry

    path = tmp_path / "pools.yaml"

    def write(window: object) -> None:
        path.write_text(
            "version: 1\n"
            f"dns: {{nameservers: [127.0.0.1], port: {dns_server.port}}}\n"
            "pools:\n"
            "  readers:\n"
            f"    dsn: host={READER} port={pg_cluster.port} user=postgres dbname=postgres\n"
            "    minconn: 0\n"
            f"    dns_membership_window: {window}\n")

    write(45)
    sup = Supervisor(clock=FakeClock(), start=False)
    with Registry.from_yaml(path, supervisor=sup, install_sighup=False) as reg:
        pool = reg.get("readers").pool
        assert pool.dns_membership_window == 45
        write(0)
        reg.reload()
        assert pool.dns_membership_window == 0  # the same pool, retuned in place
        write(-1)
        with pytest.raises(ConfigError, match="dns_membership_window"):
            reg.reload()
    with pytest.raises(ValueError, match="dns_membership_window"):
        ConnectionPool(minconn=0, dsn="host=x.test", dns_membership_window=-1)
