"""Tests of the real-server test harness itself (pgregistry.testing)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest
from pgregistry.testing import docker as docker_mod
from pgregistry.testing import plugin as plugin_mod
from pgregistry.testing.cluster import LocalCluster, PgServer, _children_of, _proc_stat, free_port
from pgregistry.testing.dns import DnsServer

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def poll(fn: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Call ``fn`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s (last value {value!r})")
        time.sleep(0.005)


def count_rows(server: PgServer, table: str, v: str) -> int:
    """Rows of ``table`` with value ``v``; -1 while the table has not reached ``server``."""
    try:
        rows = server.execute(f"SELECT count(*) FROM {table} WHERE v = %s", (v,))
    except psycopg2.errors.UndefinedTable:
        return -1
    assert rows is not None
    return int(rows[0][0])


def has_one_row(server: PgServer, table: str, v: str) -> bool:
    return count_rows(server, table, v) == 1


# ------------------------------------------------------------------------------------------------
# The session cluster
# ------------------------------------------------------------------------------------------------


def test_cluster_layout(pg_cluster: LocalCluster) -> None:
    assert len(pg_cluster.replicas) == 2
    assert pg_cluster.servers == [pg_cluster.primary, *pg_cluster.replicas]
    hosts = [s.host for s in pg_cluster.servers]
    assert hosts == ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
    assert {s.port for s in pg_cluster.servers} == {pg_cluster.port}
    assert all(s.running and s.pid for s in pg_cluster.servers)
    assert len({s.datadir for s in pg_cluster.servers}) == 3


def test_each_server_reports_its_own_address(pg_cluster: LocalCluster) -> None:
    for server in pg_cluster.servers:
        rows = server.execute("SELECT host(inet_server_addr()), inet_server_port()")
        assert rows == [(server.host, pg_cluster.port)]


def test_replicas_are_in_recovery(pg_cluster: LocalCluster) -> None:
    assert not pg_cluster.primary.is_in_recovery()
    assert all(r.is_in_recovery() for r in pg_cluster.replicas)
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        pg_cluster.replicas[0].execute("CREATE TABLE pgr_never (id int)")


def test_write_on_primary_reaches_both_replicas(
    pg_cluster: LocalCluster, clean_db: PgServer
) -> None:
    token = uuid.uuid4().hex
    clean_db.execute("INSERT INTO pgr_scratch (v) VALUES (%s)", (token,))
    for replica in pg_cluster.replicas:
        poll(partial(has_one_row, replica, "pgr_scratch", token), what=replica.name)
    pg_cluster.wait_replicated(timeout=5)


def test_dsn_connect_and_backend_count(
    pg_primary: PgServer, backend_counter: Callable[..., int]
) -> None:
    params = psycopg2.extensions.parse_dsn(pg_primary.dsn(application_name="x y"))
    assert params == {
        "host": "127.0.0.11",
        "port": str(pg_primary.port),
        "user": "postgres",
        "dbname": "postgres",
        "application_name": "x y",
    }
    app = f"pgr-count-{uuid.uuid4().hex[:8]}"
    assert backend_counter(app) == 0
    conns = [pg_primary.connect(application_name=app) for _ in range(3)]
    try:
        assert all(c.autocommit for c in conns)
        assert backend_counter(app) == 3
        assert pg_primary.backend_count() >= 3
    finally:
        for conn in conns:
            conn.close()
    poll(lambda: backend_counter(app) == 0, what="backends gone")


def test_clean_db_terminates_other_backends(
    pg_primary: PgServer, request: pytest.FixtureRequest
) -> None:
    victim = pg_primary.connect(application_name="pgr-victim")
    pg_primary.execute("CREATE TABLE IF NOT EXISTS pgr_scratch (id serial PRIMARY KEY, v text)")
    pg_primary.execute("INSERT INTO pgr_scratch (v) VALUES ('old')")
    primary = request.getfixturevalue("clean_db")
    assert primary is pg_primary
    assert pg_primary.backend_count("pgr-victim") == 0
    assert pg_primary.execute("SELECT count(*) FROM pgr_scratch") == [(0,)]
    with pytest.raises(psycopg2.OperationalError):
        victim.cursor().execute("SELECT 1")
    victim.close()


def test_pg_server_is_the_local_primary_without_docker(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, pg_cluster: LocalCluster
) -> None:
    def no_container(*args: object, **kwargs: object) -> None:
        raise AssertionError("ContainerServer must not be constructed here")

    monkeypatch.setenv(docker_mod.BACKEND_ENV, "local")
    monkeypatch.setattr(plugin_mod, "ContainerServer", no_container)
    server = request.getfixturevalue("pg_server")
    assert server is pg_cluster.primary


def test_harness_imports_nothing_heavy() -> None:
    code = (
        "import sys, pgregistry.testing.plugin as p\n"
        "p.docker_available()\n"
        "heavy = [m for m in ('docker', 'testcontainers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# ------------------------------------------------------------------------------------------------
# Destructive tests on a cluster of their own
# ------------------------------------------------------------------------------------------------


def test_failover_promotes_a_replica(fresh_cluster: LocalCluster) -> None:
    old = fresh_cluster.primary
    first, second = fresh_cluster.replicas
    old.execute("CREATE TABLE pgr_fo (v text)")
    old.execute("INSERT INTO pgr_fo VALUES ('before')")
    fresh_cluster.wait_replicated()

    started = time.monotonic()
    new = fresh_cluster.failover()
    assert time.monotonic() - started < 5
    assert new is first
    assert fresh_cluster.primary is new
    assert fresh_cluster.replicas == [second]
    assert not old.running
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(old.dsn(connect_timeout=1))

    assert not new.is_in_recovery()
    new.execute("INSERT INTO pgr_fo VALUES ('after')")
    poll(lambda: count_rows(second, "pgr_fo", "after") == 1, timeout=10, what="follows new")
    assert second.is_in_recovery()
    rows = second.execute("SELECT sender_host FROM pg_stat_wal_receiver")
    assert rows == [(new.host,)]
    fresh_cluster.wait_replicated(timeout=5)


def test_freeze_and_thaw(fresh_cluster: LocalCluster) -> None:
    server = fresh_cluster.replicas[1]
    server.freeze()
    try:
        assert server.frozen
        started = time.monotonic()
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(server.dsn(connect_timeout=1))
        assert time.monotonic() - started >= 0.9  # a hang until the timeout, not a refusal
    finally:
        server.thaw()
    assert not server.frozen
    assert server.execute("SELECT 1") == [(1,)]
    server.thaw()  # always safe
    fresh_cluster.primary.thaw()  # even when never frozen


def test_kill_and_restart(fresh_cluster: LocalCluster) -> None:
    primary = fresh_cluster.primary
    conn = primary.connect()
    old_pid = primary.pid
    primary.kill()
    assert not primary.running and primary.pid is None
    with pytest.raises(psycopg2.OperationalError):
        conn.cursor().execute("SELECT 1")
    conn.close()
    primary.start()
    assert primary.pid != old_pid
    primary.execute("CREATE TABLE pgr_k (v text)")
    primary.execute("INSERT INTO pgr_k VALUES ('x')")
    for replica in fresh_cluster.replicas:
        poll(partial(has_one_row, replica, "pgr_k", "x"), timeout=10, what=replica.name)
    primary.restart()
    assert primary.execute("SELECT count(*) FROM pgr_k") == [(1,)]


def test_add_and_remove_replica(fresh_cluster: LocalCluster) -> None:
    replica = fresh_cluster.add_replica()
    assert replica.host == "127.0.0.14"
    assert replica.port == fresh_cluster.port
    assert replica.is_in_recovery()
    fresh_cluster.primary.execute("CREATE TABLE pgr_add (v text)")
    fresh_cluster.primary.execute("INSERT INTO pgr_add VALUES ('x')")
    fresh_cluster.wait_replicated()
    assert count_rows(replica, "pgr_add", "x") == 1
    fresh_cluster.remove_replica(replica)
    assert not replica.running
    assert not replica.datadir.exists()
    assert replica not in fresh_cluster.replicas


# ------------------------------------------------------------------------------------------------
# No orphans
# ------------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time
    from pgregistry.testing.cluster import LocalCluster, base_dir
    cluster = LocalCluster(n_replicas=1).start()
    print(base_dir(), *[s.pid for s in cluster.servers], flush=True)
    if sys.argv[1] == "hang":
        time.sleep(60)
    """
)


