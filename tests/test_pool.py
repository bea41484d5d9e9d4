"""ConnectionPool against a real PostgreSQL primary.

Timing behaviour (lifetime, idle, backoff) runs on a FakeClock with explicit supervisor steps;
tests that need real waiting use events and bounded timeouts."""

from __future__ import annotations

import gc
import logging
import random
import threading
import time

import psycopg2
import psycopg2.extensions as ext
import pytest
from helpers import hold, run_load_for, wait_until
from pgregistry.pools import (
    BadConnectionError,
    ConnectError,
    ConnectionPool,
    PoolClosed,
    PoolError,
    PoolTimeout,
    PoolTooManyWaiters,
    workers,
)

SECRET = "Sentinel-Pa55word-do-not-leak"




def pid(conn) -> int:
    return conn.info.backend_pid


# -- basics -----------------------------------------------------------------------------------


def test_checkout_query_return(make_pool):
    pool = make_pool(minconn=0, maxconn=2)
    with pool.conn() as conn, conn.cursor() as cur:
        cur.execute("SELECT 41 + 1")
        assert cur.fetchone() == (42,)
    s = pool.stats()
    assert (s["size"], s["idle"], s["in_use"], s["checkouts"]) == (1, 1, 0, 1)


def test_readme_example_of_psycopg2_pool2(pg_server, stepped):
    # The seed's README example, unchanged but for the import (and the server's address).
    from pgregistry.pools import ConnectionPool

    pool = ConnectionPool(
        minconn=1,
        maxconn=10,
        idle_timeout=300,
        reap_idle_interval=300,
        lifetime_timeout=86400,
        test_on_borrow=True,
        background_prewarm=True,
        dsn=pg_server.dsn(),  # the seed: "dbname=postgres user=postgres"
    )
    try:
        with pool.conn() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
            conn.rollback()
    finally:
        pool.close()


def test_background_prewarm_opens_minconn_on_the_supervisor(make_pool, pg_server, stepped):
    pool = make_pool(minconn=3, maxconn=5)
    assert pool.stats()["size"] == 0  # nothing opened in the constructor
    stepped.run_until_idle()
    assert pool.stats()["size"] == 3
    assert pg_server.backend_count(pool.app) == 3


def test_blocking_prewarm_opens_in_constructor(make_pool, pg_server):
    pool = make_pool(minconn=2, maxconn=4, background_prewarm=False)
    assert pool.stats()["idle"] == 2
    assert pg_server.backend_count(pool.app) == 2


def test_blocking_prewarm_raises_on_unreachable_server(make_pool, dead_port):
    with pytest.raises(ConnectError) as info:
        make_pool(
            minconn=2, dsn=f"host=127.0.0.1 port={dead_port} user=u password={SECRET}",
            background_prewarm=False, name="unreachable",
        )
    err = info.value
    assert isinstance(err, PoolError) and isinstance(err, psycopg2.OperationalError)
    assert "unreachable" in str(err) and f"127.0.0.1:{dead_port}" in str(err)
    assert SECRET not in str(err) and SECRET not in repr(err)
    assert isinstance(err.__cause__, psycopg2.OperationalError)


def test_configure_and_autocommit_run_once_per_new_connection(make_pool):
    seen = []

    def configure(conn):
        seen.append(pid(conn))
        with conn.cursor() as cur:
            cur.execute("SET application_name TO 'configured'")

    pool = make_pool(minconn=0, maxconn=2, configure=configure, autocommit=True)
    for _ in range(3):
        with pool.conn() as conn, conn.cursor() as cur:
            assert conn.autocommit
            cur.execute("SHOW application_name")
            assert cur.fetchone() == ("configured",)
    assert len(seen) == 1


def test_configure_leaving_a_transaction_open_is_a_clear_error(make_pool):
    def configure(conn):
        with conn.cursor() as cur:
            cur.execute("SELECT 1")  # opens a transaction and leaves it

    pool = make_pool(minconn=0, maxconn=2, configure=configure, name="cfg")
    with pytest.raises(PoolError, match="configure left the connection in a transaction"):
        pool.getconn()
    assert pool.stats()["size"] == 0


# -- timeouts and waiting ---------------------------------------------------------------------


def test_timeout_zero_raises_at_once_with_the_figures(make_pool):
    pool = make_pool(minconn=0, maxconn=1, name="tiny")
    held = pool.getconn()
    t0 = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        pool.getconn(timeout=0)
    assert time.monotonic() - t0 < 0.05
    msg = str(info.value)
    assert "tiny" in msg and "size=1/1" in msg and "in_use=1" in msg and "waiting=0" in msg
    assert info.value.counts["in_use"] == 1
    pool.putconn(held)
    assert pool.stats()["checkout_timeouts"] == 1


