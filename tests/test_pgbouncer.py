"""The pool through PgBouncer in transaction mode, against real servers.

The session's ``pgbouncer`` fronts the session cluster's primary; tests that need a bouncer of
their own settings (a tiny pool, one in front of a replica) start one, which takes ~20 ms (and
~0.4 s to stop: PgBouncer's safe shutdown ticks three times a second).

In transaction mode a client connection is tied to a server connection only for the length of
one transaction: anything a session keeps (``SET``, ``PREPARE``, ``LISTEN``, advisory locks)
stays behind on a server connection that the next transaction may not get, and that another
client may get instead. The tests below pin down what the pool still guarantees and what it
cannot.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext
import pytest
from helpers import wait_until
from pgregistry.pools import ConnectionPool, PoolError, PoolTimeout
from pgregistry.testing import pgbouncer as pgbouncer_mod
from pgregistry.testing.cluster import (
    HarnessError,
    LocalCluster,
    PgServer,
    ServerStartError,
    _proc_stat,
)
from pgregistry.testing.pgbouncer import PgBouncer, find_pgbouncer

MakePool = Callable[..., ConnectionPool]
ROOT = Path(__file__).resolve().parent.parent
SCRATCH = "pgr_bouncer_scratch"




def one(conn: ext.connection, sql: str, params: Any = None) -> Any:
    """The first row of ``sql`` on ``conn`` (a 1-tuple is unpacked)."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def backend_pid(conn: ext.connection) -> int:
    # conn.info.backend_pid is PgBouncer's made-up key, not the server's pid: ask the server.
    return int(one(conn, "SELECT pg_backend_pid()"))


def server_address(conn: ext.connection) -> tuple[str, int]:
    return one(conn, "SELECT host(inet_server_addr()), inet_server_port()")  # type: ignore[no-any-return]


def terminate(server: PgServer, pid: int) -> None:
    """Kill one backend and wait until it is gone (pg_terminate_backend only signals it)."""
    server.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert wait_until(
        lambda: (
            server.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)) == [(0,)]
        )
    ), f"backend {pid} survived pg_terminate_backend"


@pytest.fixture
def scratch(pg_primary: PgServer) -> str:
    """An empty table of this file's own on the primary."""
    pg_primary.execute(f"DROP TABLE IF EXISTS {SCRATCH}")
    pg_primary.execute(f"CREATE TABLE {SCRATCH} (id serial PRIMARY KEY, v text)")
    return SCRATCH


@pytest.fixture
def own_bouncers() -> Iterator[Callable[..., PgBouncer]]:
    """``start(backends, **kw)``: a started PgBouncer of the test's own, stopped afterwards
    (all at once: each safe shutdown takes ~0.35 s)."""
    made: list[PgBouncer] = []

    def start(backends: Any, **kw: Any) -> PgBouncer:
        bouncer = PgBouncer(backends, **kw)
        made.append(bouncer)
        return bouncer.start()

    yield start
    stoppers = [threading.Thread(target=b.stop) for b in made]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join(30)


# -- the harness --------------------------------------------------------------------------------


def test_find_pgbouncer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGREGISTRY_PGBOUNCER", str(tmp_path / "nope"))
    with pytest.raises(HarnessError, match="apt-get install pgbouncer"):
        find_pgbouncer()
    fake = tmp_path / "pgbouncer"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PGREGISTRY_PGBOUNCER", str(fake))
    assert find_pgbouncer() == str(fake)
    monkeypatch.delenv("PGREGISTRY_PGBOUNCER")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_pgbouncer() == str(fake)  # on PATH
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(pgbouncer_mod, "DEFAULT_BINARY", str(fake))
    assert find_pgbouncer() == str(fake)  # the Debian location, off PATH
    monkeypatch.setattr(pgbouncer_mod, "DEFAULT_BINARY", str(tmp_path / "gone"))
    with pytest.raises(HarnessError, match="pgbouncer was not found.*apt-get install pgbouncer"):
        find_pgbouncer()


