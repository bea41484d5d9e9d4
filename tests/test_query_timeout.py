"""``query_timeout`` cancels on the server (issue 11): on a healthy server the statement is
cancelled there (gone from ``pg_stat_activity``, its locks free), the connection is kept and
the address is not banned; only a server that does not answer at all has the socket cut (and
its address banned), and the caller still gets its error within the bound."""

from __future__ import annotations

import threading
import time

import psycopg2
import psycopg2.errors
import pytest
from helpers import wait_until
from pgregistry.pools import ConnectionPool
from reliability import (
    books_exact,
    new_app,
)

QUERY_TIMEOUT = 1.0
BOUND_S = 1.5


def test_a_slow_statement_is_cancelled_on_a_healthy_server(clean_db, supervisor, closer):
    app = new_app("qt-healthy")
    pool = ConnectionPool(minconn=0, maxconn=2, dsn=clean_db.dsn(), supervisor=supervisor,
                          application_name=app, query_timeout=QUERY_TIMEOUT, timeout=5)
    closer(pool)
    clean_db.execute("INSERT INTO pgr_scratch (id, v) VALUES (1, 'locked')")
    t0 = time.monotonic()
    with pool.conn() as conn:
        pid = conn.info.backend_pid
        with conn.cursor() as cur:
            cur.execute("SELECT v FROM pgr_scratch WHERE id = 1 FOR UPDATE")
            with pytest.raises(psycopg2.errors.QueryCanceled):
                cur.execute("SELECT pg_sleep(30)")
        failed_after = time.monotonic() - t0
    # the statement is gone from the server, and the return rolled back: its lock is free
    rows = clean_db.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
    assert rows and rows[0][0] == "idle", rows
    assert time.monotonic() - t0 <= BOUND_S
    other = clean_db.connect()
    try:
        with other.cursor() as cur:
            cur.execute("SET lock_timeout = '500ms'")
            cur.execute("UPDATE pgr_scratch SET v = 'free' WHERE id = 1")
        other.commit()
    finally:
        other.close()
    with pool.conn() as conn:  # the connection was kept
        assert conn.info.backend_pid == pid
        with conn.cursor() as cur:
            cur.execute("SELECT pg_sleep(0.1)")  # a statement within the bound runs
    label = next(iter(pool.stats()["addresses"]))
    assert not pool.stats()["addresses"][label]["banned"]
    print(f"\nRELIABILITY: query_timeout {QUERY_TIMEOUT:g} s on a healthy server: cancelled"
          f" after {failed_after:.2f} s, backend idle, lock free, connection kept, address"
          f" not banned")
    assert not books_exact(pool, clean_db, app)


def test_a_statement_on_a_frozen_server_fails_within_the_bound(solo_server, supervisor,
                                                               closer):
    app = new_app("qt-frozen")
    pool = ConnectionPool(minconn=0, maxconn=2, dsn=solo_server.dsn(), supervisor=supervisor,
                          application_name=app, query_timeout=QUERY_TIMEOUT, timeout=5,
                          connect_timeout=1)
    closer(pool)
    conn = pool.getconn()
    result: list[tuple[str, float]] = []

    def query() -> None:
        t0 = time.monotonic()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            result.append(("ok", time.monotonic() - t0))
        except psycopg2.Error as exc:
            result.append((type(exc).__name__, time.monotonic() - t0))

    runner = threading.Thread(target=query)
    solo_server.freeze()
    try:
        runner.start()
        runner.join(BOUND_S + 1)
    finally:
        solo_server.thaw()
    runner.join(10)
    pool.putconn(conn)
    print(f"\nRELIABILITY: query_timeout {QUERY_TIMEOUT:g} s on a frozen server: {result}")
    assert result and result[0][0] != "ok" and result[0][1] <= BOUND_S, result
    assert wait_until(lambda: not books_exact(pool, solo_server, app, timeout=0.1), 10)