def test_timeout_waits_then_says_how_long(make_pool):
    pool = make_pool(minconn=0, maxconn=1, name="waity")
    held = pool.getconn()
    with pytest.raises(PoolTimeout) as info:
        pool.getconn(timeout=0.1)
    assert 0.09 <= info.value.waited_s < 2
    assert "after waiting 0.1" in str(info.value)
    pool.putconn(held)
    s = pool.stats()
    assert s["waiting"] == 0 and s["checkout_timeouts"] == 1


def test_timeout_error_carries_last_connect_error(make_pool, dead_port):
    pool = make_pool(minconn=0, maxconn=1, dsn=f"host=127.0.0.1 port={dead_port} user=u")
    with pytest.raises(ConnectError):
        pool.getconn()
    # now nothing is open; a second caller gets the connect error, not a timeout
    with pytest.raises(ConnectError) as info:
        pool.getconn(timeout=0)
    assert pool.stats()["connect_errors"] == 2
    assert "Connection refused" in str(info.value) or "connect" in str(info.value)


def test_max_waiting_refuses_at_once(make_pool):
    pool = make_pool(minconn=0, maxconn=1, max_waiting=1)
    held = pool.getconn()
    started = threading.Event()
    result = []

    def waiter():
        started.set()
        try:
            result.append(pool.getconn(timeout=5))
        except PoolError as exc:  # pragma: no cover
            result.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    assert started.wait(5)
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    with pytest.raises(PoolTooManyWaiters, match="max_waiting=1"):
        pool.getconn(timeout=5)
    pool.putconn(held)
    t.join(5)
    assert result and result[0] is held  # handed straight to the waiter
    pool.putconn(held)


def test_waiters_are_served_in_arrival_order(make_pool):
    pool = make_pool(minconn=0, maxconn=1)
    held = pool.getconn()
    order = []
    threads = []
    for i in range(6):
        def run(i=i):
            conn = pool.getconn(timeout=10)
            order.append(i)
            pool.putconn(conn)

        t = threading.Thread(target=run)
        t.start()
        threads.append(t)
        assert wait_until(lambda i=i: pool.stats()["waiting"] == i + 1)
    pool.putconn(held)
    for t in threads:
        t.join(10)
    assert order == list(range(6))


def test_a_returned_connection_goes_to_the_oldest_waiter_not_a_newcomer(make_pool):
    pool = make_pool(minconn=0, maxconn=1)
    held = pool.getconn()
    got = []
    t = threading.Thread(target=lambda: got.append(pool.getconn(timeout=10)))
    t.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    pool.putconn(held)
    # a newcomer arriving right after the return finds nothing idle: it was handed over
    with pytest.raises(PoolTimeout):
        pool.getconn(timeout=0)
    t.join(10)
    assert got == [held]
    pool.putconn(held)


