"""Address-aware pools: resolution through a real DNS server on loopback, hostaddr pinning,
placement over real replicas, bans of dead addresses, DNS changes.

Servers: the session cluster (primary 127.0.0.11, replicas .12 and .13, one port) or a fresh
one for tests that change the topology. Counts are taken on the servers themselves."""

from __future__ import annotations

import logging
import random
import socket
import threading
from collections import Counter

import pytest
from helpers import wait_until
from pgregistry.pools import ConnectError, ConnectionPool, PoolError
from pgregistry.pools.resolver import HostResolver, ResolutionError

READERS = "readers.db.test"




def server_addr(conn) -> str:
    with conn.cursor() as cur:
        cur.execute("SELECT host(inet_server_addr())")
        return cur.fetchone()[0]


def spread(servers, app) -> list[int]:
    return [s.backend_count(app) for s in servers]


@pytest.fixture
def dns_pool(make_pool, dns_server):
    """make_pool with the loopback DNS server configured."""

    def make(host: str, port: int, **kw):
        kw.setdefault("dns", {"nameservers": ["127.0.0.1"], "port": dns_server.port,
                              "lifetime": 1.0, "timeout": 0.5})
        return make_pool(dsn=f"host={host} port={port} user=postgres dbname=postgres", **kw)

    return make


def addresses_of(pool) -> Counter:
    return Counter(e.address for e in pool._bag.entries.values())


# -- placement ---------------------------------------------------------------------------------


def test_minconn_6_spreads_3_3_over_two_replicas(pg_cluster, dns_server, dns_pool, stepped):
    r1, r2 = pg_cluster.replicas
    dns_server.set_a(READERS, [r1.host, r2.host], ttl=30)
    pool = dns_pool(READERS, pg_cluster.port, minconn=6, maxconn=10)
    stepped.run_until_idle()
    assert spread([r1, r2], pool.app) == [3, 3]
    stats = pool.stats()["addresses"]
    assert {a: v["connections"] for a, v in stats.items()} == {
        f"{r1.host}:{pg_cluster.port}": 3, f"{r2.host}:{pg_cluster.port}": 3,
    }


def test_12_connections_spread_4_4_4(pg_cluster, dns_server, dns_pool):
    servers = pg_cluster.servers[:3]
    dns_server.set_a("all.db.test", [s.host for s in servers], ttl=30)
    pool = dns_pool("all.db.test", pg_cluster.port, minconn=0, maxconn=12)
    conns = [pool.getconn() for _ in range(12)]
    assert spread(servers, pool.app) == [4, 4, 4]
    assert sorted(Counter(server_addr(c) for c in conns).values()) == [4, 4, 4]
    for c in conns:
        pool.putconn(c)


def test_each_connection_is_pinned_with_hostaddr_and_keeps_the_name(
    pg_cluster, dns_server, dns_pool
):
    r1, r2 = pg_cluster.replicas
    dns_server.set_a(READERS, [r1.host, r2.host], ttl=30)
    pool = dns_pool(READERS, pg_cluster.port, minconn=0, maxconn=4)
    conns = [pool.getconn() for _ in range(4)]
    for c in conns:
        e = pool._bag.entries[id(c)]
        assert c.info.host == READERS  # libpq (TLS, pg_hba) sees the name
        assert c.get_dsn_parameters()["hostaddr"] == server_addr(c)  # pinned to the address...
        assert e.address == f"{server_addr(c)}:{pg_cluster.port}"  # ...the pool recorded
    for c in conns:
        pool.putconn(c)


def test_random_placement_tries_each_ip_in_a_random_order(pg_cluster, dns_server, dns_pool,
                                                          dead_port):
    # psycopg2_pool2's promise: "if a host is a hostname, try each IP in a random order".
    servers = pg_cluster.servers[:3]
    dns_server.set_a("all.db.test", [s.host for s in servers], ttl=30)
    firsts = Counter()
    for seed in range(12):
        pool = dns_pool("all.db.test", pg_cluster.port, minconn=0, maxconn=1,
                        placement="random", rng=random.Random(seed))
        with pool.conn() as c:
            firsts[server_addr(c)] += 1
        pool.close()
    assert set(firsts) == {s.host for s in servers}  # every address comes first sometimes
    # with a dead address in the record, each connect still finds a live one
    dns_server.set_a("mixed.db.test", ["127.0.0.29", servers[0].host], ttl=30)
    pool = dns_pool("mixed.db.test", pg_cluster.port, minconn=0, maxconn=3, placement="random",
                    rng=random.Random(3))
    conns = [pool.getconn() for _ in range(3)]
    assert {server_addr(c) for c in conns} == {servers[0].host}
    for c in conns:
        pool.putconn(c)