def _start_child(how: str) -> tuple[subprocess.Popen[str], Path, dict[int, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, how], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line, "the child did not start its cluster"
    base, pids = Path(line[0]), [int(p) for p in line[1:]]
    processes = {pid: 0 for pid in pids}
    for pid in pids:
        processes.update(_children_of(pid))
    return proc, base, processes


def _alive(pids: dict[int, int]) -> list[int]:
    """The pids still running (zombies waiting for init to reap them count as gone)."""
    return [pid for pid in pids if (stat := _proc_stat(pid)) is not None and stat[0] != "Z"]


def test_killed_runner_leaves_no_server() -> None:
    proc, base, processes = _start_child("hang")
    try:
        assert len(processes) > 2 and _alive(processes)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        poll(lambda: not _alive(processes), timeout=10, what="servers gone after SIGKILL")
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(base, ignore_errors=True)  # atexit could not run


def test_exiting_runner_stops_servers_and_removes_its_dir() -> None:
    proc, base, processes = _start_child("exit")
    assert proc.wait(timeout=30) == 0
    assert not _alive(processes)
    assert not base.exists()


# ------------------------------------------------------------------------------------------------
# DNS
# ------------------------------------------------------------------------------------------------


def addresses(answer: dns.resolver.Answer) -> list[str]:
    return sorted(rr.address for rr in answer)


def ttl(answer: dns.resolver.Answer) -> int:
    assert answer.rrset is not None
    return int(answer.rrset.ttl)


def test_dns_answers_a_and_aaaa(dns_server: DnsServer) -> None:
    assert dns_server.host == "127.0.0.1" and dns_server.port > 0
    dns_server.set_a("db.test", ["127.0.0.11", "127.0.0.12"])
    dns_server.set_aaaa("db.test", ["::1"])
    res = dns.resolver.Resolver(configure=False)
    res.port = dns_server.port  # before nameservers: they take the port when set
    res.nameservers = [dns_server.host]
    res.lifetime = 1.0
    assert res.cache is None
    assert addresses(res.resolve("db.test", "A")) == ["127.0.0.11", "127.0.0.12"]
    assert addresses(res.resolve("DB.Test.", "AAAA")) == ["::1"]
    assert addresses(res.resolve("db.test", "A", tcp=True)) == ["127.0.0.11", "127.0.0.12"]
    assert ttl(res.resolve("db.test", "A")) == 1
    assert dns_server.queries == [("db.test", "A"), ("db.test", "AAAA"), ("db.test", "A"),
                                  ("db.test", "A")]  # fmt: skip
    dns_server.clear_queries()
    assert dns_server.queries == []


def test_dns_changes_are_seen_by_the_next_query(dns_server: DnsServer) -> None:
    res = dns_server.resolver(lifetime=1)
    dns_server.set_a("writer.test", ["127.0.0.11"])
    assert addresses(res.resolve("writer.test", "A")) == ["127.0.0.11"]
    dns_server.set_a("writer.test", ["127.0.0.12"])
    assert addresses(res.resolve("writer.test", "A")) == ["127.0.0.12"]
    dns_server.set_records("writer.test", ["127.0.0.13", "::1"], ttl=5)
    answer = res.resolve("writer.test", "A")
    assert addresses(answer) == ["127.0.0.13"] and ttl(answer) == 5
    assert addresses(res.resolve("writer.test", "AAAA")) == ["::1"]
    dns_server.set_records("writer.test", ["127.0.0.14"])
    with pytest.raises(dns.resolver.NoAnswer):
        res.resolve("writer.test", "AAAA")
    dns_server.remove("Writer.Test.")
    with pytest.raises(dns.resolver.NXDOMAIN):
        res.resolve("writer.test", "A")


def test_dns_unknown_name_and_missing_type(dns_server: DnsServer) -> None:
    res = dns_server.resolver(lifetime=1)
    with pytest.raises(dns.resolver.NXDOMAIN):
        res.resolve("nowhere.test", "A")
    dns_server.set_a("v4only.test", ["127.0.0.11"])
    with pytest.raises(dns.resolver.NoAnswer):
        res.resolve("v4only.test", "AAAA")
    with pytest.raises(ValueError):
        dns_server.set_a("bad.test", ["::1"])


@pytest.mark.parametrize(
    ("mode", "rcode", "error"),
    [
        ("servfail", dns.rcode.SERVFAIL, dns.resolver.NoNameservers),
        ("refused", dns.rcode.REFUSED, dns.resolver.NoNameservers),
        ("nxdomain", dns.rcode.NXDOMAIN, dns.resolver.NXDOMAIN),
    ],
)
def test_dns_failure_modes(
    dns_server: DnsServer, mode: str, rcode: dns.rcode.Rcode, error: type[Exception]
) -> None:
    dns_server.set_a("db.test", ["127.0.0.11"])
    res = dns_server.resolver(lifetime=1)
    dns_server.set_mode(mode)
    assert dns_server.mode == mode
    with pytest.raises(error):
        res.resolve("db.test", "A")
    query = dns.message.make_query("db.test", "A")
    reply = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=1)
    assert reply.rcode() == rcode
    dns_server.mode = "normal"
    assert addresses(res.resolve("db.test", "A")) == ["127.0.0.11"]