def test_session_bouncer_fronts_the_primary(pgbouncer: PgBouncer, pg_cluster: LocalCluster) -> None:
    primary = pg_cluster.primary
    assert pgbouncer.running and pgbouncer.backend is primary
    assert (pgbouncer.host, pgbouncer.port) != (primary.host, primary.port)
    assert pgbouncer.execute("SELECT host(inet_server_addr()), inet_server_port()") == [
        (primary.host, primary.port)
    ]
    # "*" forwards any other database name to the same server
    assert pgbouncer.execute("SELECT current_database()", dbname="template1") == [("template1",)]
    assert pgbouncer.admin("SHOW VERSION")[0][0].startswith("PgBouncer")
    pools = {row["database"]: row for row in pgbouncer.show("POOLS")}
    assert pools["postgres"]["pool_mode"] == "transaction"
    assert 1 <= pgbouncer.server_count() <= pgbouncer.default_pool_size
    assert set(pgbouncer.server_pids()) <= {
        int(row[0]) for row in primary.execute("SELECT pid FROM pg_stat_activity") or []
    }
    assert "process up: PgBouncer" in pgbouncer.log_tail(1000)


def test_own_bouncer_runs_as_postgres_and_stops_cleanly(pg_cluster: LocalCluster) -> None:
    started = time.monotonic()
    with PgBouncer(pg_cluster.primary.dsn(), default_pool_size=3) as bouncer:
        assert time.monotonic() - started < 2
        pid = bouncer.pid
        assert pid is not None
        config = (bouncer.config_path or Path()).read_text()
        for line in (
            "pool_mode = transaction",
            "default_pool_size = 3",
            "unix_socket_dir = \n",
            "auth_type = trust",
            "admin_users = postgres",
            f"listen_port = {bouncer.port}",
            "ignore_startup_parameters = extra_float_digits,options",
        ):
            assert line in config
        assert (
            bouncer.databases["*"] == f"host={pg_cluster.primary.host} "
            f"port={pg_cluster.port} user=postgres"
        )
        status = Path(f"/proc/{pid}/status").read_text()
        uid = int(status.split("Uid:")[1].split()[0])
        if os.geteuid() == 0:
            assert uid != 0  # PgBouncer refuses root: it runs as postgres
        assert bouncer.execute("SELECT 1") == [(1,)]
        port = bouncer.port
    assert not bouncer.running
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    with pytest.raises(psycopg2.OperationalError, match="refused"):
        psycopg2.connect(host="127.0.0.1", port=port, user="postgres", connect_timeout=1)