def test_target_session_attrs_is_honoured_per_address(pg_cluster, dns_server, dns_pool):
    primary, r1, r2 = pg_cluster.servers[:3]
    dns_server.set_a("all.db.test", [s.host for s in (primary, r1, r2)], ttl=30)
    writer = dns_pool("all.db.test", pg_cluster.port, minconn=0, maxconn=3,
                      target_session_attrs="read-write")
    conns = [writer.getconn() for _ in range(3)]
    assert {server_addr(c) for c in conns} == {primary.host}
    for c in conns:
        writer.putconn(c)
    addrs = writer.stats()["addresses"]
    for replica in (r1, r2):  # answered, with the wrong role: skipped and reported as such
        a = addrs[f"{replica.host}:{pg_cluster.port}"]
        assert a["ban_reason"] == "wrong_role" and "read-only" in a["last_error"]

    readers = dns_pool("all.db.test", pg_cluster.port, minconn=0, maxconn=4,
                       target_session_attrs="standby")
    conns = [readers.getconn() for _ in range(4)]
    assert Counter(server_addr(c) for c in conns) == {r1.host: 2, r2.host: 2}
    for c in conns:
        readers.putconn(c)


def test_prefer_standby_uses_replicas_and_falls_back_to_the_primary(
    pg_cluster, dns_server, dns_pool
):
    primary, r1, r2 = pg_cluster.servers[:3]
    dns_server.set_a("all.db.test", [s.host for s in (primary, r1, r2)], ttl=30)
    pool = dns_pool("all.db.test", pg_cluster.port, minconn=0, maxconn=2,
                    target_session_attrs="prefer-standby")
    conns = [pool.getconn() for _ in range(2)]
    assert {server_addr(c) for c in conns} == {r1.host, r2.host}
    for c in conns:
        pool.putconn(c)
    dns_server.set_a("primary-only.db.test", [primary.host], ttl=30)
    pool2 = dns_pool("primary-only.db.test", pg_cluster.port, minconn=0, maxconn=1,
                     target_session_attrs="prefer-standby")
    with pool2.conn() as c:
        assert server_addr(c) == primary.host


# -- DNS changes -------------------------------------------------------------------------------


def test_a_new_replica_gets_its_share_within_one_ttl_and_one_tick(
    fresh_cluster, dns_server, dns_pool, stepped
):
    r1, r2 = fresh_cluster.replicas
    dns_server.set_a(READERS, [r1.host, r2.host], ttl=1)
    pool = dns_pool(READERS, fresh_cluster.port, minconn=6, maxconn=10)
    stepped.run_until_idle()
    assert spread([r1, r2], pool.app) == [3, 3]

    r3 = fresh_cluster.add_replica()
    failures = []
    stop = threading.Event()

    def use():  # checkouts go on all along; none may fail
        while not stop.is_set():
            try:
                with pool.conn(timeout=5) as c, c.cursor() as cur:
                    cur.execute("SELECT 1")
            except Exception as exc:  # pragma: no cover
                failures.append(exc)

    workers = [threading.Thread(target=use) for _ in range(3)]
    for t in workers:
        t.start()
    try:
        dns_server.set_a(READERS, [r1.host, r2.host, r3.host], ttl=1)
        stepped.clock.advance(1.0)  # one TTL
        stepped.run_until_idle()  # one supervisor tick: refresh, then rebalance
    finally:
        stop.set()
        for t in workers:
            t.join(10)
    assert not failures
    by_addr = {a: v["connections"] for a, v in pool.stats()["addresses"].items()}
    st = pool.stats()
    assert sorted(by_addr.values()) == [2, 2, 2], (by_addr, st["closed_by_reason"])
    assert by_addr[f"{r3.host}:{fresh_cluster.port}"] == 2
    assert pool.stats()["closed_by_reason"].get("rebalance", 0) >= 1


