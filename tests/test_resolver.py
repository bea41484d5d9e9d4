"""Resolution as DNS really answers: CNAME chains (the smallest TTL, the canonical name),
rotating answers remembered as sightings, one address family failing without the other, and
the special name localhost. Against the loopback DNS server; times on a fake clock."""

from __future__ import annotations

import logging
import time

import pytest
from pgregistry.pools import FakeClock
from pgregistry.pools.resolver import (
    HostResolver,
    ResolutionError,
    is_loopback_name,
    second_family_slice,
)
from pgregistry.testing.dns import DnsServer

READER = "db.cluster-ro-c1.test"
WRITER = "db.cluster-c1.test"


def resolver(dns_server: DnsServer, clock: FakeClock, **kw: object) -> HostResolver:
    settings = {"nameservers": ["127.0.0.1"], "port": dns_server.port, "lifetime": 1.0,
                "timeout": 0.5, **kw}
    return HostResolver(settings, clock)


def aurora_like(dns_server: DnsServer) -> None:
    for iid, ip in {"i1": "127.0.0.11", "i2": "127.0.0.12", "i3": "127.0.0.13"}.items():
        dns_server.set_a(f"{iid}.c1.test", [ip], ttl=5)
    dns_server.set_cname(WRITER, "i1.c1.test", ttl=5)
    dns_server.set_rotating(READER, ["i2.c1.test", "i3.c1.test"], ttl=1)


def test_a_chain_expires_at_its_smallest_ttl_and_keeps_its_canonical_name(dns_server):
    aurora_like(dns_server)
    clock = FakeClock()
    r = resolver(dns_server, clock)
    ans = r.answer(READER)  # CNAME ttl 1 -> A ttl 5
    assert ans.ttl == 1 and ans.expires_at == clock.monotonic() + 1
    assert ans.canonical_name in ("i2.c1.test", "i3.c1.test")
    assert ans.seen_as[ans.addresses[0]] == ans.canonical_name
    writer = r.answer(WRITER)
    assert writer.ttl == 5 and writer.canonical_name == "i1.c1.test"
    assert writer.addresses == ("127.0.0.11",)
    plain = r.answer("i2.c1.test")
    assert plain.canonical_name == "i2.c1.test" and plain.ttl == 5
    stats = writer.stats(clock.monotonic())
    assert stats["canonical_name"] == "i1.c1.test" and stats["ttl_s"] == 5


def test_a_rotating_name_is_remembered_as_sightings(dns_server):
    dns_server.set_rotating(READER, ["127.0.0.12", "127.0.0.13", "127.0.0.14"], ttl=1)
    clock = FakeClock()
    r = resolver(dns_server, clock)
    first = r.answer(READER)
    assert len(first.addresses) == 1
    t0 = clock.monotonic()
    for _ in range(40):
        clock.advance(1)
        ans = r.refresh(READER)
        assert len(ans.addresses) == 1  # each answer names one instance...
    # ...and every instance named is remembered with its last sighting
    assert set(ans.seen) == {"127.0.0.12", "127.0.0.13", "127.0.0.14"}
    assert all(t0 <= at <= clock.monotonic() for at in ans.seen.values())
    assert ans.seen[ans.addresses[0]] == clock.monotonic()
    assert ans.changes >= 10 and ans.queries == 41


