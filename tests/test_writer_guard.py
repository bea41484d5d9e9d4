"""The writer guard trusts only the server (issue 11): a caller's own read-only transaction or
session on a healthy primary makes its write fail with SQLSTATE 25006, and that is the caller's
doing, not a demoted writer: no warning, no role change, no connection closed, no DNS query.
A demotion is what the server says of itself (``in_hot_standby``, ``pg_is_in_recovery()``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg2.errors
import pytest
from pgregistry.pools import ConnectionPool
from reliability import (
    new_app,
)


def _read_only_transaction(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SET TRANSACTION READ ONLY")
        cur.execute("CREATE TEMP TABLE pgr_guard (x int)")


def _read_only_session(conn: Any) -> None:
    conn.autocommit = True
    conn.set_session(readonly=True)
    with conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE pgr_guard (x int)")


def _read_only_default(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SET default_transaction_read_only = on")
    conn.commit()
    with conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE pgr_guard (x int)")


@pytest.mark.parametrize("how", [
    pytest.param(_read_only_transaction, id="SET TRANSACTION READ ONLY"),
    pytest.param(_read_only_session, id="set_session(readonly) on autocommit"),
    pytest.param(_read_only_default, id="SET default_transaction_read_only"),
])
def test_a_caller_s_own_read_only_write_is_not_a_demoted_writer(
        pg_primary, supervisor, closer, caplog, how: Callable[[Any], None]):
    pool = ConnectionPool(minconn=3, maxconn=4, dsn=pg_primary.dsn(), supervisor=supervisor,
                          application_name=new_app("guard"), role="writer", timeout=5)
    closer(pool)
    pool.putconn(pool.getconn())
    before = pool.stats()
    with caplog.at_level(logging.WARNING, logger="pgregistry"):
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), pool.conn() as conn:
            how(conn)
        if how is not _read_only_default:  # (a SET in SQL is server-side session state: it
            # survives a return, see the README; psycopg2's own settings are put back)
            with pool.conn() as conn, conn.cursor() as cur:  # the next borrower writes
                cur.execute("CREATE TEMP TABLE pgr_guard2 (x int)")
    after = pool.stats()
    assert after["role_changes"] == before["role_changes"] == 0
    assert "demoted_writer" not in after["closed_by_reason"], after["closed_by_reason"]
    assert not [r for r in caplog.records if "no longer the writer" in r.getMessage()]
    label = next(iter(after["addresses"]))
    assert not after["addresses"][label]["banned"]