def test_timed_out_waiters_never_swallow_connections(make_pool, pg_server):
    pool = make_pool(minconn=0, maxconn=2)
    stop = time.monotonic() + 1.5
    errors = []

    def churn():
        rnd = random.Random()
        while time.monotonic() < stop:
            try:
                conn = pool.getconn(timeout=rnd.choice([0, 0.001, 0.002, 0.005]))
            except PoolTimeout:
                continue
            except ConnectError as exc:  # a connect longer than the caller's few ms
                if "deadline" not in str(exc):
                    errors.append(exc)
                    return
                continue
            except Exception as exc:  # pragma: no cover
                errors.append(exc)
                return
            hold(rnd.random() * 0.002)
            pool.putconn(conn)

    threads = [threading.Thread(target=churn) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    s = pool.stats()
    assert s["checkout_timeouts"] > 0  # the race was exercised
    assert (s["in_use"], s["waiting"]) == (0, 0)
    # nothing lost to a waiter that had left (a connect is bounded by its caller's few ms:
    # under load none may have succeeded)
    assert s["idle"] == s["size"]
    assert wait_until(lambda: pg_server.backend_count(pool.app) == s["size"])
    for _ in range(s["size"]):
        pool.getconn(timeout=0)  # all really available


# -- maxconn under threads, fairness ----------------------------------------------------------


def test_stress_64_threads_never_exceed_maxconn_nor_share_a_connection(make_pool, pg_server):
    maxconn = 8
    pool = make_pool(minconn=2, maxconn=maxconn, timeout=30)
    holders: dict[int, int] = {}
    closed_pids: set[int] = set()
    lock = threading.Lock()
    shared = []
    errors = []
    max_seen_server = 0
    done = threading.Event()

    def sampler():
        nonlocal max_seen_server
        probe = pg_server.connect()
        try:
            with probe.cursor() as cur:
                while not done.is_set():
                    # A backend the client closed lingers a moment in pg_stat_activity after
                    # its slot was reused: count only those not closed on purpose.
                    with lock:
                        gone = list(closed_pids) or [0]
                    cur.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE application_name = %s AND pid <> ALL(%s)",
                        (pool.app, gone),
                    )
                    max_seen_server = max(max_seen_server, cur.fetchone()[0])
        finally:
            probe.close()

    def worker(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(60):
                conn = pool.getconn()
                me = threading.get_ident()
                with lock:
                    if id(conn) in holders:
                        shared.append((holders[id(conn)], me))
                    holders[id(conn)] = me
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_backend_pid()")
                    assert cur.fetchone()[0] == pid(conn)
                if rnd.random() < 0.3:
                    hold(rnd.random() * 0.001)
                close = rnd.random() < 0.02
                with lock:
                    del holders[id(conn)]
                    if close:
                        closed_pids.add(pid(conn))
                pool.putconn(conn, close=close)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    s = threading.Thread(target=sampler)
    s.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    s.join(10)
    assert not errors
    assert not shared
    assert 0 < max_seen_server <= maxconn
    st = pool.stats()
    assert st["size"] <= maxconn and st["size"] == st["idle"] + st["in_use"] + st["opening"]
    assert st["checkouts"] == 64 * 60
    assert wait_until(lambda: pg_server.backend_count(pool.app) == st["size"])


def test_fairness_32_threads_on_a_pool_of_8(make_pool):
    pool = make_pool(minconn=8, maxconn=8, background_prewarm=False, timeout=30)
    counts = [0] * 32
    start = threading.Barrier(33)
    stop = threading.Event()

    def worker(i):
        start.wait()
        while not stop.is_set():
            with pool.conn() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    start.wait()
    run_load_for(1.5)
    stop.set()
    for t in threads:
        t.join(30)
    total = sum(counts)
    jain = total * total / (32 * sum(c * c for c in counts))
    assert min(counts) > 0, counts  # no thread starves
    assert min(counts) >= 0.5 * total / 32, counts
    assert jain >= 0.95, (jain, counts)


# -- reuse order --------------------------------------------------------------------------------


@pytest.mark.parametrize("reuse", ["fifo", "lifo"])
def test_reuse_order(make_pool, reuse):
    pool = make_pool(minconn=0, maxconn=3, reuse=reuse)
    conns = [pool.getconn() for _ in range(3)]
    pids = [pid(c) for c in conns]
    for c in conns:
        pool.putconn(c)
    nxt = pool.getconn()
    assert pid(nxt) == (pids[0] if reuse == "fifo" else pids[-1])
    pool.putconn(nxt)


# -- lifetime and idle (fake clock) ------------------------------------------------------------


def test_lifetimes_are_jittered_within_ten_percent(make_pool, stepped):
    pool = make_pool(minconn=0, maxconn=20, lifetime_timeout=1000, rng=random.Random(7))
    conns = [pool.getconn() for _ in range(20)]
    now = stepped.clock.monotonic()
    lifetimes = [e.expires_at - e.created_at for e in pool._bag.entries.values()]
    assert all(900 <= x <= 1100 for x in lifetimes)
    assert len({round(x, 6) for x in lifetimes}) == 20  # each its own
    assert min(lifetimes) < 960 and max(lifetimes) > 1040  # really spread
    assert all(e.created_at == now for e in pool._bag.entries.values())
    for c in conns:
        pool.putconn(c)


def test_jitter_fraction_is_configurable(make_pool):
    pool = make_pool(minconn=0, maxconn=5, lifetime_timeout=100, lifetime_jitter=0.0)
    c = pool.getconn()
    (e,) = pool._bag.entries.values()
    assert e.expires_at - e.created_at == 100
    pool.putconn(c)


def test_expired_idle_connections_are_closed_by_the_supervisor_and_replaced(
    make_pool, pg_server, stepped
):
    pool = make_pool(minconn=2, maxconn=4, lifetime_timeout=100)
    stepped.run_until_idle()
    old = {e.backend_pid for e in pool._bag.entries.values()}
    assert len(old) == 2
    stepped.clock.advance(89)
    stepped.run_until_idle()
    assert {e.backend_pid for e in pool._bag.entries.values()} == old  # not yet
    stepped.clock.advance(22)  # past 110 s: every lifetime is over
    stepped.run_until_idle()
    new = {e.backend_pid for e in pool._bag.entries.values()}
    assert len(new) == 2 and not (new & old)
    assert pool.stats()["closed_by_reason"] == {"lifetime": 2}
    assert wait_until(lambda: pg_server.backend_count(pool.app) == 2)


def test_expired_idle_connection_is_never_handed_out(make_pool, stepped):
    pool = make_pool(minconn=0, maxconn=2, lifetime_timeout=100)
    c = pool.getconn()
    old = pid(c)
    pool.putconn(c)
    stepped.clock.advance(120)  # no supervisor step: the checkout itself must notice
    c2 = pool.getconn()
    assert pid(c2) != old
    assert pool.stats()["closed_by_reason"] == {"lifetime": 1}
    pool.putconn(c2)


def test_expired_checked_out_connection_is_closed_on_return_not_taken(make_pool, stepped):
    pool = make_pool(minconn=0, maxconn=2, lifetime_timeout=100)
    c = pool.getconn()
    stepped.clock.advance(200)
    stepped.run_until_idle()
    with c.cursor() as cur:  # still the user's, still working
        cur.execute("SELECT 1")
    assert not c.closed
    pool.putconn(c)
    assert c.closed
    assert pool.stats()["closed_by_reason"] == {"lifetime": 1}
    assert pool.stats()["size"] == 0


def test_idle_reaping_above_minconn_every_interval(make_pool, pg_server, stepped):
    pool = make_pool(minconn=1, maxconn=5, idle_timeout=60, reap_idle_interval=30)
    conns = [pool.getconn() for _ in range(5)]
    for c in conns:
        pool.putconn(c)
    stepped.run_until_idle()
    assert pool.stats()["size"] == 5
    stepped.clock.advance(59)
    stepped.run_until_idle()
    assert pool.stats()["size"] == 5  # not idle long enough yet
    stepped.clock.advance(31)  # idle 90 s, and a reap tick has passed
    stepped.run_until_idle()
    s = pool.stats()
    assert s["size"] == 1 and s["closed_by_reason"] == {"idle": 4}
    assert wait_until(lambda: pg_server.backend_count(pool.app) == 1)


def test_reap_idle_connections_by_hand(make_pool, stepped):
    pool = make_pool(minconn=0, maxconn=3, idle_timeout=10, reap_idle_interval=0)
    conns = [pool.getconn() for _ in range(3)]
    for c in conns:
        pool.putconn(c)
    stepped.clock.advance(1000)
    stepped.run_until_idle()
    assert pool.stats()["size"] == 3  # interval 0: the supervisor does not reap
    assert pool.reap_idle_connections() == 3
    assert pool.stats()["size"] == 0


def test_prewarm_backs_off_on_connect_failure(make_pool, dead_port, stepped):
    pool = make_pool(minconn=1, maxconn=2, dsn=f"host=127.0.0.1 port={dead_port} user=u",
                     reconnect_backoff=1.0, reconnect_backoff_max=8.0, rng=random.Random(1))
    attempts = []
    for _ in range(12):
        stepped.run_until_idle()
        attempts.append(pool.stats()["connect_errors"])
        stepped.clock.advance(1.0)
    # 1, 2, 4, 8, 8 s apart (±10%): far fewer than one attempt per second
    assert 4 <= attempts[-1] <= 6, attempts
    assert pool._task.due is not None and pool._task.due - stepped.clock.monotonic() <= 60


# -- test-on-borrow ---------------------------------------------------------------------------


def test_killed_backend_is_caught_by_test_on_borrow(make_pool, pg_server, stepped):
    pool = make_pool(minconn=0, maxconn=2)
    c = pool.getconn()
    victim = pid(c)
    pool.putconn(c)
    pg_server.execute("SELECT pg_terminate_backend(%s)", (victim,))
    assert wait_until(lambda: pg_server.backend_count(pool.app) == 0)
    stepped.clock.advance(1.0)  # past validation_bypass
    t0 = time.monotonic()
    c2 = pool.getconn()
    assert time.monotonic() - t0 < 1.0  # another one, without delay
    assert pid(c2) != victim
    with c2.cursor() as cur:
        cur.execute("SELECT 1")
    pool.putconn(c2)
    assert pool.stats()["closed_by_reason"] == {"validation": 1}


def test_hot_connection_is_not_pinged(make_pool, stepped, monkeypatch):
    pool = make_pool(minconn=0, maxconn=1, validation_bypass=0.5)
    pings = []
    real_ping = pool._ping
    monkeypatch.setattr(pool, "_ping", lambda *a: pings.append(1) or real_ping(*a))
    c = pool.getconn()  # new: never pinged
    pool.putconn(c)
    for _ in range(5):
        stepped.clock.advance(0.1)
        pool.putconn(pool.getconn())
    assert pings == []
    stepped.clock.advance(0.6)
    pool.putconn(pool.getconn())
    assert pings == [1]


def test_test_on_borrow_off_hands_out_without_ping(make_pool, stepped, monkeypatch):
    pool = make_pool(minconn=0, maxconn=1, test_on_borrow=False)
    monkeypatch.setattr(pool, "_ping", lambda *a: pytest.fail("pinged"))
    pool.putconn(pool.getconn())
    stepped.clock.advance(100)
    pool.putconn(pool.getconn())


# -- returning ----------------------------------------------------------------------------------


def test_uncommitted_work_is_rolled_back_never_committed(make_pool, clean_db):
    pool = make_pool(minconn=0, maxconn=1)
    c = pool.getconn()
    with c.cursor() as cur:
        cur.execute("INSERT INTO pgr_scratch (v) VALUES ('left open')")
    assert c.get_transaction_status() == ext.TRANSACTION_STATUS_INTRANS
    pool.putconn(c)
    assert c.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE
    assert clean_db.execute("SELECT count(*) FROM pgr_scratch") == [(0,)]
    assert pool.stats()["rollbacks"] == 1
    with pool.conn() as c2:
        assert c2 is c  # kept: a rollback is not a reason to discard


def test_connection_in_error_state_is_rolled_back_and_kept(make_pool):
    pool = make_pool(minconn=0, maxconn=1)
    c = pool.getconn()
    with pytest.raises(psycopg2.errors.DivisionByZero), c.cursor() as cur:
        cur.execute("SELECT 1/0")
    pool.putconn(c)
    with pool.conn() as c2, c2.cursor() as cur:
        assert c2 is c
        cur.execute("SELECT 1")


def test_closed_connection_is_discarded_and_its_slot_freed(make_pool):
    pool = make_pool(minconn=0, maxconn=1)
    c = pool.getconn()
    c.close()
    pool.putconn(c)
    s = pool.stats()
    assert (s["size"], s["closed_by_reason"]) == (0, {"broken": 1})
    pool.putconn(pool.getconn(timeout=0))


def test_conn_context_discards_a_connection_the_exception_broke(make_pool, pg_server):
    pool = make_pool(minconn=0, maxconn=1)
    with pytest.raises(psycopg2.OperationalError), pool.conn() as c, c.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    assert c.closed
    assert pool.stats()["closed_by_reason"] == {"broken": 1}
    with pool.conn(timeout=0) as c2, c2.cursor() as cur:
        cur.execute("SELECT 1")


def test_putconn_close_true(make_pool, pg_server):
    pool = make_pool(minconn=0, maxconn=1)
    c = pool.getconn()
    pool.putconn(c, close=True)
    assert c.closed and pool.stats()["size"] == 0
    assert wait_until(lambda: pg_server.backend_count(pool.app) == 0)


def test_bad_putconn_raises_and_leaves_the_pool_intact(make_pool, pg_server):
    pool = make_pool(minconn=0, maxconn=2, name="strict")
    other = make_pool(minconn=0, maxconn=1)
    c = pool.getconn()
    pool.putconn(c)
    before = pool.stats()
    with pytest.raises(BadConnectionError, match="returned twice"):
        pool.putconn(c)
    foreign = other.getconn()
    with pytest.raises(BadConnectionError, match="not given out by this pool"):
        pool.putconn(foreign)
    stray = pg_server.connect()
    with pytest.raises(BadConnectionError, match="not given out by this pool"):
        pool.putconn(stray)
    with pytest.raises(BadConnectionError, match="takes a connection"):
        pool.putconn("not a connection")  # type: ignore[arg-type]
    assert issubclass(BadConnectionError, PoolError) and issubclass(PoolError, psycopg2.Error)
    assert pool.stats() == before
    assert not foreign.closed and not stray.closed  # nothing was done to them
    other.putconn(foreign)
    stray.close()
    a, b = pool.getconn(timeout=0), pool.getconn(timeout=0)
    assert a is c and b is not c  # the pool still works, and still has its connection
    pool.putconn(a)
    pool.putconn(b)


def test_garbage_collected_checkout_frees_its_slot(make_pool, pg_server, caplog):
    pool = make_pool(minconn=0, maxconn=1)
    c = pool.getconn()
    victim = pid(c)
    del c
    gc.collect()
    with pytest.raises(PoolError):
        pool.putconn(object())  # unrelated call: the pool keeps working
    c2 = pool.getconn(timeout=1)
    assert pid(c2) != victim
    assert pool.stats()["closed_by_reason"] == {"garbage_collected": 1}
    assert "garbage-collected" in caplog.text
    assert wait_until(lambda: pg_server.backend_count(pool.app) == 1)
    pool.putconn(c2)


def test_garbage_collected_checkout_wakes_a_waiter(make_pool):
    pool = make_pool(minconn=0, maxconn=1, supervisor=None)  # the real supervisor thread
    holder = [pool.getconn()]
    got = []
    t = threading.Thread(target=lambda: got.append(pool.getconn(timeout=10)))
    t.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    holder.clear()
    gc.collect()
    t.join(10)
    assert got and not got[0].closed
    pool.putconn(got[0])


# -- stats, status, resize, close --------------------------------------------------------------


def test_stats_and_status(make_pool):
    pool = make_pool(minconn=0, maxconn=3)
    c = pool.getconn()
    s = pool.stats()
    for key in ("minconn", "maxconn", "size", "idle", "in_use", "waiting", "connections_opened",
                "connections_closed", "closed_by_reason", "checkouts", "checkout_timeouts",
                "connect_errors", "wait_total_s", "wait_max_s"):
        assert key in s
    assert pool.status() == {"max_size": 3, "size": 1, "available": 0, "waiting": 0}
    pool.putconn(c)
    assert pool.status() == {"max_size": 3, "size": 1, "available": 1, "waiting": 0}


def test_resize_grows_live_and_serves_waiters(make_pool):
    pool = make_pool(minconn=0, maxconn=1)
    held = pool.getconn()
    got = []
    t = threading.Thread(target=lambda: got.append(pool.getconn(timeout=10)))
    t.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    pool.resize(2)
    t.join(10)
    assert got and got[0] is not held
    assert pool.stats()["size"] == 2
    pool.putconn(held)
    pool.putconn(got[0])


def test_resize_shrinks_idle_now_and_busy_on_return(make_pool, stepped):
    pool = make_pool(minconn=0, maxconn=4)
    conns = [pool.getconn() for _ in range(4)]
    for c in conns[:2]:
        pool.putconn(c)
    pool.resize(1)
    s = pool.stats()
    assert (s["size"], s["idle"], s["in_use"]) == (2, 0, 2)
    pool.putconn(conns[2])
    assert conns[2].closed and pool.stats()["size"] == 1
    pool.putconn(conns[3])
    assert not conns[3].closed and pool.stats()["size"] == 1
    with pytest.raises(ValueError, match="minconn"):
        pool.resize(2, minconn=3)


def test_resize_minconn_prewarms(make_pool, stepped):
    pool = make_pool(minconn=0, maxconn=4)
    pool.resize(4, minconn=3)
    stepped.run_until_idle()
    assert pool.stats()["size"] == 3


def test_close_is_idempotent_and_later_calls_name_the_pool(make_pool, pg_server):
    pool = make_pool(minconn=2, maxconn=3, background_prewarm=False, name="shut")
    held = pool.getconn()
    pool.close()
    pool.close()
    assert pool.closed
    with pytest.raises(PoolClosed, match="'shut' is closed"):
        pool.getconn()
    assert not held.closed  # never taken from its user...
    pool.putconn(held)  # ...closed when it comes back
    assert held.closed
    assert wait_until(lambda: pg_server.backend_count(pool.app) == 0)


def test_close_wakes_waiters_with_pool_closed(make_pool):
    pool = make_pool(minconn=0, maxconn=1)
    held = pool.getconn()
    errs = []

    def wait():
        try:
            pool.getconn(timeout=10)
        except PoolClosed as exc:
            errs.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    pool.close()
    t.join(5)
    assert len(errs) == 1
    pool.putconn(held)


def test_pool_as_context_manager(make_pool):
    pool = make_pool(minconn=1, maxconn=2, background_prewarm=False)
    with pool, pool.conn() as c, c.cursor() as cur:
        cur.execute("SELECT 1")
    assert pool.closed


def test_bad_arguments_are_clear(make_pool):
    with pytest.raises(ValueError, match=r"minconn \(5\) must not exceed maxconn \(2\)"):
        ConnectionPool(5, 2, dsn="")
    with pytest.raises(ValueError, match="reuse"):
        ConnectionPool(0, 2, reuse="random", dsn="")
    with pytest.raises(ValueError, match="idle_timeout"):
        ConnectionPool(0, 2, idle_timeout=-1, dsn="")
    with pytest.raises(ValueError, match="invalid dsn") as info:
        ConnectionPool(0, 2, dsn=f"postgresql://u:{SECRET}@h/db?bogus=1 x")
    assert SECRET not in str(info.value)


# -- secrets -------------------------------------------------------------------------------------


def test_password_never_shown(make_pool, pg_server, caplog, dead_port):
    caplog.set_level(logging.DEBUG)
    pool = make_pool(minconn=1, maxconn=1, background_prewarm=False,
                     dsn=pg_server.dsn(password=SECRET))
    c = pool.getconn()
    texts = [repr(pool), str(pool.stats()), repr(pool._connector)]
    with pytest.raises(PoolTimeout) as info:
        pool.getconn(timeout=0)
    texts += [str(info.value), repr(info.value)]
    pool.putconn(c)
    uri_pool = make_pool(minconn=0, maxconn=1,
                         dsn=f"postgresql://u:{SECRET}@127.0.0.1:{dead_port}/db")
    with pytest.raises(ConnectError) as info2:
        uri_pool.getconn()
    texts += [repr(uri_pool), str(info2.value), repr(info2.value), str(uri_pool.stats())]
    texts.append(caplog.text)
    for text in texts:
        assert SECRET not in text


# -- the one supervisor ------------------------------------------------------------------------


def test_one_supervisor_thread_for_ten_pools(pg_server):
    # one timekeeper; the connects it decides run on I/O workers, at most PER_KEY for one host,
    # which exit when idle
    before = {t.ident for t in threading.enumerate()
              if t.name not in ("pgregistry-supervisor", "pgregistry-io")}
    pools = [ConnectionPool(1, 2, dsn=pg_server.dsn(), name=f"ten-{i}") for i in range(10)]
    try:
        assert wait_until(lambda: all(p.stats()["size"] == 1 for p in pools))
        new = [t.name for t in threading.enumerate() if t.ident not in before]
        assert new.count("pgregistry-supervisor") == 1
        assert set(new) <= {"pgregistry-supervisor", "pgregistry-io"}
        assert new.count("pgregistry-io") <= workers.PER_KEY  # one host: two at most
        assert wait_until(lambda: not any(t.name == "pgregistry-io"
                                          for t in threading.enumerate()),
                          timeout=workers.IDLE_S + 5)
    finally:
        for p in pools:
            p.close()


def test_a_hanging_host_delays_other_pools_by_one_attempt_at_most(
    make_pool, hanging_port, stepped
):
    hung = make_pool(minconn=3, maxconn=3,
                     dsn=f"host=127.0.0.1 port={hanging_port} user=u connect_timeout=1")
    healthy = make_pool(minconn=3, maxconn=3)
    t0 = time.monotonic()
    stepped.run_until_idle()  # the clock stands still: only what is due now runs
    elapsed = time.monotonic() - t0
    assert healthy.stats()["size"] == 3
    assert hung.stats()["connect_errors"] == 1  # one attempt, then backoff
    assert elapsed < 2.5  # one connect_timeout (1 s), not three
    stepped.clock.advance(1.2)
    stepped.run_until_idle()
    assert hung.stats()["connect_errors"] == 2


def test_an_interrupted_waiter_gives_back_what_it_was_handed(make_pool):
    import ctypes

    pool = make_pool(minconn=0, maxconn=1)
    held = pool.getconn()
    outcome = []

    def wait():
        try:
            pool.getconn(timeout=10)
        except KeyboardInterrupt:
            outcome.append("interrupted")

    t = threading.Thread(target=wait)
    t.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    # hand the connection over and interrupt the waiter (blocked in Condition.wait, where the
    # exception is raised as it wakes) before it can take it
    with pool._bag.lock:
        e = pool._bag.entries[id(held)]
        pool._bag.out.discard(e)  # as putconn does, then straight to the waiter
        pool._bag.handoff_locked(e, held)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(t.ident), ctypes.py_object(KeyboardInterrupt)
        )
    t.join(10)
    assert outcome == ["interrupted"]
    s = pool.stats()
    assert (s["size"], s["idle"], s["in_use"], s["waiting"]) == (1, 1, 0, 0)
    assert pool.getconn(timeout=0) is held
    pool.putconn(held)


