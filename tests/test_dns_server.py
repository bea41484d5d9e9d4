"""The test DNS server's Aurora-like answers: CNAME chains, rotation, DNS lag, per-type modes."""

from __future__ import annotations

import collections
import random

import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest
from pgregistry.pools import FakeClock
from pgregistry.testing.dns import DnsServer

INSTANCES = {"i1": "127.0.0.11", "i2": "127.0.0.12", "i3": "127.0.0.13"}
WRITER = "db.cluster-c1.test"
READER = "db.cluster-ro-c1.test"


def aurora_like(server: DnsServer) -> None:
    for iid, ip in INSTANCES.items():
        server.set_a(f"{iid}.c1.test", [ip], ttl=5)
    server.set_cname(WRITER, "i1.c1.test", ttl=5)
    server.set_rotating(READER, ["i2.c1.test", "i3.c1.test"], ttl=1)


def test_cname_then_target_in_one_reply_with_their_own_ttls() -> None:
    with DnsServer() as server:
        aurora_like(server)
        server.set_cname("short.test", READER, ttl=3)  # a chain of two CNAMEs
        res = server.resolver()
        ans = res.resolve(WRITER, "A")
        assert [rr.address for rr in ans] == ["127.0.0.11"]
        assert ans.canonical_name.to_text() == "i1.c1.test."
        assert ans.rrset is not None and ans.rrset.ttl == 5
        raw = dns.query.udp(dns.message.make_query(READER, "A"), server.host,
                            port=server.port, timeout=1)
        kinds = [(rrset.rdtype.name, rrset.ttl) for rrset in raw.answer]
        assert kinds == [("CNAME", 1), ("A", 5)]
        chained = res.resolve("short.test", "A")
        result = chained.response.resolve_chaining()
        assert result.minimum_ttl == 1 and str(result.canonical_name) in (
            "i2.c1.test.", "i3.c1.test.")
        assert server.query_log[-1].chain[0] == READER
        with pytest.raises(dns.resolver.NoAnswer):  # the chain ends in an A-only name
            res.resolve(WRITER, "AAAA")
        assert server.records(WRITER) == ["127.0.0.11"]
        assert sorted(server.records(READER)) == ["127.0.0.12", "127.0.0.13"]
        assert server.targets(WRITER) == ["i1.c1.test"]
        server.set_cname("dangling.test", "nowhere.c1.test")
        with pytest.raises(dns.resolver.NXDOMAIN):
            res.resolve("dangling.test", "A")
        server.set_cname("loop1.test", "loop2.test")
        server.set_cname("loop2.test", "loop1.test")
        with pytest.raises(dns.resolver.NoNameservers):
            res.resolve("loop1.test", "A")


def test_rotation_picks_one_target_per_query_reproducibly() -> None:
    picks: list[list[str]] = []
    for _ in range(2):
        with DnsServer(seed=7) as server:
            server.set_rotating("ro.test", ["127.0.0.12", "127.0.0.13", "127.0.0.14"], ttl=1)
            res = server.resolver()
            picks.append([rr.address for _ in range(60) for rr in res.resolve("ro.test", "A")])
    assert picks[0] == picks[1]  # seeded
    counts = collections.Counter(picks[0])
    assert len(picks[0]) == 60 and set(counts) == {"127.0.0.12", "127.0.0.13", "127.0.0.14"}
    assert all(10 <= n <= 30 for n in counts.values()), counts
    with DnsServer(rng=random.Random(1)) as server:
        server.set_rotating("multi.test", ["127.0.0.12", "127.0.0.13", "127.0.0.14"],
                            per_query=2)
        res = server.resolver()
        for _ in range(5):
            got = [rr.address for rr in res.resolve("multi.test", "A")]
            assert len(set(got)) == 2
        assert [q.addresses for q in server.query_log][-1] == tuple(got)


def test_rotation_and_cname_input_checks() -> None:
    server = DnsServer()
    with pytest.raises(ValueError):
        server.set_rotating("x.test", [])
    with pytest.raises(ValueError):
        server.set_rotating("x.test", ["a.test", "127.0.0.1"])
    with pytest.raises(ValueError):
        server.set_rotating("x.test", ["a.test", "b.test"], per_query=2)
    with pytest.raises(ValueError):
        server.set_rotating("x.test", ["127.0.0.1"], per_query=2)
    with pytest.raises(TypeError):
        server.set_rotating("x.test", "a.test")
    with pytest.raises(ValueError):
        server.set_cname("x.test", "127.0.0.1")
    with pytest.raises(ValueError):
        server.set_a("x.test", ["127.0.0.1"], ttl=-1)
    with pytest.raises(ValueError):
        server.delay_updates("x.test", -1)
    with pytest.raises(ValueError):
        server.set_mode("servfail", qtype="AAAA")