@pytest.mark.parametrize("mode", ["servfail", "silent"])
def test_a_failing_aaaa_does_not_discard_the_a_answer(dns_server, mode, caplog):
    caplog.set_level(logging.WARNING, logger="pgregistry.pools.resolver")
    dns_server.set_a("dual.test", ["127.0.0.12"], ttl=1)
    dns_server.set_aaaa("dual.test", ["::1"], ttl=1)
    dns_server.set_mode(mode, name="dual.test", qtype="AAAA")
    clock = FakeClock()
    r = resolver(dns_server, clock, lifetime=2.0, timeout=2.0)
    started = time.monotonic()
    ans = r.answer("dual.test")
    took = time.monotonic() - started
    assert ans.addresses == ("127.0.0.12",)
    # the second family had only its slice of the 2 s lifetime
    assert second_family_slice(2.0) == pytest.approx(0.4)
    assert took < 1.0, took  # not the whole 2 s lifetime
    assert ans.family_failures == {"AAAA": 1}
    assert ans.family_error is not None and ans.family_error.startswith("AAAA: ")
    for _ in range(3):
        clock.advance(1)
        ans = r.refresh("dual.test")
    assert ans.family_failures == {"AAAA": 4} and not ans.stale
    warned = [rec for rec in caplog.records if "AAAA query failed" in rec.getMessage()
              and "dual.test" in rec.getMessage()]
    assert len(warned) == 1  # warned once
    # it answers again; a later failure is warned again
    dns_server.clear_mode("dual.test", qtype="AAAA")
    clock.advance(1)
    assert set(r.refresh("dual.test").addresses) == {"127.0.0.12", "::1"}
    dns_server.set_mode(mode, name="dual.test", qtype="AAAA")
    clock.advance(1)
    r.refresh("dual.test")
    assert len([rec for rec in caplog.records if "AAAA query failed" in rec.getMessage()
              and "dual.test" in rec.getMessage()]) == 2


def test_a_failing_a_does_not_discard_the_aaaa_answer(dns_server):
    dns_server.set_a("dual.test", ["127.0.0.12"], ttl=1)
    dns_server.set_aaaa("dual.test", ["::1"], ttl=1)
    dns_server.set_mode("servfail", name="dual.test", qtype="A")
    ans = resolver(dns_server, FakeClock()).answer("dual.test")
    assert ans.addresses == ("::1",) and ans.family_failures == {"A": 1}


def test_both_families_failing_is_a_clear_error(dns_server):
    dns_server.set_a("dual.test", ["127.0.0.12"], ttl=1)
    dns_server.set_mode("servfail", name="dual.test")
    with pytest.raises(ResolutionError, match="SERVFAIL") as info:
        resolver(dns_server, FakeClock()).answer("dual.test")
    assert f"127.0.0.1:{dns_server.port}" in str(info.value)
    dns_server.set_mode("silent", name="dual.test")
    started = time.monotonic()
    with pytest.raises(ResolutionError, match="no answer within 0.5 s"):
        resolver(dns_server, FakeClock(), lifetime=0.5, timeout=0.5).answer("dual.test")
    assert time.monotonic() - started < 0.5 + 0.5  # the whole lookup within its lifetime


def test_localhost_is_loopback_without_asking_dns(dns_server):
    assert is_loopback_name("localhost") and is_loopback_name("PgBouncer.LocalHost.")
    assert not is_loopback_name("localhost.example") and not is_loopback_name("notlocalhost")
    dns_server.set_mode("nxdomain")  # a DNS server that knows nothing of it
    r = resolver(dns_server, FakeClock())
    for name in ("localhost", "sidecar.localhost"):
        addrs = r.addresses(name)
        assert addrs and set(addrs) <= {"127.0.0.1", "::1"}, addrs
    v4 = resolver(dns_server, FakeClock(), families=["ipv4"])
    assert v4.addresses("pgbouncer.localhost") == ("127.0.0.1",)
    assert dns_server.queries == []


def test_a_localhost_pool_connects_with_a_dns_section(pgbouncer, dns_server, make_pool):
    """A PgBouncer sidecar on localhost, in a registry with `dns: nameservers` whose server
    knows nothing of localhost: psycopg2 alone connects, so the pool does too, without asking
    DNS."""
    dns_server.set_mode("nxdomain")
    pool = make_pool(
        dsn=pgbouncer.dsn(host="localhost"),
        dns={"nameservers": ["127.0.0.1"], "port": dns_server.port},
        minconn=0, maxconn=2,
    )
    with pool.conn() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    assert dns_server.queries == []
    assert "localhost" in pool.stats()["dns"]