def test_dns_silent_mode_times_out(dns_server: DnsServer) -> None:
    dns_server.set_a("db.test", ["127.0.0.11"])
    dns_server.set_mode("silent")
    res = dns_server.resolver(lifetime=0.3)
    started = time.monotonic()
    with pytest.raises(dns.exception.Timeout):
        res.resolve("db.test", "A")
    assert time.monotonic() - started < 1.0
    assert ("db.test", "A") in dns_server.queries
    with pytest.raises(ValueError):
        dns_server.set_mode("flaky")


def test_dns_per_name_mode(dns_server: DnsServer) -> None:
    dns_server.set_a("good.test", ["127.0.0.11"])
    dns_server.set_a("bad.test", ["127.0.0.12"])
    dns_server.set_mode("servfail", name="BAD.test")
    res = dns_server.resolver(lifetime=1)
    assert addresses(res.resolve("good.test", "A")) == ["127.0.0.11"]
    with pytest.raises(dns.resolver.NoNameservers):
        res.resolve("bad.test", "A")
    dns_server.clear_mode("bad.test")
    assert addresses(res.resolve("bad.test", "A")) == ["127.0.0.12"]


def test_dns_server_context_manager_and_stop() -> None:
    with DnsServer() as server:
        server.set_a("x.test", ["127.0.0.11"])
        assert addresses(server.resolver().resolve("x.test", "A")) == ["127.0.0.11"]
        assert server.running
    assert not server.running


# ------------------------------------------------------------------------------------------------
# Docker detection
# ------------------------------------------------------------------------------------------------


def test_docker_not_available_here_and_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(docker_mod.BACKEND_ENV, raising=False)
    started = time.monotonic()
    result = docker_mod.docker_available()
    assert time.monotonic() - started < 0.05
    if not os.environ.get("DOCKER_HOST") and not os.path.exists(docker_mod.DEFAULT_SOCKET):
        assert result is False


def test_docker_available_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(docker_mod.BACKEND_ENV, "local")
    assert docker_mod.docker_available() is False
    monkeypatch.setenv(docker_mod.BACKEND_ENV, "docker")
    assert docker_mod.docker_available() is True
    monkeypatch.delenv(docker_mod.BACKEND_ENV)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/missing.sock")
    assert docker_mod.docker_available() is False
    monkeypatch.setenv("DOCKER_HOST", str(tmp_path / "missing.sock"))
    assert docker_mod.docker_available() is False
    port = free_port(["127.0.0.1"])  # nothing listens there
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{port}")
    started = time.monotonic()
    assert docker_mod.docker_available() is False
    assert time.monotonic() - started < 0.1