_CHILD = """
import sys, time
from pgregistry.testing.cluster import base_dir
from pgregistry.testing.pgbouncer import PgBouncer
bouncer = PgBouncer(sys.argv[1]).start()
print(base_dir(), bouncer.pid, flush=True)
if sys.argv[2] == "hang":  # else exit: atexit stops the bouncer
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def test_the_runner_leaves_no_bouncer_behind(pg_primary: PgServer) -> None:
    """A SIGKILLed runner: setpriv's pdeathsig stops its PgBouncer. An exiting one: atexit stops
    it and removes the base dir. (Both runners at once: each takes ~0.5 s.)"""
    children = {
        how: subprocess.Popen(
            [sys.executable, "-c", _CHILD, pg_primary.dsn(), how],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for how in ("hang", "exit")
    }
    bases: list[Path] = []
    try:
        started: dict[str, tuple[Path, int]] = {}
        for how, child in children.items():
            assert child.stdout is not None
            line = child.stdout.readline().split()
            assert line, f"the {how} child did not start its bouncer"
            started[how] = Path(line[0]), int(line[1])
            bases.append(started[how][0])
        killed_pid = started["hang"][1]
        assert _alive(killed_pid)
        children["hang"].send_signal(signal.SIGKILL)
        assert children["hang"].wait(30) == -signal.SIGKILL
        assert children["exit"].wait(30) == 0
        assert wait_until(lambda: not _alive(killed_pid)), "pgbouncer outlived a killed runner"
        assert not _alive(started["exit"][1])
        assert not started["exit"][0].exists()
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
        for base in bases:
            shutil.rmtree(base, ignore_errors=True)  # a SIGKILLed runner's atexit never ran


def test_several_servers_mean_the_primary_and_reload_repoints(
    pg_cluster: LocalCluster, own_bouncers: Callable[..., PgBouncer]
) -> None:
    bouncer = own_bouncers(list(reversed(pg_cluster.servers)))  # replicas first
    assert bouncer.backend is pg_cluster.primary
    assert bouncer.execute("SELECT pg_is_in_recovery()") == [(False,)]
    replica = pg_cluster.replicas[0]
    bouncer.backends = [replica]
    bouncer.reload()  # new config, SIGHUP: new server connections go to the replica
    assert wait_until(lambda: bouncer.execute("SELECT pg_is_in_recovery()") == [(True,)])
    assert bouncer.backend is replica
    assert bouncer.execute("SELECT host(inet_server_addr())") == [(replica.host,)]


def test_a_taken_port_is_a_clear_start_error(pg_cluster: LocalCluster) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused at once
        bouncer = PgBouncer([pg_cluster.primary], port=squatter.getsockname()[1])
        with pytest.raises(ServerStartError, match="Address already in use"):
            bouncer.start()
        assert not bouncer.running


def test_bad_backends_are_refused_early(pg_cluster: LocalCluster) -> None:
    with pytest.raises(ValueError, match="sslmode"):
        PgBouncer(pg_cluster.primary.dsn(sslmode="disable")).start()
    with pytest.raises(ValueError, match="pool_mode"):
        PgBouncer([pg_cluster.primary], pool_mode="txn")


# -- the pool's core cases through PgBouncer ----------------------------------------------------


def test_checkout_query_return(make_pool: MakePool, pgbouncer: PgBouncer) -> None:
    pool = make_pool(minconn=0, maxconn=2, dsn=pgbouncer.dsn())
    with pool.conn() as conn, conn.cursor() as cur:
        cur.execute("SELECT 41 + 1")
        assert cur.fetchone() == (42,)
    s = pool.stats()
    assert (s["size"], s["idle"], s["in_use"], s["checkouts"]) == (1, 1, 0, 1)


def test_inet_server_addr_reports_the_backend_not_the_bouncer(
    make_pool: MakePool, pgbouncer: PgBouncer, pg_cluster: LocalCluster
) -> None:
    pool = make_pool(minconn=0, maxconn=2, dsn=pgbouncer.dsn())
    with pool.conn() as conn:
        assert server_address(conn) == (pg_cluster.primary.host, pg_cluster.port)
    # ... while all the pool knows of, places on and bans is the bouncer's one address
    assert list(pool.stats()["addresses"]) == [f"{pgbouncer.host}:{pgbouncer.port}"]


def test_uncommitted_work_is_rolled_back_on_return(
    make_pool: MakePool, pgbouncer: PgBouncer, pg_primary: PgServer, scratch: str
) -> None:
    pool = make_pool(minconn=0, maxconn=1, dsn=pgbouncer.dsn())
    c = pool.getconn()
    with c.cursor() as cur:
        cur.execute(f"INSERT INTO {scratch} (v) VALUES ('left open')")
    assert c.get_transaction_status() == ext.TRANSACTION_STATUS_INTRANS
    pool.putconn(c)
    assert c.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE
    assert pg_primary.execute(f"SELECT count(*) FROM {scratch}") == [(0,)]
    assert pool.stats()["rollbacks"] == 1
    with pool.conn() as c2:
        assert c2 is c  # kept
        assert one(c2, f"SELECT count(*) FROM {scratch}") == 0


def test_connection_in_error_state_is_rolled_back_and_reusable(
    make_pool: MakePool, pgbouncer: PgBouncer
) -> None:
    pool = make_pool(minconn=0, maxconn=1, dsn=pgbouncer.dsn())
    c = pool.getconn()
    with pytest.raises(psycopg2.errors.DivisionByZero), c.cursor() as cur:
        cur.execute("SELECT 1/0")
    assert c.get_transaction_status() == ext.TRANSACTION_STATUS_INERROR
    pool.putconn(c)
    with pool.conn() as c2:
        assert c2 is c
        assert one(c2, "SELECT 1") == 1
    assert pool.stats()["closed_by_reason"] == {}


def test_timeout_zero_raises_at_once_at_maxconn(make_pool: MakePool, pgbouncer: PgBouncer) -> None:
    pool = make_pool(minconn=0, maxconn=1, dsn=pgbouncer.dsn(), name="bounced")
    held = pool.getconn()
    t0 = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        pool.getconn(timeout=0)
    assert time.monotonic() - t0 < 0.05
    assert isinstance(info.value, PoolError) and "bounced" in str(info.value)
    pool.putconn(held)
    assert pool.stats()["checkout_timeouts"] == 1


@pytest.mark.parametrize("pool_size", [None, 2], ids=["session-bouncer", "pool-size-2"])
def test_16_threads_50_checkouts_on_maxconn_4(
    make_pool: MakePool,
    request: pytest.FixtureRequest,
    own_bouncers: Callable[..., PgBouncer],
    pool_size: int | None,
) -> None:
    """No failure, and PgBouncer never opens more server connections than its pool size: with
    a pool size of 2, the pool's 4 client connections share 2 server connections."""
    bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
    if pool_size is not None:
        assert bouncer.backend is not None
        bouncer = own_bouncers([bouncer.backend], default_pool_size=pool_size)
    pool = make_pool(minconn=0, maxconn=4, dsn=bouncer.dsn(), timeout=20)
    errors: list[BaseException] = []
    server_pids: set[int] = set()
    max_servers = 0
    lock = threading.Lock()
    done = threading.Event()

    def sampler() -> None:
        nonlocal max_servers
        while not done.is_set():
            max_servers = max(max_servers, bouncer.server_count())
            time.sleep(0.002)

    def worker() -> None:
        try:
            for _ in range(50):
                with pool.conn() as conn:
                    pid = backend_pid(conn)
                    conn.commit()
                with lock:
                    server_pids.add(pid)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    watcher = threading.Thread(target=sampler)
    watcher.start()
    threads = [threading.Thread(target=worker) for _ in range(16)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - started
    done.set()
    watcher.join(10)
    assert not errors, errors[:3]
    st = pool.stats()
    assert st["checkouts"] == 16 * 50
    assert st["size"] <= 4 and st["connections_opened"] <= 4 and st["checkout_timeouts"] == 0
    assert 0 < max_servers <= bouncer.default_pool_size
    if pool_size is not None:
        assert len(server_pids) <= pool_size < st["connections_opened"]
    assert elapsed < 20


# -- a killed backend ---------------------------------------------------------------------------


def test_test_on_borrow_after_the_backend_is_killed_behind_pgbouncer(
    make_pool: MakePool,
    pgbouncer: PgBouncer,
    pg_primary: PgServer,
    stepped: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = make_pool(minconn=0, maxconn=1, dsn=pgbouncer.dsn(), validation_bypass=0.5)
    pings: list[bool] = []
    real_ping = pool._ping

    def counting_ping(conn: ext.connection, *args: object) -> bool:
        pings.append(real_ping(conn, *args))
        return pings[-1]

    monkeypatch.setattr(pool, "_ping", counting_ping)
    c = pool.getconn()
    victim = backend_pid(c)
    pool.putconn(c)  # rolled back: the server connection goes back to PgBouncer
    assert victim in pgbouncer.server_pids()
    terminate(pg_primary, victim)
    pgbouncer.wait_servers(lambda pids: victim not in pids)  # PgBouncer noticed and dropped it
    stepped.clock.advance(1.0)  # past validation_bypass: the next checkout pings
    t0 = time.monotonic()
    c2 = pool.getconn()
    assert time.monotonic() - t0 < 1.0
    assert pings == [True]  # the ping went through on a fresh server connection
    assert c2 is c  # the client connection never saw the backend die
    assert backend_pid(c2) != victim
    pool.putconn(c2)
    assert pool.stats()["closed_by_reason"] == {}


def test_a_backend_killed_mid_transaction_breaks_the_client_connection(
    make_pool: MakePool, pgbouncer: PgBouncer, pg_primary: PgServer, stepped: Any
) -> None:
    """Inside a transaction the client is linked to the server: PgBouncer cannot hide its death,
    the pool discards the connection on return and the next checkout gets a new one."""
    pool = make_pool(minconn=0, maxconn=1, dsn=pgbouncer.dsn())
    c = pool.getconn()
    victim = backend_pid(c)  # a transaction is open: c holds this server connection
    terminate(pg_primary, victim)
    with pytest.raises(psycopg2.OperationalError):
        one(c, "SELECT 1")
    pool.putconn(c)
    assert pool.stats()["closed_by_reason"] == {"broken": 1}
    stepped.clock.advance(1.0)
    with pool.conn() as c2:
        assert c2 is not c
        assert backend_pid(c2) != victim


# -- target_session_attrs -----------------------------------------------------------------------


def test_target_session_attrs_read_write_through_pgbouncer(
    make_pool: MakePool,
    pgbouncer: PgBouncer,
    pg_cluster: LocalCluster,
    own_bouncers: Callable[..., PgBouncer],
    scratch: str,
) -> None:
    primary = pg_cluster.primary
    pool = make_pool(minconn=0, maxconn=2, dsn=pgbouncer.dsn(target_session_attrs="read-write"))
    with pool.conn() as conn:
        assert one(conn, "SHOW transaction_read_only") == "off"
        assert server_address(conn) == (primary.host, primary.port)
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {scratch} (v) VALUES ('written via pgbouncer')")
        conn.commit()
    assert primary.execute(f"SELECT v FROM {scratch}") == [("written via pgbouncer",)]

    # libpq judges the server behind the bouncer: one in front of a replica is read-only
    replica = pg_cluster.replicas[0]
    to_replica = own_bouncers([replica])
    with pytest.raises(psycopg2.OperationalError, match="read-only"):
        psycopg2.connect(to_replica.dsn(target_session_attrs="read-write", connect_timeout=2))
    standby = psycopg2.connect(to_replica.dsn(target_session_attrs="standby"))
    try:
        assert server_address(standby)[0] == replica.host
    finally:
        standby.close()

    # two bouncers as two hosts of one DSN: read-write lands behind the primary's
    both = make_pool(
        minconn=0,
        maxconn=3,
        dsn=f"host={to_replica.host},{pgbouncer.host} port={to_replica.port},{pgbouncer.port}"
        " user=postgres dbname=postgres target_session_attrs=read-write",
    )
    held = [both.getconn() for _ in range(3)]
    try:
        assert {server_address(c)[0] for c in held} == {primary.host}
    finally:
        for c in held:
            both.putconn(c)


# -- what transaction mode changes --------------------------------------------------------------


def test_session_state_from_configure_does_not_stick_in_transaction_mode(
    make_pool: MakePool, pgbouncer: PgBouncer, pg_primary: PgServer
) -> None:
    """``configure`` runs once per client connection, but its SET and PREPARE land on whichever
    server connection ran them: the next statement may run elsewhere, without them, and another
    client may be served by the server connection that has them."""
    default_work_mem = pg_primary.execute("SHOW work_mem")[0][0]  # type: ignore[index]
    configured: list[int] = []

    def configure(conn: ext.connection) -> None:
        # one Query message, one transaction: both run on the same server connection
        configured.append(
            one(conn, "SET work_mem = '7MB'; PREPARE q AS SELECT 42; SELECT pg_backend_pid()")
        )

    pool = make_pool(
        minconn=0, maxconn=1, dsn=pgbouncer.dsn(), configure=configure, autocommit=True
    )
    c = pool.getconn()
    [configured_on] = configured
    # Another client opens a transaction: PgBouncer reuses server connections last-in first-out
    # (server_round_robin = 0), so it gets the one configure just released, state and all.
    other = pgbouncer.connect(autocommit=False)
    try:
        assert backend_pid(other) == configured_on
        assert one(other, "SHOW work_mem") == "7MB"  # leaked into a stranger's session
        assert one(other, "EXECUTE q") == 42
        # the pool's own connection runs on another server connection: the state is not there
        assert backend_pid(c) != configured_on
        assert one(c, "SHOW work_mem") == default_work_mem
        with pytest.raises(psycopg2.errors.InvalidSqlStatementName):
            one(c, "EXECUTE q")
    finally:
        other.rollback()
        other.close()
        pool.putconn(c)
        pgbouncer.admin("RECONNECT postgres")  # no server keeps the leaked state
        pgbouncer.wait_servers(lambda pids: configured_on not in pids)


def test_set_local_inside_a_transaction_is_reliable(
    make_pool: MakePool, pgbouncer: PgBouncer, pg_primary: PgServer
) -> None:
    """What does work: state scoped to one transaction (``SET LOCAL``, ``set_config(..., true)``)
    stays with the server connection the transaction holds, and goes with it."""
    default_work_mem = pg_primary.execute("SHOW work_mem")[0][0]  # type: ignore[index]
    pool = make_pool(minconn=0, maxconn=2, dsn=pgbouncer.dsn())
    for _ in range(3):
        with pool.conn() as conn:
            with conn.cursor() as cur:
                cur.execute("SET LOCAL work_mem = '9MB'")
            seen = {
                one(conn, "SELECT current_setting('work_mem'), pg_backend_pid()") for _ in range(5)
            }
            assert len(seen) == 1 and next(iter(seen))[0] == "9MB"  # one server, the setting
            conn.commit()
            assert one(conn, "SHOW work_mem") == default_work_mem  # gone with the transaction
            conn.rollback()
