"""No storms (issue 11): a server out of connection slots, or a wrong password, must not be
hammered with logins by every checkout. Failed logins are counted in the server's own log
(one ``FATAL`` line each).

- Capacity ("too many clients", reserved slots, role or database connection limits: SQLSTATE
  53300, and the 57P03 family): a checkout below ``maxconn`` whose connect is refused for
  capacity waits, within its deadline, for a connection the pool already holds; the address
  gets a backoff shared by all callers.
- Authentication (28P01, 28000): remembered per address for a doubling backoff; checkouts in
  that window fail at once with the remembered error (no login); one attempt per period probes
  again; one warning per period; a reload that changes the credentials clears it.
"""

from __future__ import annotations

import logging
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from helpers import run_load_for
from pgregistry import Registry
from pgregistry.pools import ConnectError, ConnectionPool, PoolError
from pgregistry.pools.connector import classify
from pgregistry.testing.cluster import PgServer
from reliability import (
    ServerLog,
    new_app,
)

THREADS = 8
STORM_SECONDS = 3.0
ROLE_LIMIT = 4
BAN_S = 0.5  # address_ban: the first backoff period (doubling)
GOOD_PASSWORD = "storm-good-pw"  # a test role's password (never the suite's sentinel)


def _periods(seconds: float, first: float) -> int:
    """How many doubling backoff periods start within ``seconds``."""
    n, t, period = 0, 0.0, first
    while t < seconds:
        n += 1
        t += period
        period *= 2
    return n


@pytest.fixture(scope="module")
def password_role(solo_server: PgServer) -> Iterator[str]:
    """A login role that must give its password (scram), on this module's server."""
    role = f"pgr_pw_{uuid.uuid4().hex[:8]}"
    solo_server.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{GOOD_PASSWORD}'")
    hba = Path(solo_server.datadir) / "pg_hba.conf"
    text = hba.read_text()
    with hba.open("w") as fh:  # (keeps the file's owner)
        fh.write(f"host all {role} 127.0.0.0/8 scram-sha-256\n{text}")
    solo_server.execute("SELECT pg_reload_conf()")
    time.sleep(0.2)  # the postmaster reloads pg_hba.conf asynchronously
    yield role
    with hba.open("w") as fh:
        fh.write(text)
    solo_server.execute("SELECT pg_reload_conf()")


def _capped_role(server: PgServer, limit: int) -> str:
    role = f"pgr_cap_{uuid.uuid4().hex[:8]}"
    server.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT {limit}")  # not a superuser
    return role


def _run_threads(work: Any, seconds: float) -> None:
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            work()

    threads = [threading.Thread(target=loop) for _ in range(THREADS)]
    for t in threads:
        t.start()
    run_load_for(seconds)
    stop.set()
    for t in threads:
        t.join(30)


def test_connect_failures_are_classified_from_the_server_s_own_words(solo_server):
    """What each refusal of a real server is classified as: a role's and a database's
    connection limits are capacity, a wrong password and an unknown role are auth."""
    role = _capped_role(solo_server, 0)
    db = f"pgr_db_{uuid.uuid4().hex[:8]}"
    solo_server.execute(f"CREATE DATABASE {db} CONNECTION LIMIT 0")
    open_role = f"pgr_open_{uuid.uuid4().hex[:8]}"
    solo_server.execute(f"CREATE ROLE {open_role} LOGIN")
    seen = {}
    for what, kw in {
        "role limit": {"user": role},
        "database limit": {"user": open_role, "dbname": db},
        "unknown role": {"user": "pgr_no_such_role"},
    }.items():
        with pytest.raises(psycopg2.OperationalError) as info:
            psycopg2.connect(solo_server.dsn(**kw))
        seen[what] = classify(info.value)
    assert seen == {"role limit": "capacity", "database limit": "capacity",
                    "unknown role": "auth"}, seen


@pytest.mark.parametrize("text, kind", [
    # PostgreSQL's wordings (src/backend/utils/init/postinit.c, src/backend/storage/ipc/procarray.c,
    # src/backend/postmaster/postmaster.c, src/backend/libpq/auth.c; 53300, 57P03, 28P01, 28000)
    ("FATAL:  sorry, too many clients already", "capacity"),
    ("FATAL:  remaining connection slots are reserved for non-replication superuser connections",
     "capacity"),
    ("FATAL:  remaining connection slots are reserved for roles with the SUPERUSER attribute",
     "capacity"),
    ('FATAL:  remaining connection slots are reserved for roles with privileges of the '
     '"pg_use_reserved_connections" role', "capacity"),
    ('FATAL:  too many connections for role "app"', "capacity"),
    ('FATAL:  too many connections for database "app"', "capacity"),
    ("FATAL:  the database system is starting up", "unavailable"),
    ("FATAL:  the database system is shutting down", "unavailable"),
    ("FATAL:  the database system is in recovery mode", "unavailable"),
    ("FATAL:  the database system is not yet accepting connections", "unavailable"),
    ("FATAL:  the database system is not accepting connections", "unavailable"),
    ('FATAL:  password authentication failed for user "app"', "auth"),
    ('FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "app", database "app", no '
     'encryption', "auth"),
    ('FATAL:  pg_hba.conf rejects connection for host "10.0.0.1", user "app"', "auth"),
    ('FATAL:  role "app" does not exist', "auth"),
    ('FATAL:  role "app" is not permitted to log in', "auth"),
    ('FATAL:  PAM authentication failed for user "app"', "auth"),
    ("fe_sendauth: no password supplied", "auth"),
    ('FATAL:  database "app" does not exist', "rejected"),
    ("FATAL:  permission denied for database \"app\"", "rejected"),
    ("connection refused", "refused"),
    ("timeout expired", "timeout"),
])
def test_classification_of_every_wording(text, kind):
    assert classify(psycopg2.OperationalError(text)) == kind