def test_a_removed_address_leaves_after_the_membership_window(
    pg_cluster, dns_server, dns_pool, stepped
):
    r1, r2 = pg_cluster.replicas
    dns_server.set_a(READERS, [r1.host, r2.host], ttl=1)
    pool = dns_pool(READERS, pg_cluster.port, minconn=4, maxconn=6, dns_membership_window=10)
    stepped.run_until_idle()
    held = pool.getconn()  # one checked out, wherever it is
    held_addr = server_addr(held)
    gone = r2 if held_addr == r2.host else r1
    keep = r1 if gone is r2 else r2
    dns_server.set_a(READERS, [keep.host], ttl=1)
    stepped.clock.advance(1.0)
    stepped.run_until_idle()
    # DNS no longer names it, but within the window it is still a member (a rotating name
    # looks like this between two sightings): nothing is closed for it
    assert pool.stats()["closed_by_reason"].get("dns_change", 0) == 0
    assert gone.backend_count(pool.app) >= 1
    for _ in range(9):
        stepped.clock.advance(1.0)
        stepped.run_until_idle()
    stepped.clock.advance(0.5)
    stepped.run_until_idle()
    # unseen for the window: idle connections to it are closed; the pool refilled on the other
    assert all(e.address.startswith(keep.host) for e in pool._bag.idle)
    for _ in range(10):
        with pool.conn() as c:
            assert server_addr(c) == keep.host
    assert not held.closed  # a checked-out one is never taken from its user...
    pool.putconn(held)
    if held_addr == gone.host:
        assert held.closed  # ...but closed on return
    assert pool.stats()["closed_by_reason"].get("dns_change", 0) >= 1
    assert wait_until(lambda: gone.backend_count(pool.app) == 0)


def test_with_window_0_a_removed_address_is_not_handed_out_after_the_next_refresh(
    pg_cluster, dns_server, dns_pool, stepped
):
    r1, r2 = pg_cluster.replicas
    dns_server.set_a(READERS, [r1.host, r2.host], ttl=1)
    pool = dns_pool(READERS, pg_cluster.port, minconn=4, maxconn=6)
    pool.retune(dns_membership_window=0)  # follow each answer exactly
    stepped.run_until_idle()
    dns_server.set_a(READERS, [r1.host], ttl=1)
    stepped.clock.advance(1.0)
    stepped.run_until_idle()
    assert all(e.address.startswith(r1.host) for e in pool._bag.idle)
    assert pool.stats()["closed_by_reason"].get("dns_change", 0) >= 1
    assert wait_until(lambda: r2.backend_count(pool.app) == 0)


# -- dead addresses ----------------------------------------------------------------------------


@pytest.fixture
def hanging_listener(pg_cluster):
    """127.0.0.28 on the cluster's port: accepts in the kernel, never answers."""
    s = socket.socket()
    s.bind(("127.0.0.28", pg_cluster.port))
    s.listen(64)
    yield "127.0.0.28"
    s.close()


def test_refused_and_hanging_addresses_are_banned_and_tried_once_per_ban(
    pg_cluster, dns_server, dns_pool, hanging_listener, stepped
):
    healthy = pg_cluster.replicas[0]
    refused = "127.0.0.29"
    dns_server.set_a(READERS, [refused, hanging_listener, healthy.host], ttl=300)
    pool = dns_pool(READERS, pg_cluster.port, minconn=0, maxconn=4, connect_timeout=1,
                    address_ban=10, address_ban_max=60, timeout=10)
    port = pg_cluster.port
    for _ in range(3):  # many checkouts, all served by the healthy address
        conns = [pool.getconn() for _ in range(4)]
        assert {server_addr(c) for c in conns} == {healthy.host}
        for c in conns:
            pool.putconn(c, close=True)  # force new connects each round
    addrs = pool.stats()["addresses"]
    assert addrs[f"{hanging_listener}:{port}"]["connect_failures"] <= 1
    assert addrs[f"{refused}:{port}"]["connect_failures"] <= 1
    for label in (f"{hanging_listener}:{port}", f"{refused}:{port}"):
        if addrs[label]["connect_failures"]:
            assert addrs[label]["banned"] and 9 <= addrs[label]["banned_for_s"] <= 11
    # after the ban, each is tried again at most once more, and banned for longer
    stepped.clock.advance(12)
    for _ in range(2):
        conns = [pool.getconn() for _ in range(4)]
        for c in conns:
            pool.putconn(c, close=True)
    addrs = pool.stats()["addresses"]
    assert addrs[f"{hanging_listener}:{port}"]["connect_failures"] <= 2
    assert addrs[f"{refused}:{port}"]["connect_failures"] <= 2
    assert addrs[f"{healthy.host}:{port}"]["connect_failures"] == 0


