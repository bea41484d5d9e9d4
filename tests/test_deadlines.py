"""A timeout is one deadline for the whole call (issue 11): ``getconn(timeout=T)`` returns or
raises within T + 0.2 s whatever the server does: refuses, hangs at connect (a socket that
accepts and never speaks), or freezes (SIGSTOP) while the pool pings its idle connections or
after the caller waited at ``maxconn`` and was then handed a free slot. libpq's
``connect_timeout`` is whole seconds; a sub-second budget is the pool's to keep. The error says
how long the caller waited."""

from __future__ import annotations

import re
import threading
import time

import psycopg2
import pytest
from helpers import wait_until
from pgregistry.pools import ConnectionPool
from reliability import (
    books_exact,
    new_app,
)

SLACK_S = 0.2
TIMEOUTS = (0.05, 1.0, 2.0)
_WAITED = re.compile(r"\b\d+\.\d{2,3} s\b")  # "... after 1.003 s ..."


def _timed_getconn(pool: ConnectionPool, timeout: float) -> tuple[float, BaseException | None]:
    t0 = time.monotonic()
    try:
        conn = pool.getconn(timeout=timeout)
    except psycopg2.Error as exc:
        return time.monotonic() - t0, exc
    took = time.monotonic() - t0
    pool.putconn(conn)
    return took, None


def _check(took: float, err: BaseException | None, timeout: float, what: str) -> None:
    print(f"\nRELIABILITY: getconn(timeout={timeout:g}), {what}: {took:.3f} s")
    assert took <= timeout + SLACK_S, f"{what}: getconn(timeout={timeout}) took {took:.3f} s"
    assert err is not None, f"{what}: getconn succeeded?"
    assert _WAITED.search(str(err)), f"the error does not say how long the caller waited: {err}"


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_refused(dead_port, supervisor, closer, timeout):
    pool = ConnectionPool(minconn=0, maxconn=2, supervisor=supervisor, timeout=30,
                          dsn=f"host=127.0.0.1 port={dead_port} user=postgres")
    closer(pool)
    took, err = _timed_getconn(pool, timeout)
    _check(took, err, timeout, "refused")


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_hanging_connect(hanging_port, supervisor, closer, timeout):
    pool = ConnectionPool(minconn=0, maxconn=2, supervisor=supervisor, timeout=30,
                          dsn=f"host=127.0.0.1 port={hanging_port} user=postgres",
                          connect_timeout=5)
    closer(pool)
    took, err = _timed_getconn(pool, timeout)
    _check(took, err, timeout, "hanging connect")


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_waited_at_maxconn_then_the_connect_hangs(solo_server, supervisor, closer, timeout):
    app = new_app("wait-then-hang")
    pool = ConnectionPool(minconn=0, maxconn=1, supervisor=supervisor, dsn=solo_server.dsn(),
                          application_name=app, connect_timeout=5, timeout=30)
    closer(pool)
    held = pool.getconn()
    result: list[tuple[float, BaseException | None]] = []
    waiter = threading.Thread(target=lambda: result.append(_timed_getconn(pool, timeout)))
    solo_server.freeze()
    try:
        waiter.start()
        assert wait_until(lambda: pool.stats()["waiting"] == 1, 5)
        time.sleep(timeout / 2)  # the waiter has spent half its budget waiting
        pool.putconn(held, close=True)  # a freed slot: the waiter opens a connection
        waiter.join(timeout + 5)
    finally:
        solo_server.thaw()
    waiter.join(10)
    assert result
    _check(*result[0], timeout, "waited, then a hanging connect")
    assert not books_exact(pool, solo_server, app)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_frozen_mid_ping(solo_server, supervisor, closer, timeout):
    app = new_app("frozen-ping")
    pool = ConnectionPool(minconn=4, maxconn=5, supervisor=supervisor, dsn=solo_server.dsn(),
                          application_name=app, connect_timeout=5, timeout=30,
                          validation_bypass=0, ping_timeout=5)
    closer(pool)
    assert wait_until(lambda: pool.stats()["idle"] == 4, 5)
    solo_server.freeze()
    try:
        took, err = _timed_getconn(pool, timeout)
    finally:
        solo_server.thaw()
    _check(took, err, timeout, "frozen mid-ping")
    assert not books_exact(pool, solo_server, app)
