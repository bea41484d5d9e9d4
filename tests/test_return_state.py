"""What one borrower changes, the next does not inherit; nothing the pool does on a return
hangs on a frozen server; a broken connection makes its address's older ones suspect
(issue 11).

Every client-side attribute of a psycopg2 connection (``autocommit``, ``readonly``,
``isolation_level``, ``deferrable``, ``cursor_factory``) is back to what the pool set up when
the next borrower gets it (or the connection is discarded). ``maxconn=1`` makes the next
borrower get the same connection.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras
import pytest
from helpers import wait_until
from pgregistry.pools import ConnectionPool
from reliability import (
    books_exact,
    new_app,
)


def _one_conn_pool(server: Any, sup: Any, closer: Any, **kw: Any) -> ConnectionPool:
    pool = ConnectionPool(minconn=0, maxconn=1, dsn=server.dsn(), supervisor=sup, timeout=5,
                          application_name=new_app("state"), **kw)
    closer(pool)
    return pool


def _pid(conn: Any) -> int:
    return int(conn.info.backend_pid)


def test_autocommit_set_by_a_borrower_does_not_commit_the_next_one_s_failed_block(
        clean_db, supervisor, closer):
    pool = _one_conn_pool(clean_db, supervisor, closer)
    with pool.conn() as conn:
        first = _pid(conn)
        conn.autocommit = True
    with pytest.raises(RuntimeError), pool.conn() as conn:
        assert _pid(conn) == first
        with conn.cursor() as cur:
            cur.execute("INSERT INTO pgr_scratch (v) VALUES ('must not be committed')")
        raise RuntimeError("the block fails: its work is rolled back, never committed")
    assert clean_db.execute("SELECT count(*) FROM pgr_scratch")[0][0] == 0


def test_readonly_set_by_a_borrower_does_not_reach_the_next_one(clean_db, supervisor, closer):
    pool = _one_conn_pool(clean_db, supervisor, closer)
    with pool.conn() as conn:
        first = _pid(conn)
        conn.set_session(readonly=True)
    with pool.conn() as conn:
        assert _pid(conn) == first
        with conn.cursor() as cur:
            cur.execute("INSERT INTO pgr_scratch (v) VALUES ('a write')")
        conn.commit()
    assert clean_db.execute("SELECT count(*) FROM pgr_scratch")[0][0] == 1


def test_isolation_and_deferrable_do_not_reach_the_next_borrower(pg_server, supervisor,
                                                                  closer):
    pool = _one_conn_pool(pg_server, supervisor, closer)
    with pool.conn() as conn:
        first = _pid(conn)
        conn.set_session(isolation_level=ext.ISOLATION_LEVEL_SERIALIZABLE, deferrable=True)
    with pool.conn() as conn:
        assert _pid(conn) == first
        assert conn.isolation_level is None and conn.deferrable is None
        with conn.cursor() as cur:
            cur.execute("SHOW transaction_isolation")
            assert cur.fetchone()[0] == "read committed"


def test_cursor_factory_does_not_reach_the_next_borrower(pg_server, supervisor, closer):
    pool = _one_conn_pool(pg_server, supervisor, closer)
    with pool.conn() as conn:
        conn.cursor_factory = psycopg2.extras.RealDictCursor
    with pool.conn() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 AS one")
        assert cur.fetchone() == (1,)


def test_the_pool_s_own_autocommit_is_put_back(pg_server, supervisor, closer):
    pool = _one_conn_pool(pg_server, supervisor, closer, autocommit=True)
    with pool.conn() as conn:
        conn.autocommit = False
    with pool.conn() as conn:
        assert conn.autocommit is True


def test_what_configure_set_up_is_kept(pg_server, supervisor, closer):
    """The reference state is what the pool set up, ``configure`` included."""

    def configure(conn: Any) -> None:
        conn.set_session(readonly=True, autocommit=True)

    pool = _one_conn_pool(pg_server, supervisor, closer, configure=configure)
    for _ in range(2):
        with pool.conn() as conn:
            assert conn.readonly is True and conn.autocommit is True


# -- the return path on a frozen server --------------------------------------------------------


def test_a_return_with_an_open_transaction_on_a_frozen_server_is_bounded(
        solo_server, supervisor, closer):
    app = new_app("frozen-return")
    pool = ConnectionPool(minconn=0, maxconn=2, dsn=solo_server.dsn(), supervisor=supervisor,
                          application_name=app, ping_timeout=1, timeout=5, connect_timeout=1)
    closer(pool)
    conn = pool.getconn()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")  # a transaction left open: the return must roll it back
    took: list[float] = []

    def give_back() -> None:
        t0 = time.monotonic()
        pool.putconn(conn)
        took.append(time.monotonic() - t0)

    returner = threading.Thread(target=give_back)  # (the test thaws the server, whatever)
    solo_server.freeze()
    try:
        returner.start()
        returner.join(3)
        st = pool.stats()
    finally:
        solo_server.thaw()
    returner.join(10)
    assert took and took[0] <= 1.5, f"putconn took {took} s on a frozen server"
    took_s = took[0]
    print(f"\nRELIABILITY: return with an open transaction on a frozen server: {took_s:.2f} s"
          f" (ping_timeout 1 s); closed {st['closed_by_reason']}")
    assert st["size"] == 0, "the connection that missed its bound is discarded, its slot freed"
    assert not books_exact(pool, solo_server, app)


# -- after a restart, one broken connection makes its address's older ones suspect -------------


def test_after_a_restart_at_most_one_dead_connection_is_handed_out(solo_server, supervisor,
                                                                   closer):
    app = new_app("restart")
    pool = ConnectionPool(minconn=6, maxconn=6, dsn=solo_server.dsn(), supervisor=supervisor,
                          application_name=app, validation_bypass=30, timeout=5)
    closer(pool)
    assert wait_until(lambda: pool.stats()["idle"] == 6, 5)
    conns = [pool.getconn() for _ in range(6)]  # all used moments ago: none would be pinged
    for conn in conns:
        pool.putconn(conn)
    solo_server.restart("fast")
    dead = 0
    for _ in range(6):
        try:
            with pool.conn() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
        except psycopg2.OperationalError:
            dead += 1
    print(f"\nRELIABILITY: after a restart, {dead} of 6 connections used moments ago were handed"
          f" out dead")
    assert dead <= 1