def test_a_closed_or_collected_pool_leaves_the_supervisor(pg_server, stepped):
    a = ConnectionPool(0, 2, dsn=pg_server.dsn(), supervisor=stepped)
    b = ConnectionPool(0, 2, dsn=pg_server.dsn(), supervisor=stepped)
    stepped.run_until_idle()
    assert stepped.scheduler.next_deadline() is not None
    a.close()
    del b
    gc.collect()
    stepped.clock.advance(120)
    stepped.run_until_idle()
    assert stepped.scheduler.next_deadline() is None  # nothing left on the schedule


# -- fork -------------------------------------------------------------------------------------


def test_forked_child_never_touches_the_parents_connections(make_pool, pg_server):
    import os

    pool = make_pool(minconn=2, maxconn=4, background_prewarm=False, supervisor=None)
    parent_pids = sorted(e.backend_pid for e in pool._bag.entries.values())
    held = pool.getconn()  # one checked out at the fork, too
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            with pool.conn(timeout=10) as c, c.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                got = cur.fetchone()[0]
            s = pool.stats()
            os.write(w, f"{got} {s['connections_opened']} {s['size']}".encode())
            pool.close()  # closing in the child must not close the parent's sessions
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(child, 0)
    report = os.read(r, 100).decode().split()
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    child_pid, child_opened, child_size = int(report[0]), int(report[1]), int(report[2])
    assert child_pid not in parent_pids and child_pid != pid(held)  # its own connection
    assert child_opened >= 1 and child_size >= 1  # the child's pool started afresh
    # the parent's connections are alive and still its own
    with held.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        assert cur.fetchone()[0] == pid(held)
    pool.putconn(held)
    conns = [pool.getconn() for _ in range(2)]
    for c in conns:
        with c.cursor() as cur:
            cur.execute("SELECT 1")
    assert {pid(c) for c in conns} <= set(parent_pids) | {pid(held)}  # reused, none broken
    for c in conns:
        pool.putconn(c)
    assert pool.stats()["closed_by_reason"] == {}