def test_when_every_address_is_banned_the_pool_still_tries(pg_cluster, dns_server, dns_pool):
    dns_server.set_a("dead.db.test", ["127.0.0.29", "127.0.0.27"], ttl=300)
    pool = dns_pool("dead.db.test", pg_cluster.port, minconn=0, maxconn=2, name="deadpool")
    with pytest.raises(ConnectError) as first:
        pool.getconn()
    msg = str(first.value)
    assert "deadpool" in msg and "127.0.0.29" in msg and "refused" in msg
    with pytest.raises(ConnectError):
        pool.getconn()  # both banned: tried anyway
    addrs = pool.stats()["addresses"]
    assert all(v["connect_failures"] == 2 for v in addrs.values())


# -- resolution --------------------------------------------------------------------------------


def make_resolver(dns_server, clock, **kw):
    settings = {"nameservers": ["127.0.0.1"], "port": dns_server.port, "lifetime": 0.5,
                "timeout": 0.25, **kw}
    return HostResolver(settings, clock)


def queries_for(dns_server, name):
    return [q for q in dns_server.queries if q[0] == name]


def test_ttl_cache_on_the_clock(dns_server, stepped):
    clock = stepped.clock
    dns_server.set_a("ttl.db.test", ["127.0.0.12"], ttl=10)
    r = make_resolver(dns_server, clock)
    assert r.addresses("ttl.db.test") == ("127.0.0.12",)
    n = len(queries_for(dns_server, "ttl.db.test"))
    assert n == 2  # A and AAAA
    clock.advance(7)
    assert r.addresses("ttl.db.test") == ("127.0.0.12",)
    assert len(queries_for(dns_server, "ttl.db.test")) == n  # served from the cache
    assert r.due_names(clock.monotonic()) == []
    clock.advance(1.5)  # 85% of the TTL: due for a refresh ahead of expiry
    assert r.due_names(clock.monotonic()) == ["ttl.db.test"]
    dns_server.set_a("ttl.db.test", ["127.0.0.13"], ttl=10)
    r.refresh("ttl.db.test")
    assert r.addresses("ttl.db.test") == ("127.0.0.13",)


def test_ttl_bounds(dns_server, stepped):
    dns_server.set_a("short.db.test", ["127.0.0.12"], ttl=0)
    dns_server.set_a("long.db.test", ["127.0.0.12"], ttl=86400)
    r = make_resolver(dns_server, stepped.clock, min_ttl=2, max_ttl=60)
    r.addresses("short.db.test")
    r.addresses("long.db.test")
    assert r.cached("short.db.test").ttl == 2
    assert r.cached("long.db.test").ttl == 60


@pytest.mark.parametrize("mode", ["servfail", "silent", "nxdomain"])
def test_stale_if_error(dns_server, stepped, mode, caplog):
    clock = stepped.clock
    dns_server.set_a("flaky.db.test", ["127.0.0.12"], ttl=5)
    r = make_resolver(dns_server, clock, stale_grace=60)
    r.addresses("flaky.db.test")
    dns_server.set_mode(mode)
    clock.advance(6)  # expired
    ans = r.refresh("flaky.db.test")
    assert ans.stale and ans.addresses == ("127.0.0.12",)
    assert r.addresses("flaky.db.test") == ("127.0.0.12",)  # keeps serving
    assert ans.refresh_failures == 1 and ans.stale_served >= 1
    assert "serving the last answer" in caplog.text
    clock.advance(60)  # past expiry + grace
    with pytest.raises(ResolutionError) as info:
        r.refresh("flaky.db.test")
    said = {"servfail": "SERVFAIL", "silent": "no answer within", "nxdomain": "NXDOMAIN"}[mode]
    assert said in str(info.value) and f"127.0.0.1:{dns_server.port}" in str(info.value)
    # past the grace: connects fail fast with that error, DNS is not asked again before the
    # retry (no connect pays a DNS timeout), and the name stays visible
    dns_server.clear_queries()
    with pytest.raises(ResolutionError, match=said):
        r.addresses("flaky.db.test")
    assert dns_server.queries == []
    assert r.cached("flaky.db.test").addresses == ()
    dns_server.set_mode("normal")
    assert r.due_names(clock.monotonic() + 31) == ["flaky.db.test"]  # the supervisor's retry
    clock.advance(31)
    assert r.addresses("flaky.db.test") == ("127.0.0.12",)