def test_no_login_storm_at_a_connection_limit(solo_server, supervisor, closer):
    """A role allowed 4 connections, a pool of maxconn 8, 8 threads: the pool holds 4 and
    serves everyone from them; the server sees a handful of refused logins per backoff."""
    role = _capped_role(solo_server, ROLE_LIMIT)
    app = new_app("capacity")
    pool = ConnectionPool(minconn=0, maxconn=8, supervisor=supervisor, timeout=5,
                          dsn=solo_server.dsn(user=role), application_name=app,
                          address_ban=BAN_S, address_ban_max=8)
    closer(pool)
    log = ServerLog(solo_server)
    errors: list[str] = []
    done = [0]

    def work() -> None:
        try:
            with pool.conn() as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(0.002)")
            done[0] += 1
        except psycopg2.Error as exc:
            errors.append(str(exc).splitlines()[0])

    _run_threads(work, STORM_SECONDS)
    refused = log.count(rf'too many connections for role "{role}"')
    allowed = THREADS + 2 * _periods(STORM_SECONDS, BAN_S)
    print(f"\nRELIABILITY: capacity storm, role limit {ROLE_LIMIT}, maxconn 8, {THREADS} threads,"
          f" {STORM_SECONDS:g} s: {refused} refused logins at the server, {len(errors)} caller"
          f" errors, {done[0]} checkouts served; pool size {pool.stats()['size']}")
    assert not errors, f"{len(errors)} caller errors, e.g. {errors[:3]}"
    assert refused <= allowed, f"{refused} refused logins in {STORM_SECONDS} s"
    assert done[0] > 100


def test_no_login_storm_with_a_wrong_password(solo_server, password_role, supervisor, closer,
                                              caplog):
    app = new_app("auth")
    pool = ConnectionPool(minconn=0, maxconn=8, supervisor=supervisor, timeout=5,
                          dsn=solo_server.dsn(user=password_role, password="wrong-pw"),
                          application_name=app, address_ban=BAN_S, address_ban_max=8)
    closer(pool)
    log = ServerLog(solo_server)
    outcomes: list[tuple[str, float]] = []

    def work() -> None:
        t0 = time.monotonic()
        try:
            pool.getconn(timeout=1)
            outcomes.append(("connected", time.monotonic() - t0))
        except PoolError as exc:
            outcomes.append((str(exc), time.monotonic() - t0))
        time.sleep(0.001)  # a caller that retries at once, as a busy app would

    with caplog.at_level(logging.WARNING, logger="pgregistry"):
        _run_threads(work, STORM_SECONDS)
    failed = log.count(rf'password authentication failed for user "{password_role}"')
    periods = _periods(STORM_SECONDS, BAN_S)
    warnings = [r for r in caplog.records if "password authentication failed" in r.getMessage()]
    slow = [took for _, took in outcomes if took > 0.1]
    print(f"\nRELIABILITY: wrong password, {THREADS} threads, {STORM_SECONDS:g} s: {failed} failed"
          f" logins at the server ({periods} backoff periods), {len(outcomes)} checkouts failed,"
          f" {len(slow)} of them slower than 0.1 s, {len(warnings)} warning lines")
    assert all(msg != "connected" for msg, _ in outcomes)
    assert all("password authentication failed" in msg for msg, _ in outcomes), outcomes[:3]
    assert failed <= THREADS + periods, f"{failed} failed logins in {STORM_SECONDS} s"
    assert len(warnings) <= periods + 1, [r.getMessage() for r in warnings]
    assert len(slow) <= THREADS + periods  # only the logins take time; the rest fail at once


def test_a_reload_with_new_credentials_clears_the_remembered_auth_failure(
        solo_server, password_role, supervisor, tmp_path, monkeypatch):
    env = f"PGR_STORM_PW_{uuid.uuid4().hex[:6].upper()}"
    monkeypatch.setenv(env, "wrong-pw")
    path = tmp_path / "pools.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        pools:
          app:
            host: {solo_server.host}
            port: {solo_server.port}
            dbname: postgres
            user: {password_role}
            password_env: {env}
            minconn: 0
            maxconn: 4
            address_ban: 30
            application_name: {new_app("reload")}
        """))
    log = ServerLog(solo_server)
    with Registry.from_yaml(path, supervisor=supervisor, install_sighup=False) as reg:
        for _ in range(20):
            with pytest.raises(ConnectError, match="password authentication failed"):
                reg.get("app").getconn(timeout=1)
        assert log.count("password authentication failed") == 1  # then remembered
        monkeypatch.setenv(env, GOOD_PASSWORD)
        reg.reload()
        with reg.get("app").conn(timeout=2) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_user")
            assert cur.fetchone()[0] == password_role
