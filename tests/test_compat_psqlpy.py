"""pgregistry.compat.psqlpy: psqlpy's documented examples, made synchronous (each ``await``,
``async with`` and ``async for`` dropped to its plain form), run with only the import changed
and the connection values pointed at the test server; then the parameter mapping, psqlpy's dsn
rule, status, resize and the recycling methods."""

from __future__ import annotations

import threading
import uuid
from typing import Any, Final

import psycopg2
import pytest
from helpers import wait_until
from pgregistry.compat.psqlpy import (
    Connection,
    ConnectionPool,
    ConnRecyclingMethod,
    Listener,
    ListenerNotificationMsg,
    QueryResult,
    SingleQueryResult,
    connect,
    libpq_params,
)
from pgregistry.compat.psqlpy import ConnectionPool as PsqlpyPool


@pytest.fixture
def db(pg_primary):
    """A database of its own with psqlpy's example table ``users``."""
    name = f"psqlpy_{uuid.uuid4().hex[:8]}"
    pg_primary.execute(f"CREATE DATABASE {name}")
    conn = psycopg2.connect(pg_primary.dsn(dbname=name))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE users (id int, username text, name text, age int)")
        cur.execute("INSERT INTO users VALUES (100, 'Alex', 'alex', 30), (101, 'Bo', 'bo', 5)")
    conn.close()
    yield pg_primary, name
    pg_primary.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
    pg_primary.execute(f"DROP DATABASE IF EXISTS {name}")


# -- the documented examples (docs/components/connection_pool.md, connection.md, listener.md) ----


def test_documented_connection_pool_examples(db):
    server, name = db
    host, port = server.host, server.port
    dsn = f"postgres://postgres:postgres@{host}:{port}/{name}"

    # "Initialize Connection Pool with separate parameters"
    db_pool: Final = ConnectionPool(
        username="postgres",
        password="postgres",
        host=host,
        port=port,
        db_name=name,
        max_db_pool_size=10,
    )

    def main() -> None:
        # "Execute"
        results: QueryResult = db_pool.execute(
            "SELECT * FROM users WHERE id = $1 and username = $2",
            [100, "Alex"],
        )

        dict_results: list[dict[str, Any]] = results.result()
        assert dict_results == [{"id": 100, "username": "Alex", "name": "alex", "age": 30}]

        # "Fetch"
        results: QueryResult = db_pool.fetch(
            "SELECT * FROM users WHERE id = $1 and username = $2",
            [100, "Alex"],
        )

        dict_results: list[dict[str, Any]] = results.result()
        assert len(dict_results) == 1

        # "Acquire"
        with db_pool.acquire() as connection:
            assert isinstance(connection, Connection)

        # "Connection"
        connection = db_pool.connection()
        connection.back_to_pool()

        # "Resize"
        db_pool.resize(15)
        assert db_pool.status().max_size == 15

    main()
    status = db_pool.status()  # "Status": its four fields
    assert (status.max_size, status.size, status.available, status.waiting) == (15, 1, 1, 0)

    # "Close"
    def main() -> None:
        db_pool.close()

    main()

    # "Initialize Connection Pool with DSN"
    db_pool: Final = ConnectionPool(
        dsn=dsn,
        max_db_pool_size=10,
    )
    assert db_pool.execute("SELECT current_database() AS db").result() == [{"db": name}]
    db_pool.close()

    # "Create Connection Pool with one function"
    db_pool: Final = connect(
        dsn=dsn,
        max_db_pool_size=10,
    )
    assert db_pool.status().max_size == 10
    db_pool.close()


def test_documented_connection_examples(db):
    server, name = db
    db_pool: Final = ConnectionPool(
        dsn=f"postgres://postgres:postgres@{server.host}:{server.port}/{name}",
    )

    def main() -> None:
        # "Usage": default, then the context manager
        connection = db_pool.connection()
        connection.back_to_pool()
        with db_pool.acquire() as connection:
            # connection is valid here
            ...
        # connection is invalid here

        # "Execute"
        connection = db_pool.connection()
        results: QueryResult = connection.execute(
            "SELECT * FROM users WHERE id = $1 and username = $2",
            [100, "Alex"],
        )

        dict_results: list[dict[str, Any]] = results.result()
        assert dict_results[0]["username"] == "Alex"

        # "Execute Many"
        connection.execute_many(
            "INSERT INTO users (name, age) VALUES ($1, $2)",
            [["boba", 10], ["boba", 20]],
        )
        assert connection.fetch_val(
            "SELECT COUNT(*) FROM users WHERE name = $1", ["boba"]) == 2

        # "Fetch Row"
        transaction = connection  # (the docs' example names it transaction)
        query_result: SingleQueryResult = transaction.fetch_row(
            "SELECT username FROM users WHERE id = $1",
            [100],
        )
        dict_result: dict[Any, Any] = query_result.result()
        assert dict_result == {"username": "Alex"}

        # "Fetch Val"
        # this will be an int value
        query_result_value = connection.fetch_val(
            "SELECT COUNT(*) FROM users WHERE id > $1",
            [100],
        )
        assert query_result_value == 1

        # "Back To Pool"
        connection.back_to_pool()

    main()
    assert db_pool.status().available == 1
    db_pool.close()