def test_nxdomain_is_a_clear_error_not_a_dnspython_traceback(pg_cluster, dns_server, dns_pool):
    pool = dns_pool("nope.db.test", pg_cluster.port, minconn=0, maxconn=1, name="nx")
    with pytest.raises(ConnectError) as info:
        pool.getconn()
    msg = str(info.value)
    assert "'nx'" in msg and "nope.db.test" in msg and "NXDOMAIN" in msg
    assert f"127.0.0.1:{dns_server.port}" in msg
    cause = info.value.__cause__
    assert isinstance(cause, ResolutionError) and isinstance(cause, PoolError)
    # no dnspython exception chained behind it
    assert cause.__cause__ is None and (cause.__context__ is None or cause.__suppress_context__)


def test_dns_down_at_start_is_a_clear_error(pg_cluster, dns_server, dns_pool):
    dns_server.set_mode("silent")
    pool = dns_pool("any.db.test", pg_cluster.port, minconn=0, maxconn=1,
                    dns={"nameservers": ["127.0.0.1"], "port": dns_server.port,
                         "lifetime": 0.3, "timeout": 0.3})
    with pytest.raises(ConnectError, match="no answer within 0.3 s"):
        pool.getconn()


def test_dns_down_later_the_cache_serves(pg_cluster, dns_server, dns_pool, stepped):
    r1 = pg_cluster.replicas[0]
    dns_server.set_a(READERS, [r1.host], ttl=1)
    pool = dns_pool(READERS, pg_cluster.port, minconn=1, maxconn=3,
                    dns={"nameservers": ["127.0.0.1"], "port": dns_server.port,
                         "lifetime": 0.3, "timeout": 0.3, "stale_grace": 120})
    stepped.run_until_idle()
    dns_server.set_mode("silent")
    for _ in range(3):
        stepped.clock.advance(5)
        stepped.run_until_idle()  # refreshes fail
    conns = [pool.getconn() for _ in range(3)]  # new connects use the cached address
    assert {server_addr(c) for c in conns} == {r1.host}
    for c in conns:
        pool.putconn(c)
    dns = pool.stats()["dns"][READERS]
    assert dns["stale"] and dns["refresh_failures"] >= 2


def test_ip_literals_are_never_resolved(pg_cluster, dns_server, dns_pool):
    pool = dns_pool(pg_cluster.primary.host, pg_cluster.port, minconn=0, maxconn=1)
    with pool.conn() as c:
        assert server_addr(c) == pg_cluster.primary.host
    assert dns_server.queries == []


def test_ipv6_literal_and_aaaa_records(fresh_cluster, dns_server, dns_pool):
    replica = fresh_cluster.replicas[0]
    probe = socket.socket(socket.AF_INET6)
    try:
        probe.bind(("::1", fresh_cluster.port))
    except OSError:
        pytest.skip("the cluster's port is taken on ::1")
    finally:
        probe.close()
    replica.stop()
    replica.extra_listen = ["::1"]
    replica.start()
    # an IPv6 literal: pinned as is, no lookup
    pool = dns_pool("::1", fresh_cluster.port, minconn=0, maxconn=1)
    with pool.conn() as c:
        assert server_addr(c) == "::1"
    assert list(pool.stats()["addresses"]) == [f"[::1]:{fresh_cluster.port}"]
    assert dns_server.queries == []
    # AAAA records join the A records
    dns_server.set_records("v6.db.test", ["::1", fresh_cluster.replicas[1].host], ttl=30)
    pool = dns_pool("v6.db.test", fresh_cluster.port, minconn=0, maxconn=2)
    conns = [pool.getconn() for _ in range(2)]
    assert {server_addr(c) for c in conns} == {"::1", fresh_cluster.replicas[1].host}
    for c in conns:
        pool.putconn(c)
    only4 = dns_pool("v6.db.test", fresh_cluster.port, minconn=0, maxconn=2,
                     dns={"nameservers": ["127.0.0.1"], "port": dns_server.port,
                          "families": ["ipv4"]})
    with only4.conn() as c:
        assert server_addr(c) == fresh_cluster.replicas[1].host
    assert set(only4.stats()["dns"]["v6.db.test"]["addresses"]) == {
        fresh_cluster.replicas[1].host}