def test_chaos_lock_free_paths_against_maintenance(make_pool, pg_server, stepped):
    """Lock-free checkouts and returns racing every maintenance operation: never one
    connection in two hands, nothing lost, the books and the server agree at the end."""
    pool = make_pool(minconn=2, maxconn=6, timeout=10, lifetime_timeout=50, idle_timeout=5,
                     reap_idle_interval=1, validation_bypass=0.0)
    holders: dict[int, int] = {}
    lock = threading.Lock()
    shared, errors = [], []
    stop = threading.Event()

    def mark_held(conn):
        with lock:
            if id(conn) in holders:
                shared.append(id(conn))
            holders[id(conn)] = threading.get_ident()

    def mark_released(conn):
        with lock:
            holders.pop(id(conn), None)

    def worker(seed):
        rnd = random.Random(seed)
        while not stop.is_set():
            try:
                op = rnd.random()
                if op < 0.5:
                    conn = pool.getconn()
                    mark_held(conn)
                    if rnd.random() < 0.3:
                        with conn.cursor() as cur:
                            cur.execute("SELECT 1")
                    mark_released(conn)
                    pool.putconn(conn, close=rnd.random() < 0.05)
                else:
                    with pool.conn() as conn:
                        mark_held(conn)
                        mark_released(conn)
            except PoolTimeout:
                pass
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(repr(exc))

    def maintenance():
        rnd = random.Random(99)
        while not stop.is_set():
            try:
                op = rnd.random()
                if op < 0.3:
                    stepped.clock.advance(rnd.choice([0.1, 1.0, 7.0]))
                    stepped.run_due()
                elif op < 0.5:
                    pool.reap_idle_connections()
                elif op < 0.7:
                    pool.resize(rnd.choice([3, 6, 8]))
                elif op < 0.8:
                    pool.clear_idle()
                else:
                    pool.stats()
            except Exception as exc:  # pragma: no cover
                errors.append(repr(exc))
            hold(0.001)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    threads.append(threading.Thread(target=maintenance))
    for t in threads:
        t.start()
    run_load_for(2.0)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:5]
    assert not shared
    pool.resize(6)
    stepped.run_until_idle()
    s = pool.stats()
    assert s["in_use"] == 0 and s["waiting"] == 0 and s["opening"] == 0
    assert s["size"] == s["idle"] == len(pool._bag.entries) <= 6
    assert len(set(map(id, pool._bag.idle))) == len(pool._bag.idle)  # no entry queued twice
    assert wait_until(lambda: pg_server.backend_count(pool.app) == s["size"])
    for _ in range(s["size"]):
        pool.getconn(timeout=0)  # every idle one really is there