def test_setting_one_kind_replaces_the_other() -> None:
    with DnsServer() as server:
        server.set_a("n.test", ["127.0.0.11"])
        server.set_cname("n.test", "m.test")
        server.set_a("m.test", ["127.0.0.12"])
        res = server.resolver()
        assert [rr.address for rr in res.resolve("n.test", "A")] == ["127.0.0.12"]
        server.set_aaaa("n.test", ["::1"])  # back to an address name
        with pytest.raises(dns.resolver.NoAnswer):
            res.resolve("n.test", "A")
        assert server.targets("n.test") == [] and server.records("n.test") == ["::1"]


def test_delayed_updates_follow_the_servers_clock() -> None:
    clock = FakeClock()
    with DnsServer(clock=clock) as server:
        aurora_like(server)
        res = server.resolver()
        server.delay_updates(WRITER, 30)
        server.set_cname(WRITER, "i2.c1.test", ttl=5)  # a failover, seen 30 s late
        due = clock.monotonic() + 30
        assert server.pending(WRITER) == [(due, WRITER, "CNAME i2.c1.test ttl 5")]
        assert [rr.address for rr in res.resolve(WRITER, "A")] == ["127.0.0.11"]
        clock.advance(29.9)
        assert [rr.address for rr in res.resolve(WRITER, "A")] == ["127.0.0.11"]
        clock.advance(5)  # a second change may not overtake the first
        server.set_cname(WRITER, "i3.c1.test", ttl=5)
        assert [rr.address for rr in res.resolve(WRITER, "A")] == ["127.0.0.12"]
        assert len(server.pending()) == 1
        assert server.apply_pending(WRITER) == 1
        assert [rr.address for rr in res.resolve(WRITER, "A")] == ["127.0.0.13"]
        server.delay_updates(WRITER, 0)
        server.set_cname(WRITER, "i1.c1.test")
        assert [rr.address for rr in res.resolve(WRITER, "A")] == ["127.0.0.11"]
        # other names are not delayed
        server.set_a("i1.c1.test", ["127.0.0.21"])
        assert [rr.address for rr in res.resolve(WRITER, "A")] == ["127.0.0.21"]


def test_delayed_removal() -> None:
    clock = FakeClock()
    with DnsServer(clock=clock) as server:
        server.set_a("gone.test", ["127.0.0.11"])
        server.delay_updates("gone.test", 2)
        server.remove("gone.test")
        res = server.resolver()
        assert [rr.address for rr in res.resolve("gone.test", "A")] == ["127.0.0.11"]
        clock.advance(2)
        with pytest.raises(dns.resolver.NXDOMAIN):
            res.resolve("gone.test", "A")


def test_per_type_mode_and_modes_along_a_chain() -> None:
    with DnsServer() as server:
        aurora_like(server)
        res = server.resolver(lifetime=0.3)
        server.set_a("dual.test", ["127.0.0.11"])
        server.set_aaaa("dual.test", ["::1"])
        server.set_mode("servfail", name="dual.test", qtype="aaaa")
        assert [rr.address for rr in res.resolve("dual.test", "A")] == ["127.0.0.11"]
        with pytest.raises(dns.resolver.NoNameservers):
            res.resolve("dual.test", "AAAA")
        server.set_mode("silent", name="dual.test", qtype="AAAA")
        with pytest.raises(dns.exception.Timeout):
            res.resolve("dual.test", "AAAA")
        assert server.query_log[-1].rcode == "DROPPED"
        server.clear_mode("dual.test", qtype="AAAA")
        assert [rr.address for rr in res.resolve("dual.test", "AAAA")] == ["::1"]
        server.set_mode("servfail", name="i1.c1.test")  # the writer's instance endpoint
        with pytest.raises(dns.resolver.NoNameservers):
            res.resolve(WRITER, "A")
        assert server.query_log[-1].rcode == "SERVFAIL"
        server.clear_mode()
        assert [rr.address for rr in res.resolve(WRITER, "A")] == ["127.0.0.11"]
        q = server.query_log[-1]
        assert (q.name, q.qtype, q.chain, q.addresses, q.rcode) == (
            WRITER, "A", ("i1.c1.test",), ("127.0.0.11",), "NOERROR")
