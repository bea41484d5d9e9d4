"""Recycling modes (psqlpy's): what each leaves behind for the next borrower of a connection,
``DISCARD ALL`` run outside a transaction and bounded in time, the mode live and in YAML."""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from helpers import wait_until
from pgregistry import Registry
from pgregistry.pools import ConnectionPool

LOCK_KEY = 424242


def dirty(conn) -> int:
    """What a careless borrower leaves on its session; returns its backend pid."""
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET search_path = nowhere, public")
        cur.execute("SET statement_timeout = '12s'")
        cur.execute("CREATE TEMP TABLE scratch_rows (v int)")
        cur.execute("PREPARE left_behind AS SELECT 1")
        cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        cur.execute("LISTEN left_channel")
    conn.autocommit = False
    return conn.info.backend_pid


def leftovers(conn) -> dict[str, object]:
    """What the next borrower finds on the same session."""
    with conn.cursor() as cur:
        cur.execute("""
            SELECT current_setting('search_path'), current_setting('statement_timeout'),
                   to_regclass('pg_temp.scratch_rows') IS NOT NULL,
                   (SELECT count(*) FROM pg_prepared_statements),
                   (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                      AND pid = pg_backend_pid()),
                   (SELECT count(*) FROM pg_listening_channels())""")
        row = cur.fetchone()
    conn.rollback()
    keys = ("search_path", "statement_timeout", "temp_table", "prepared", "advisory_locks",
            "listening")
    return dict(zip(keys, row, strict=True))


CLEAN = {"search_path": '"$user", public', "statement_timeout": "0", "temp_table": False,
         "prepared": 0, "advisory_locks": 0, "listening": 0}
LEFT = {"search_path": "nowhere, public", "statement_timeout": "12s", "temp_table": True,
        "prepared": 1, "advisory_locks": 1, "listening": 1}


def lock_is_free(server) -> bool:
    conn = server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
            got = cur.fetchone()[0]
            if got:
                cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        return bool(got)
    finally:
        conn.close()


def test_clean_leaves_nothing_for_the_next_borrower(make_pool, pg_primary):
    pool = make_pool(minconn=0, maxconn=1, recycle="clean")
    with pool.conn() as conn:
        pid = dirty(conn)
    assert lock_is_free(pg_primary)  # the advisory lock went with the return
    with pool.conn() as conn:
        assert conn.info.backend_pid == pid  # the same session, cleaned
        assert leftovers(conn) == CLEAN
    assert pool.stats()["recycle"] == "clean" and pool.stats()["connections_opened"] == 1


def test_fast_leaves_everything_as_documented(make_pool, pg_primary):
    pool = make_pool(minconn=0, maxconn=1, recycle="fast")
    with pool.conn() as conn:
        pid = dirty(conn)
    assert not lock_is_free(pg_primary)  # still held by the pooled session
    with pool.conn() as conn:
        assert conn.info.backend_pid == pid
        assert leftovers(conn) == LEFT
    pool.close_all()
    assert wait_until(lambda: lock_is_free(pg_primary), 5)


def test_clean_runs_after_the_rollback_of_an_open_transaction(make_pool):
    pool = make_pool(minconn=0, maxconn=1, recycle="clean")
    conn = pool.getconn()
    with conn.cursor() as cur:  # a transaction left open, with session state inside it
        cur.execute("SET search_path = nowhere")
        cur.execute("CREATE TEMP TABLE in_tx (v int)")
        cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))  # session-level, survives
    pool.putconn(conn)
    with pool.conn() as again:
        assert again is conn and leftovers(again) == CLEAN
    s = pool.stats()
    assert s["rollbacks"] == 1 and s["closed_by_reason"] == {}


def test_modes_decide_test_on_borrow_and_change_live(make_pool):
    assert make_pool(minconn=0).recycle is None  # test_on_borrow decides, as before
    assert make_pool(minconn=0, recycle="fast").test_on_borrow is False
    assert make_pool(minconn=0, recycle="verified").test_on_borrow is True
    pool = make_pool(minconn=0, maxconn=1, recycle="fast", test_on_borrow=True)
    assert pool.test_on_borrow is False
    with pool.conn() as conn:
        pid = dirty(conn)
    pool.retune(recycle="clean", test_on_borrow=False)
    assert pool.recycle == "clean" and pool.test_on_borrow is True
    with pool.conn() as conn:  # dirtied under fast: cleaned on its next return
        assert conn.info.backend_pid == pid
    with pool.conn() as conn:
        assert leftovers(conn) == CLEAN
    with pytest.raises(ValueError, match="recycle must be one of"):
        make_pool(minconn=0, recycle="slow")


def test_clean_on_a_frozen_server_is_bounded_and_discards(fresh_cluster):
    primary = fresh_cluster.primary
    pool = ConnectionPool(minconn=0, maxconn=2, dsn=primary.dsn(), recycle="clean",
                          ping_timeout=0.5, timeout=5)
    try:
        conn = pool.getconn()
        primary.freeze()
        try:
            t0 = time.monotonic()
            done = threading.Event()

            def give_back():
                pool.putconn(conn)
                done.set()

            t = threading.Thread(target=give_back)
            t.start()
            assert done.wait(5), "putconn hung on a frozen server"
            took = time.monotonic() - t0
            t.join(1)
        finally:
            primary.thaw()
        assert 0.4 <= took < 2.0, took
        s = pool.stats()
        assert s["closed_by_reason"] == {"reset_failed": 1} and s["size"] == 0
        assert any(a["banned"] for a in s["addresses"].values()), s["addresses"]
    finally:
        pool.close_all()


def test_recycle_from_yaml_and_retuned_on_reload(tmp_path, pg_primary):
    config = {"version": 1, "pools": {"app": {
        "host": pg_primary.host, "port": pg_primary.port, "user": "postgres",
        "dbname": "postgres", "minconn": 0, "maxconn": 1, "recycle": "fast"}}}
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump(config))
    with Registry.from_yaml(path, install_sighup=False) as reg:
        pool = reg.get("app").pool
        assert pool.recycle == "fast"
        config["pools"]["app"]["recycle"] = "clean"
        path.write_text(yaml.safe_dump(config))
        assert reg.reload().retuned == ("app",)
        assert reg.get("app").pool is pool and pool.recycle == "clean"
        with reg.get("app").conn() as conn:
            dirty(conn)
        with reg.get("app").conn() as conn:
            assert leftovers(conn) == CLEAN