def test_documented_listener_examples(db):
    server, name = db
    db_pool = ConnectionPool(
        dsn=f"postgres://postgres:postgres@{server.host}:{server.port}/{name}",
    )
    got: list[tuple[str, str, int]] = []

    def test_channel_callback(
        connection: Connection,
        payload: str,
        channel: str,
        process_id: int,
    ) -> None:
        # do some important staff
        got.append((payload, channel, process_id))

    # "Background task", synchronous: listen() runs the callbacks in its thread
    def main() -> None:
        # Create listener object
        listener: Listener = db_pool.listener()

        # Add channel to listen and callback for it.
        listener.add_callback(
            channel="test_channel",
            callback=test_channel_callback,
        )

        # Startup the listener
        listener.startup()

        # Start listening.
        t = threading.Thread(target=listener.listen)
        t.start()
        notifier = psycopg2.connect(server.dsn(dbname=name))
        notifier.autocommit = True
        with notifier.cursor() as cur:
            cur.execute("NOTIFY test_channel, 'hello'")
        notifier.close()
        assert wait_until(lambda: got, 5)

        # You can stop listening.
        listener.abort_listen()
        t.join(5)
        listener.shutdown()

    main()
    assert got[0][:2] == ("hello", "test_channel")

    # "Async Iterator", synchronous
    def main() -> None:
        # Create listener object
        listener: Listener = db_pool.listener()

        # Startup the listener
        listener.startup()
        listener.add_callback("other", lambda *args: None)
        notifier = psycopg2.connect(server.dsn(dbname=name))
        notifier.autocommit = True
        with notifier.cursor() as cur:
            cur.execute("NOTIFY other, 'x'")
        notifier.close()

        listener_msg: ListenerNotificationMsg
        for listener_msg in listener:
            assert (listener_msg.channel, listener_msg.payload) == ("other", "x")
            break
        listener.shutdown()

    main()
    db_pool.close()


# -- the mapping -----------------------------------------------------------------------------------


def test_parameters_map_to_libpq_and_a_dsn_overrides_the_separate_ones():
    dsn, kw, placement = libpq_params(
        username="u", password="p", hosts=["a", "b"], ports=[1, 2], db_name="d",
        target_session_attrs="read-write", options="-c x=1", application_name="app",
        connect_timeout_sec=1, connect_timeout_nanosec=500_000_000, tcp_user_timeout_sec=2,
        keepalives=True, keepalives_idle_sec=30, keepalives_interval_sec=5,
        keepalives_retries=3, load_balance_hosts="random", ssl_mode="require", ca_file="/ca")
    assert dsn is None and placement == "random"
    assert kw == {"user": "u", "password": "p", "host": "a,b", "port": "1,2", "dbname": "d",
                  "target_session_attrs": "read-write", "options": "-c x=1",
                  "application_name": "app", "connect_timeout": 2, "tcp_user_timeout": 2000,
                  "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 5,
                  "keepalives_count": 3, "sslmode": "require", "sslrootcert": "/ca"}
    dsn, kw, _ = libpq_params(dsn="postgres://x@h/db", username="ignored", host="ignored",
                              port=9, db_name="ignored", password="ignored",
                              target_session_attrs="read-only", application_name="kept")
    assert dsn == "postgres://x@h/db" and kw == {"application_name": "kept"}
    with pytest.raises(ValueError, match="only with connect_timeout_sec"):
        libpq_params(connect_timeout_nanosec=5)
    with pytest.raises(ValueError, match="host or hosts"):
        libpq_params(host="a", hosts=["b"])


def test_a_dsn_wins_over_separate_parameters_on_a_real_server(db):
    server, name = db
    with PsqlpyPool(dsn=server.dsn(dbname=name), db_name="postgres", username="nobody",
                    port=1, application_name="psqlpy-compat") as pool:
        row = pool.connection()
        got = row.fetch_row("SELECT current_database() AS db, "
                            "current_setting('application_name') AS app").result()
        row.back_to_pool()
    assert got == {"db": name, "app": "psqlpy-compat"}


def test_recycling_methods(db):
    server, name = db
    for method, recycle, borrow in [(None, "fast", False),
                                    (ConnRecyclingMethod.Fast, "fast", False),
                                    (ConnRecyclingMethod.Verified, "verified", True),
                                    ("clean", "clean", True)]:
        pool = PsqlpyPool(dsn=server.dsn(dbname=name), conn_recycling_method=method)
        assert pool.pool.recycle == recycle and pool.pool.test_on_borrow is borrow
        pool.close()
    with pytest.raises(ValueError, match="Fast, Verified or Clean"):
        PsqlpyPool(dsn="dbname=x", conn_recycling_method="slow")
    with PsqlpyPool(dsn=server.dsn(dbname=name), conn_recycling_method="clean",
                    max_db_pool_size=1) as pool:
        with pool.acquire() as conn:
            conn.raw.autocommit = True
            conn.execute("SET application_name = 'dirty'")
        with pool.acquire() as conn:
            assert conn.fetch_val("SELECT current_setting('application_name')") == ""


def test_errors_roll_back_and_the_connection_stays_usable(db):
    server, name = db
    with PsqlpyPool(dsn=server.dsn(dbname=name), max_db_pool_size=1) as pool:
        with pool.acquire() as conn:
            with pytest.raises(psycopg2.errors.UndefinedTable):
                conn.execute("SELECT * FROM nope")
            assert conn.fetch_val("SELECT 1") == 1
            with pytest.raises(psycopg2.Error):
                conn.execute_many("INSERT INTO users (id) VALUES ($1)", [[1], ["x"]])
            assert conn.fetch_val("SELECT count(*) FROM users WHERE id = 1") == 0
            with pytest.raises(Exception, match="exactly one row"):
                conn.fetch_row("SELECT * FROM users")
            assert conn.fetch_val("SELECT '100%' || $1", ["!"]) == "100%!"
        with pytest.raises(Exception, match="given back"):
            conn.execute("SELECT 1")
        assert pool.status().available == 1
