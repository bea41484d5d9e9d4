"""The psycopg2.pool and psycopg2_pool drop-ins, with those APIs' documented examples run
unchanged but for the import."""

from __future__ import annotations

import math
import threading

import psycopg2
import psycopg2.extensions
import pytest
from pgregistry.compat import (
    PoolError,
    SimpleConnectionPool,
    ThreadedConnectionPool,
    ThreadSafeConnectionPool,
)
from pgregistry.pools import PoolError as OurPoolError


@pytest.fixture
def params(pg_server):
    """The server's parameters as the classic examples spell them (``database=``)."""
    params = psycopg2.extensions.parse_dsn(pg_server.dsn())
    params["database"] = params.pop("dbname")
    return params


def test_simple_pool_example(params, clean_db):
    # psycopg2.pool's classic example: keywords, getconn, cursor, putconn, closeall.
    postgreSQL_pool = SimpleConnectionPool(1, 20, **params)
    assert postgreSQL_pool
    ps_connection = postgreSQL_pool.getconn()
    assert ps_connection
    ps_cursor = ps_connection.cursor()
    ps_cursor.execute("select * from pgr_scratch")
    assert ps_cursor.fetchall() == []
    ps_cursor.close()
    postgreSQL_pool.putconn(ps_connection)
    postgreSQL_pool.closeall()
    assert postgreSQL_pool.closed


def test_simple_pool_with_positional_dsn(pg_server):
    p = SimpleConnectionPool(1, 2, pg_server.dsn())
    assert p.pool.stats()["idle"] == 1  # minconn opened in the constructor, like psycopg2's
    conn = p.getconn()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    p.putconn(conn)
    p.closeall()


def test_threaded_pool_example(params):
    threaded_postgreSQL_pool = ThreadedConnectionPool(5, 20, **params)
    results = []
    errors = []

    def work(n):
        try:
            conn = threaded_postgreSQL_pool.getconn()
            with conn.cursor() as cur:
                cur.execute("SELECT %s", (n,))
                results.append(cur.fetchone()[0])
            threaded_postgreSQL_pool.putconn(conn)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and sorted(results) == list(range(10))
    threaded_postgreSQL_pool.closeall()


def test_keyed_connections(pg_server):
    p = ThreadedConnectionPool(0, 3, pg_server.dsn())
    a = p.getconn("alice")
    assert p.getconn("alice") is a  # same key, same connection
    b = p.getconn("bob")
    assert b is not a
    with pytest.raises(PoolError, match="trying to put unkeyed connection"):
        p.putconn(a, key="bob")
    p.putconn(a, key="alice")
    p.putconn(b)  # key found from the connection, as psycopg2 does
    c = p.getconn("alice")
    p.putconn(c, "alice", close=True)
    assert c.closed
    p.closeall()


def test_exhausted_and_closed_errors(pg_server):
    p = SimpleConnectionPool(0, 1, pg_server.dsn())
    c = p.getconn()
    with pytest.raises(PoolError, match="connection pool exhausted"):
        p.getconn()
    p.putconn(c)
    p.closeall()
    with pytest.raises(PoolError, match="connection pool is closed"):
        p.getconn()
    with pytest.raises(PoolError, match="connection pool is closed"):
        p.putconn(c)
    with pytest.raises(PoolError, match="connection pool is closed"):
        p.closeall()
    assert PoolError is OurPoolError and issubclass(PoolError, psycopg2.Error)


def test_closeall_closes_connections_in_use(pg_server):
    p = ThreadedConnectionPool(1, 3, pg_server.dsn())
    busy = p.getconn()
    p.closeall()
    assert busy.closed


def test_context_manager_closes_the_pool(pg_server):
    with ThreadedConnectionPool(1, 2, pg_server.dsn()) as p:
        conn = p.getconn()
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        p.putconn(conn)
    assert p.closed
    with pytest.raises(PoolError):
        p.getconn()


def test_minconn_maxconn_attributes(pg_server):
    p = SimpleConnectionPool(2, 7, pg_server.dsn())
    assert (p.minconn, p.maxconn, p.closed) == (2, 7, False)
    p.closeall()


def test_threadsafe_pool_signature_and_defaults(pg_server):
    import inspect

    sig = inspect.signature(ThreadSafeConnectionPool)
    assert all(
        p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in sig.parameters.values()
    )
    assert sig.parameters["minconn"].default == 1
    assert sig.parameters["maxconn"].default == math.inf
    assert sig.parameters["idle_timeout"].default == 600
    with pytest.raises(TypeError):
        ThreadSafeConnectionPool(1, 2)  # type: ignore[misc]


def test_threadsafe_pool_usage_and_clear(pg_server):
    # psycopg2_pool's usage: keyword-only construction, getconn/putconn, clear().
    pool = ThreadSafeConnectionPool(minconn=1, maxconn=3, idle_timeout=600,
                                    dsn=pg_server.dsn(), application_name="tscp")
    conns = [pool.getconn() for _ in range(3)]
    with pytest.raises(PoolError):
        pool.getconn()
    for c in conns:
        pool.putconn(c)
    assert pool.pool.stats()["idle"] == 3
    pool.clear()
    assert pool.pool.stats()["idle"] == 0
    assert all(c.closed for c in conns)
    c = pool.getconn()
    with c.cursor() as cur:
        cur.execute("SELECT 1")
    pool.putconn(c)
    pool.close()


def test_threadsafe_pool_unbounded_by_default(pg_server):
    pool = ThreadSafeConnectionPool(minconn=0, dsn=pg_server.dsn())
    conns = [pool.getconn() for _ in range(12)]
    assert pool.pool.stats()["size"] == 12
    for c in conns:
        pool.putconn(c)
    pool.close()