def test_multi_host_lists_use_the_union_of_addresses(pg_cluster, dns_server, make_pool):
    primary, r1, r2 = pg_cluster.servers[:3]
    dns_server.set_a("a.db.test", [r1.host], ttl=30)
    dns_server.set_a("b.db.test", [r2.host], ttl=30)
    port = pg_cluster.port
    pool = make_pool(
        dsn=f"host=a.db.test,b.db.test,{primary.host} port={port},{port},{port} user=postgres",
        dns={"nameservers": ["127.0.0.1"], "port": dns_server.port},
        minconn=0, maxconn=3,
    )
    conns = [pool.getconn() for _ in range(3)]
    assert {server_addr(c) for c in conns} == {primary.host, r1.host, r2.host}
    names = {pool._bag.entries[id(c)].address: c.info.host for c in conns}
    assert names[f"{r1.host}:{port}"] == "a.db.test"
    assert names[f"{r2.host}:{port}"] == "b.db.test"
    for c in conns:
        pool.putconn(c)
    with pytest.raises(ValueError, match="2 ports for 3 hosts"):
        ConnectionPool(0, 1, dsn="host=a,b,c port=1,2", supervisor=pool._supervisor)


def test_uri_dsn_host_is_resolved(pg_cluster, dns_server, make_pool):
    dns_server.set_a(READERS, [pg_cluster.replicas[0].host], ttl=30)
    pool = make_pool(
        dsn=f"postgresql://postgres@{READERS}:{pg_cluster.port}/postgres",
        dns={"nameservers": ["127.0.0.1"], "port": dns_server.port}, minconn=0, maxconn=1,
    )
    with pool.conn() as c:
        assert server_addr(c) == pg_cluster.replicas[0].host


def test_address_stats(pg_cluster, dns_server, dns_pool):
    r1 = pg_cluster.replicas[0]
    dns_server.set_a(READERS, [r1.host, "127.0.0.29"], ttl=30)
    pool = dns_pool(READERS, pg_cluster.port, minconn=0, maxconn=3)
    a = pool.getconn()
    b = pool.getconn()
    pool.putconn(b)
    addrs = pool.stats()["addresses"]
    live = addrs[f"{r1.host}:{pg_cluster.port}"]
    assert (live["connections"], live["in_use"], live["idle"], live["connect_failures"]) == (
        2, 1, 1, 0)
    dead = addrs[f"127.0.0.29:{pg_cluster.port}"]
    assert dead["connections"] == 0 and dead["connect_failures"] <= 1
    pool.putconn(a)


def test_system_resolver_handles_localhost_without_dns():
    r = HostResolver()  # the system's configuration; localhost comes from /etc/hosts
    assert "127.0.0.1" in r.addresses("localhost") or "::1" in r.addresses("localhost")


def test_bad_dns_settings_are_clear():
    with pytest.raises(ValueError, match="unknown dns setting"):
        HostResolver({"nameserver": ["127.0.0.1"]})
    with pytest.raises(ValueError, match="must be IP addresses"):
        HostResolver({"nameservers": ["dns.example"]})


def test_no_password_in_connect_errors(pg_cluster, dns_server, dns_pool, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "Sentinel-dns-Pa55"
    dns_server.set_a("dead.db.test", ["127.0.0.29"], ttl=30)
    pool = dns_pool("dead.db.test", pg_cluster.port, minconn=0, maxconn=1, password=secret)
    with pytest.raises(ConnectError) as info:
        pool.getconn()
    for text in (str(info.value), repr(info.value), str(pool.stats()), repr(pool), caplog.text):
        assert secret not in text


def test_a_ban_grows_once_per_period_however_many_fail_at_once(pg_cluster, dns_server, dns_pool,
                                                               stepped):
    dns_server.set_a("dead.db.test", ["127.0.0.29"], ttl=300)
    pool = dns_pool("dead.db.test", pg_cluster.port, minconn=0, maxconn=8, address_ban=1,
                    address_ban_max=60)
    for _ in range(10):  # the only address, banned: tried anyway, ten times in one period
        with pytest.raises(ConnectError):
            pool.getconn()
    a = pool.stats()["addresses"][f"127.0.0.29:{pg_cluster.port}"]
    assert a["connect_failures"] == 10
    assert 0.8 <= a["banned_for_s"] <= 1.2  # still the first ban, not 2**9 s
    stepped.clock.advance(1.5)
    with pytest.raises(ConnectError):
        pool.getconn()
    a = pool.stats()["addresses"][f"127.0.0.29:{pg_cluster.port}"]
    assert 1.7 <= a["banned_for_s"] <= 2.3  # the next period: doubled once