# -- leak detection ---------------------------------------------------------------------------


def test_leak_detection_warns_once_with_the_stack_that_checked_out(make_pool, stepped, caplog):
    caplog.set_level(logging.WARNING, logger="pools")
    pool = make_pool(minconn=0, maxconn=2, leak_detection_threshold=30)

    def checkout_site_for_the_test():
        return pool.getconn()

    held = checkout_site_for_the_test()
    quick = pool.getconn()
    pool.putconn(quick)  # returned in time: never reported
    stepped.clock.advance(29)
    stepped.run_until_idle()
    assert "checked out for" not in caplog.text
    stepped.clock.advance(2)
    stepped.run_until_idle()
    assert caplog.text.count("has been checked out for") == 1
    assert "checkout_site_for_the_test" in caplog.text  # the stack of the checkout
    stepped.clock.advance(100)
    stepped.run_until_idle()
    assert caplog.text.count("has been checked out for") == 1  # once per checkout
    assert pool.stats()["leaks_detected"] == 1
    pool.putconn(held)


def test_leak_detection_is_off_by_default_and_costs_the_hot_path_nothing(make_pool):
    pool = make_pool(minconn=0, maxconn=1)
    pool.putconn(pool.getconn())
    (e,) = pool._bag.entries.values()
    assert e.checkout_stack is None and e.fresh_until > e.last_used_at  # the lock-free path
