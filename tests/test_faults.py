"""The fault suite: pools against real servers that restart, lose their backends, freeze, lose
their DNS, or are hammered by 64 threads while being resized and reloaded. No app restart
anywhere: the pools must cope on their own.

Each test proves a figure and prints it on one line starting with ``FAULT:`` (collect them with
``pytest tests/test_faults.py -s | grep FAULT:``), and ends by checking that the servers hold
exactly the backends the pools say they hold (:func:`assert_no_leak`). Library bugs the faults
expose were fixed; each test states the expected behaviour.

Destructive tests (restart, freeze) take ``fresh_cluster``; the others use the session cluster
with an application_name of their own. Tests on real time get a supervisor of their own, so a
fault that stalls one cannot stall the process's shared one (and the next test).
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
import yaml
from helpers import wait_until
from pgregistry import Registry
from pgregistry.pools import ConnectError, ConnectionPool, PoolError, Supervisor

# A frozen server only hangs what talks to it: every libpq knob that could bound a hang.
FROZEN_LIBPQ: dict[str, Any] = {
    "connect_timeout": 1,
    "tcp_user_timeout": 1000,
    "keepalives": 1,
    "keepalives_idle": 1,
    "keepalives_interval": 1,
    "keepalives_count": 1,
}


# -- helpers ---------------------------------------------------------------------------------


def new_app(tag: str) -> str:
    """An application_name of this test's own, to count its backends on the servers."""
    return f"pgr-fault-{tag}-{uuid.uuid4().hex[:8]}"


def hostaddr(conn: Any) -> str:
    """The address a pooled connection is pinned to (no round trip: safe on a frozen server)."""
    return str(conn.get_dsn_parameters().get("hostaddr", ""))


def served_by(conn: Any) -> str:
    with conn.cursor() as cur:
        cur.execute("SELECT host(inet_server_addr())")
        return str(cur.fetchone()[0])


def dns_settings(dns_server: Any, **extra: Any) -> dict[str, Any]:
    return {"nameservers": ["127.0.0.1"], "port": dns_server.port, "lifetime": 1.0,
            "timeout": 0.5, **extra}


def assert_no_leak(servers: Sequence[Any], held: dict[str, list[ConnectionPool]],
                   timeout: float = 10.0) -> None:
    """Nothing leaked: for each application_name, the client backends on ``servers`` equal the
    connections its pools say they hold (once no connect is under way); then, with the pools
    closed, none is left (a connection still checked out would keep its backend)."""
    last: dict[str, tuple[int, int, int]] = {}

    def matches() -> bool:
        for app, pools in held.items():
            stats = [p.stats() for p in pools]
            holds = sum(s["size"] for s in stats)
            opening = sum(s["opening"] for s in stats)
            on_servers = sum(server.backend_count(app) for server in servers)
            last[app] = (on_servers, holds, opening)
        return all(on == holds and opening == 0 for on, holds, opening in last.values())

    assert wait_until(matches, timeout), (
        f"server backends != what the pools hold: {{app: (server, pools, opening)}} = {last}")
    for pools in held.values():
        for pool in pools:
            pool.close()
    left: dict[str, int] = {}

    def gone() -> bool:
        for app in held:
            left[app] = sum(server.backend_count(app) for server in servers)
        return not any(left.values())

    assert wait_until(gone, timeout), f"backends left after the pools closed: {left}"


def cut_socket(conn: Any) -> None:
    """A client-side deadline: shut the connection's socket down under libpq's feet, so a
    read blocked on it returns at once (EOF) whatever the server does."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.close()  # closes our duplicate only


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    """A real-time supervisor (own thread) for this test's pools only."""
    sup = Supervisor()
    yield sup
    sup.stop()


@pytest.fixture
def closer() -> Iterator[Callable[[Any], None]]:
    """``closer(pool_or_registry)``: closed at the end of the test, whatever happened."""
    things: list[Any] = []
    yield things.append
    for thing in reversed(things):
        if isinstance(thing, Registry):
            thing.close()
        else:
            thing.close_all()


# -- 1. the primary restarts under load ------------------------------------------------------

RESTART_THREADS = 16
RETRY_PAUSE = 0.01  # an app's pause before retrying a failed operation


def test_primary_fast_restart_under_16_threads(fresh_cluster, supervisor, closer):
    primary = fresh_cluster.primary
    app = new_app("restart")
    minconn, maxconn = 4, 8
    primary.execute("CREATE TABLE fault_writes (id serial PRIMARY KEY, v int)")
    pool = ConnectionPool(minconn=minconn, maxconn=maxconn, dsn=primary.dsn(),
                          application_name=app, timeout=5, connect_timeout=2, autocommit=True,
                          supervisor=supervisor)
    closer(pool)
    assert wait_until(lambda: pool.stats()["idle"] == minconn)

    lock = threading.Lock()
    ops: list[tuple[int, float, float, str, Any]] = []  # thread, start, end, outcome, boot
    stop = threading.Event()

    def worker(i: int) -> None:
        while not stop.is_set():
            started = time.monotonic()
            boot = None
            try:
                with pool.conn() as conn, conn.cursor() as cur:
                    if i % 2:  # half the threads write
                        cur.execute("INSERT INTO fault_writes (v) VALUES (%s)"
                                    " RETURNING pg_postmaster_start_time()", (i,))
                    else:
                        cur.execute("SELECT pg_postmaster_start_time()")
                    boot = cur.fetchone()[0]
                outcome = "ok"
            except ConnectError:
                outcome = "connect"
            except PoolError as exc:
                outcome = type(exc).__name__
            except psycopg2.Error:
                outcome = "query"
            except Exception as exc:  # pragma: no cover - asserted below
                outcome = f"unexpected {exc!r}"
            with lock:
                ops.append((i, started, time.monotonic(), outcome, boot))
            if outcome != "ok":
                time.sleep(RETRY_PAUSE)

    def succeeded(boot: Any) -> Counter[int]:
        with lock:
            return Counter(i for i, _, _, outcome, b in ops if outcome == "ok" and b == boot)

    old_boot = primary.execute("SELECT pg_postmaster_start_time()")[0][0]
    threads = [threading.Thread(target=worker, args=(i,), name=f"fault-restart-{i}")
               for i in range(RESTART_THREADS)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: len(succeeded(old_boot)) == RESTART_THREADS)
        t0 = time.monotonic()
        primary.restart("fast")
        t_ready = time.monotonic()
        new_boot = primary.execute("SELECT pg_postmaster_start_time()")[0][0]
        assert new_boot != old_boot
        # no action: every thread gets through again, and keeps getting through
        assert wait_until(lambda: len(succeeded(new_boot)) == RESTART_THREADS
                          and min(succeeded(new_boot).values()) >= 5, 15)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)

    first_new: dict[int, float] = {}
    for i, _, end, outcome, boot in ops:
        if outcome == "ok" and boot == new_boot:
            first_new[i] = min(first_new.get(i, end), end)
    t_first, t_every = min(first_new.values()), max(first_new.values())
    failed = [op for op in ops if op[3] != "ok"]
    kinds = Counter(op[3] for op in failed)
    broken = [op for op in failed if op[3] == "query"]
    refused = [op for op in failed if op[3] == "connect"]
    assert set(kinds) <= {"query", "connect"}, kinds  # no timeout, nothing unexpected
    # failed queries: only those on connections the restart broke (in flight or idle then)
    assert len(broken) <= RESTART_THREADS + maxconn
    assert all(start < t_ready for _, start, _, _, _ in broken + refused), (
        "a checkout failed after the server was back")
    assert max(end - start for _, start, end, _, _ in failed) < 2.0  # all failed fast
    assert not [op for op in failed if op[1] > t_every]
    down = t_ready - t0
    assert t_first - t0 <= down + 1.0
    assert t_every - t0 <= down + 2.0
    closed = pool.stats()["closed_by_reason"]
    print(f"\nFAULT: primary fast restart under {RESTART_THREADS} threads"
          f" (pool {minconn}..{maxconn}): server down {down:.3f} s; {len(broken)} queries"
          f" failed on connections the restart broke (bound {RESTART_THREADS + maxconn});"
          f" {len(refused)} checkouts failed fast with ConnectError while it was down"
          f" (app retries after {RETRY_PAUSE * 1000:.0f} ms); first success"
          f" {t_first - t0:.3f} s after the restart call, every thread {t_every - t0:.3f} s;"
          f" {len(ops)} operations; closed {closed}")
    assert_no_leak([primary], {app: [pool]})


# -- 2. every idle backend terminated ----------------------------------------------------------


@pytest.mark.parametrize("bypass", ["bypass0", "past_bypass"])
def test_every_idle_backend_terminated_the_next_checkouts_all_succeed(
        pg_cluster, stepped, closer, bypass):
    primary = pg_cluster.primary
    app = new_app("terminate")
    n = 6
    extra = {"validation_bypass": 0} if bypass == "bypass0" else {}
    pool = ConnectionPool(minconn=n, maxconn=n + 2, dsn=primary.dsn(), application_name=app,
                          timeout=5, supervisor=stepped, **extra)
    closer(pool)
    stepped.run_until_idle()
    assert pool.stats()["idle"] == n and primary.backend_count(app) == n
    rows = primary.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,))
    victims = {int(r[0]) for r in rows or []}
    primary.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid",
                    (sorted(victims),))
    assert wait_until(lambda: primary.backend_count(app) == 0)
    if not extra:
        stepped.clock.advance(1.0)  # every connection now unused for longer than the bypass

    barrier = threading.Barrier(n)
    results: list[tuple[int, float]] = []
    errors: list[BaseException] = []

    def borrower() -> None:
        barrier.wait(10)
        t = time.monotonic()
        try:
            with pool.conn(timeout=5) as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                results.append((int(cur.fetchone()[0]), time.monotonic() - t))
        except Exception as exc:  # pragma: no cover - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=borrower) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []  # no error reached the app
    assert len(results) == n
    assert not {pid for pid, _ in results} & victims
    stats = pool.stats()
    assert stats["closed_by_reason"] == {"validation": n}  # test-on-borrow caught each one
    slowest = max(d for _, d in results)
    assert slowest < 2.0
    how = "validation_bypass=0" if extra else "1 s past validation_bypass=0.5"
    print(f"\nFAULT: all {n} idle backends terminated ({how}): {len(results)}/{n} concurrent"
          f" checkouts succeeded, {len(errors)} errors reached the app, closed by reason"
          f" {stats['closed_by_reason']}, {stats['connections_opened'] - n} reopened,"
          f" slowest checkout {slowest * 1000:.1f} ms")
    stepped.run_until_idle()
    assert_no_leak([primary], {app: [pool]})


# -- 3. a reader frozen mid-query --------------------------------------------------------------

FREEZE_S = 3.0  # longer than tcp_user_timeout (1 s) and the keepalive verdict (1 + 1 s)
WATCHDOG_S = 1.0


def test_frozen_reader_mid_query(fresh_cluster, dns_server, supervisor, closer):
    _, r1, r2 = fresh_cluster.servers
    port = fresh_cluster.port
    name = "readers.fault.test"
    dns_server.set_a(name, [r1.host, r2.host], ttl=30)
    app = new_app("frozen")
    pool = ConnectionPool(
        minconn=6, maxconn=12, dsn=f"host={name} port={port} user=postgres dbname=postgres",
        dns=dns_settings(dns_server), application_name=app, timeout=5, autocommit=True,
        address_ban=2.0, address_ban_max=4.0, supervisor=supervisor, **FROZEN_LIBPQ)
    closer(pool)
    assert wait_until(lambda: pool.stats()["idle"] == 6)
    conns = [pool.getconn() for _ in range(6)]
    on_r1 = [c for c in conns if hostaddr(c) == r1.host]
    for c in conns:
        if hostaddr(c) != r1.host:
            pool.putconn(c)
    assert len(on_r1) == 3  # 3/3 over the two replicas
    plain, timed, guarded = on_r1
    with timed.cursor() as cur:
        cur.execute("SET statement_timeout = 300")  # a server-side bound, for comparison

    outcomes: dict[str, tuple[str, float]] = {}

    def run(label: str, conn: Any, sql: str) -> None:
        t = time.monotonic()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
            outcomes[label] = ("ok", time.monotonic() - t)
        except psycopg2.Error as exc:
            outcomes[label] = (type(exc).__name__, time.monotonic() - t)

    inflight = {
        "plain": threading.Thread(target=run, args=("plain", plain, "SELECT pg_sleep(0.5)")),
        "statement_timeout": threading.Thread(
            target=run, args=("statement_timeout", timed, "SELECT pg_sleep(2)")),
        "watchdog": threading.Thread(target=run, args=("watchdog", guarded, "SELECT pg_sleep(2)")),
    }
    for t in inflight.values():
        t.start()
    assert wait_until(lambda: r1.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        " AND wait_event = 'PgSleep'", (app,))[0][0] == 3)

    label_r1, label_r2 = f"{r1.host}:{port}", f"{r2.host}:{port}"
    during: list[tuple[str, float]] = []
    burst_errors: list[BaseException] = []
    watchdog = threading.Timer(WATCHDOG_S, cut_socket, args=(guarded,))
    # should this thread ever block on the frozen server, it thaws anyway (and fails below)
    safety = threading.Timer(FREEZE_S + 10, r1.thaw)
    r1.freeze()
    t_freeze = time.monotonic()
    try:
        safety.start()
        watchdog.start()
        # checkouts go on, one after the other, holding what they get: the pool must open
        # new connections, and one of those tries the frozen replica
        held = []
        for _ in range(5):
            t = time.monotonic()
            conn = pool.getconn(timeout=5)
            held.append(conn)
            during.append((served_by(conn), time.monotonic() - t))
        r1_row = pool.stats()["addresses"][label_r1]
        for conn in held:
            pool.putconn(conn)

        # a burst of 4 threads while it stays frozen (and banned)
        burst_stop = threading.Event()

        def burst() -> None:
            while not burst_stop.is_set():
                t = time.monotonic()
                try:
                    with pool.conn(timeout=5) as conn:
                        during.append((served_by(conn), time.monotonic() - t))
                except Exception as exc:  # pragma: no cover - asserted below
                    burst_errors.append(exc)
                    return

        burst_threads = [threading.Thread(target=burst) for _ in range(4)]
        for t in burst_threads:
            t.start()
        burst_stop.wait(0.5)
        burst_stop.set()
        for t in burst_threads:
            t.join(10)
        # the in-flight query outlives tcp_user_timeout and the keepalives?
        inflight["plain"].join(max(0.0, t_freeze + FREEZE_S - time.monotonic()))
        plain_hung = inflight["plain"].is_alive()
        frozen_for = time.monotonic() - t_freeze
    finally:
        watchdog.cancel()
        safety.cancel()
        r1.thaw()
    t_thaw = time.monotonic()
    assert frozen_for < FREEZE_S + 5, "the test itself blocked on the frozen server"
    for t in inflight.values():
        t.join(10)
    assert not any(t.is_alive() for t in inflight.values()), "a query hung past the thaw"
    pool.putconn(plain)
    pool.putconn(timed, close=True)  # (its session setting must not go back to the pool)
    pool.putconn(guarded)  # broken by the watchdog: discarded

    # checkouts kept succeeding, all on the other replica, none waiting on the frozen one
    # longer than one connect timeout
    assert burst_errors == []
    assert {addr for addr, _ in during} == {r2.host}
    assert max(d for _, d in during) < FROZEN_LIBPQ["connect_timeout"] + 0.5
    burst_max = max(d for _, d in during[5:])
    assert len(during) > 5 and burst_max < FROZEN_LIBPQ["connect_timeout"]
    # the frozen address was banned once a connect to it timed out
    assert r1_row["banned"] and r1_row["ban_reason"] == "timeout", r1_row
    assert r1_row["connect_failures"] >= 1 and "timeout" in (r1_row["last_error"] or "")
    # the client-side cut is what bounded a query there
    assert outcomes["watchdog"][0] == "OperationalError"
    assert outcomes["watchdog"][1] < WATCHDOG_S + 0.5

    # after the thaw it serves again
    def r1_serves() -> bool:
        got = []
        try:
            for _ in range(10):
                got.append(pool.getconn(timeout=1))
                if hostaddr(got[-1]) == r1.host:
                    return served_by(got[-1]) == r1.host
            return False
        finally:
            for c in got:
                pool.putconn(c)

    assert wait_until(r1_serves, 10)
    back = time.monotonic() - t_thaw
    p_out, p_s = outcomes["plain"]
    s_out, s_s = outcomes["statement_timeout"]
    w_out, w_s = outcomes["watchdog"]
    print(f"\nFAULT: reader frozen {frozen_for:.2f} s mid-query (connect_timeout=1,"
          f" tcp_user_timeout=1000, keepalives 1/1/1): in-flight pg_sleep(0.5) "
          f"{'still hung' if plain_hung else 'ended'} at thaw, {p_out} after {p_s:.2f} s"
          f" (nothing bounded it); statement_timeout=300ms -> {s_out} only at thaw, after"
          f" {s_s:.2f} s; socket shutdown by a client watchdog at {WATCHDOG_S:g} s -> {w_out}"
          f" after {w_s:.2f} s; {len(during)} checkouts during the freeze all on {r2.host}"
          f" (slowest {max(d for _, d in during):.2f} s, the one whose connect to the frozen"
          f" replica timed out; burst slowest {burst_max * 1000:.1f} ms); {label_r1} banned"
          f" ({r1_row['ban_reason']}, {r1_row['banned_for_s']:.1f} s left at the time);"
          f" served again {back:.2f} s after thaw; closed {pool.stats()['closed_by_reason']}")
    assert label_r2 in pool.stats()["addresses"]
    assert_no_leak([r1, r2], {app: [pool]})


def test_a_checkout_is_bounded_when_an_idle_connection_is_on_a_frozen_server(
        fresh_cluster, dns_server, supervisor, closer):
    _, r1, r2 = fresh_cluster.servers
    port = fresh_cluster.port
    name = "readers.fault.test"
    dns_server.set_a(name, [r1.host, r2.host], ttl=30)
    app = new_app("frozen-idle")
    pool = ConnectionPool(
        minconn=2, maxconn=6, dsn=f"host={name} port={port} user=postgres dbname=postgres",
        dns=dns_settings(dns_server), application_name=app, timeout=1, validation_bypass=0,
        supervisor=supervisor, **FROZEN_LIBPQ)
    closer(pool)
    assert wait_until(lambda: pool.stats()["idle"] == 2)  # one on each replica
    results: list[tuple[str, float]] = []

    def checkout() -> None:
        t = time.monotonic()
        try:
            with pool.conn(timeout=1) as conn:
                results.append((served_by(conn), time.monotonic() - t))
        except psycopg2.Error as exc:
            results.append((type(exc).__name__, time.monotonic() - t))

    bound = 1 + FROZEN_LIBPQ["connect_timeout"] + 0.5  # checkout timeout + one connect + slack
    threads = [threading.Thread(target=checkout) for _ in range(2)]  # one draws r1's
    r1.freeze()
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + bound
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = sum(t.is_alive() for t in threads)
    finally:
        r1.thaw()
    for t in threads:
        t.join(10)
    assert_no_leak([r1, r2], {app: [pool]})
    assert hung == 0, (f"{hung} checkout(s) still blocked {bound:.1f} s after a freeze"
                       f" (getconn timeout 1 s); results after thaw: {results}")


def test_a_frozen_replica_does_not_stall_other_pools_maintenance(
        fresh_cluster, dns_server, supervisor, closer):
    primary, r1, r2 = fresh_cluster.servers
    port = fresh_cluster.port
    name = "readers.fault.test"
    dns_server.set_a(name, [r1.host, r2.host], ttl=30)
    app, other_app = new_app("frozen-role"), new_app("other")
    readers = ConnectionPool(
        minconn=2, maxconn=6, dsn=f"host={name} port={port} user=postgres dbname=postgres",
        dns=dns_settings(dns_server), application_name=app, timeout=5, role="reader",
        role_check_interval=0.2, supervisor=supervisor, **FROZEN_LIBPQ)
    closer(readers)
    assert wait_until(lambda: readers.stats()["idle"] == 2)
    r1.freeze()
    try:
        time.sleep(0.5)  # more than one role_check_interval: a role check has begun
        other = ConnectionPool(minconn=2, maxconn=2, dsn=primary.dsn(),
                               application_name=other_app, supervisor=supervisor)
        closer(other)
        t = time.monotonic()
        bound = FROZEN_LIBPQ["connect_timeout"] + 1.0  # one attempt on the frozen host, + slack
        prewarmed = wait_until(lambda: other.stats()["idle"] == 2, bound)
        waited = time.monotonic() - t
    finally:
        r1.thaw()
    assert wait_until(lambda: other.stats()["idle"] == 2)  # it catches up after the thaw
    assert_no_leak([primary, r1, r2], {app: [readers], other_app: [other]})
    assert prewarmed, (f"a healthy pool's prewarm did not happen in {waited:.1f} s while a"
                       f" replica of another pool was frozen")


# -- 4. DNS stops answering ------------------------------------------------------------------

DNS_NAME = "readers.fault.test"
DNS_TTL = 5
STALE_GRACE = 30


def _silent_dns_pool(pg_cluster, dns_server, stepped, app):
    r1, r2 = pg_cluster.replicas
    dns_server.set_a(DNS_NAME, [r1.host, r2.host], ttl=DNS_TTL)
    return ConnectionPool(
        minconn=2, maxconn=6,
        dsn=f"host={DNS_NAME} port={pg_cluster.port} user=postgres dbname=postgres",
        dns=dns_settings(dns_server, lifetime=0.2, timeout=0.2, stale_grace=STALE_GRACE),
        application_name=app, timeout=5, connect_timeout=2, supervisor=stepped)


def test_dns_silent_cached_answer_serves_through_stale_grace(
        pg_cluster, dns_server, stepped, closer, caplog):
    r1, r2 = pg_cluster.replicas
    app = new_app("dns")
    pool = _silent_dns_pool(pg_cluster, dns_server, stepped, app)
    closer(pool)
    clock = stepped.clock
    stepped.run_until_idle()
    assert pool.stats()["size"] == 2

    dns_server.set_mode("silent")
    dns_server.clear_queries()
    clock.advance(DNS_TTL + 1)  # the answer is past its TTL: refreshing it goes unanswered
    stepped.run_until_idle()
    clock.advance(10)  # 11 s past expiry, well inside stale_grace
    stepped.run_until_idle()
    dns = pool.stats()["dns"][DNS_NAME]
    assert dns["stale"] and dns["refresh_failures"] >= 2 and dns["stale_served"] >= 2
    assert "no answer within 0.2 s" in dns["last_error"]
    assert (DNS_NAME, "A") in dns_server.queries  # it really asked
    assert "serving the last answer" in caplog.text

    # within the grace: the 2 open connections serve, and 2 new ones open on the cached
    # addresses without waiting on DNS
    t = time.monotonic()
    conns = [pool.getconn() for _ in range(4)]
    in_grace_s = time.monotonic() - t
    assert {served_by(c) for c in conns} <= {r1.host, r2.host}
    for c in conns:
        pool.putconn(c)
    assert pool.stats()["connections_opened"] == 4
    assert in_grace_s < 1.0

    # past the grace: the pool keeps every open connection, and they serve
    clock.advance(STALE_GRACE)
    stepped.run_until_idle()
    assert pool.stats()["size"] == 4
    assert r1.backend_count(app) + r2.backend_count(app) == 4
    conns = [pool.getconn() for _ in range(4)]
    assert {served_by(c) for c in conns} <= {r1.host, r2.host}
    assert pool.stats()["connections_opened"] == 4  # the same connections
    # what a new connection does past the grace (asserted by the test below)
    t = time.monotonic()
    try:
        extra = pool.getconn()
    except ConnectError as exc:
        past_grace = f"ConnectError ({str(exc).splitlines()[0]})"
    else:
        past_grace = f"opened to {served_by(extra)}, no error"
        pool.putconn(extra)
    past_grace += f" in {time.monotonic() - t:.2f} s"
    for c in conns:
        pool.putconn(c)
    print(f"\nFAULT: DNS silent (lifetime 0.2 s, stale_grace {STALE_GRACE} s, fake clock):"
          f" {dns['refresh_failures']} refreshes unanswered, cached answer served 2 new"
          f" connects in {in_grace_s * 1000:.1f} ms within the grace; past the grace the pool"
          f" kept 4/4 open connections and they served; stats dns past the grace:"
          f" {pool.stats()['dns'] or 'the name is gone'}; a new connect past the grace:"
          f" {past_grace}")
    stepped.run_until_idle()
    assert_no_leak([r1, r2], {app: [pool]})


def test_dns_silent_past_stale_grace_new_connects_fail_clearly(
        pg_cluster, dns_server, stepped, closer):
    r1, r2 = pg_cluster.replicas
    app = new_app("dns-past")
    pool = _silent_dns_pool(pg_cluster, dns_server, stepped, app)
    closer(pool)
    stepped.run_until_idle()
    dns_server.set_mode("silent")
    stepped.clock.advance(DNS_TTL + 1)
    stepped.run_until_idle()
    stepped.clock.advance(STALE_GRACE + 1)  # past expiry + grace
    stepped.run_until_idle()
    held = [pool.getconn() for _ in range(2)]  # the open connections still serve
    error: ConnectError | None = None
    opened_to = None
    try:
        extra = pool.getconn()  # needs a new connection
    except ConnectError as exc:
        error = exc
    else:
        opened_to = served_by(extra)
        pool.putconn(extra)
    for c in held:
        pool.putconn(c)
    assert_no_leak([r1, r2], {app: [pool]})
    assert error is not None, (f"past stale_grace a new connection opened to {opened_to}"
                               f" from an answer that expired {STALE_GRACE + 1} s ago")
    msg = str(error)
    assert DNS_NAME in msg and "no answer" in msg and f"127.0.0.1:{dns_server.port}" in msg


# -- 5. 64 threads, resizes and reloads ------------------------------------------------------

STRESS_S = 3.0
STRESS_THREADS = 64
# A pool may hold more than its new maxconn for a moment after a shrink (checked-out
# connections close on return) and a closed backend lingers a moment in pg_stat_activity: a
# sample is checked against every maxconn in effect from this long before it.
SHRINK_SLACK = 1.0


class SizeHistory:
    """The maxconn values one pool had over time (changed by a single thread)."""

    def __init__(self, initial: int) -> None:
        self.initial = initial
        self.changes: list[tuple[float, float, int, int]] = []  # started, done, old, new

    def record(self, started: float, done: float, old: int, new: int) -> None:
        self.changes.append((started, done, old, new))

    def bound(self, t0: float, t1: float, slack: float = SHRINK_SLACK) -> int:
        """The largest maxconn in effect at any time in [t0 - slack, t1]."""
        x0 = t0 - slack
        current = self.initial
        seen = set()
        for started, done, old, new in self.changes:
            if done <= x0:
                current = new
            elif started <= t1:
                seen.update((old, new))
        seen.add(current)
        return max(seen)


def test_stress_64_threads_with_resizes_and_reloads(pg_cluster, supervisor, closer, tmp_path):
    primary = pg_cluster.primary
    app_p, app_r = new_app("stress-pool"), new_app("stress-reg")
    pool = ConnectionPool(minconn=2, maxconn=8, dsn=primary.dsn(), application_name=app_p,
                          timeout=20, supervisor=supervisor)
    closer(pool)
    path = tmp_path / "pools.yaml"

    def write_yaml(minconn: int, maxconn: int) -> None:
        config = {
            "version": 1,
            "defaults": {"user": "postgres", "dbname": "postgres", "port": pg_cluster.port,
                         "connect_timeout": 2, "timeout": 20},
            "pools": {"main": {"host": primary.host, "minconn": minconn, "maxconn": maxconn,
                               "application_name": app_r}},
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, path)  # atomic, like a deploy tool

    write_yaml(1, 6)
    reg = Registry.from_yaml(path, install_sighup=False, supervisor=supervisor)
    closer(reg)
    handle = reg.get("main")
    history = {app_p: SizeHistory(8), app_r: SizeHistory(6)}

    lock = threading.Lock()
    holders: dict[int, int] = {}  # id(conn) -> thread holding it
    shared: list[tuple[int, int]] = []
    # backends the test itself closed (they linger a moment in pg_stat_activity): pid -> when
    closed_at: dict[int, float] = {}
    errors: list[str] = []
    ops: Counter[str] = Counter()
    max_hold = [0.0]
    samples: list[tuple[float, float, int, int, float, int, int]] = []
    stop = threading.Event()
    changes = Counter[str]()

    def take(conn: Any) -> float:
        me = threading.get_ident()
        with lock:
            if id(conn) in holders:
                shared.append((holders[id(conn)], me))
            holders[id(conn)] = me
        return time.monotonic()

    def release(conn: Any, since: float, close: bool = False) -> None:
        held_s = time.monotonic() - since
        with lock:
            holders.pop(id(conn), None)
            if close:
                closed_at[conn.info.backend_pid] = time.monotonic()
            if held_s > max_hold[0]:
                max_hold[0] = held_s

    def use(conn: Any, rnd: random.Random) -> None:
        if rnd.random() < 0.7:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        if rnd.random() < 0.2:
            time.sleep(rnd.random() * 0.002)

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            op = rnd.choice(("get/put", "put(close)", "with pool.conn()", "with handle.conn()",
                             "handle get/put"))
            try:
                if op in ("get/put", "put(close)"):
                    conn = pool.getconn()
                    since = take(conn)
                    use(conn, rnd)
                    release(conn, since, close=op == "put(close)")
                    pool.putconn(conn, close=op == "put(close)")
                elif op == "with pool.conn()":
                    with pool.conn() as conn:
                        since = take(conn)
                        use(conn, rnd)
                        release(conn, since)
                elif op == "with handle.conn()":
                    with handle.conn() as conn:
                        since = take(conn)
                        use(conn, rnd)
                        release(conn, since)
                else:
                    close = rnd.random() < 0.1
                    conn = handle.getconn()
                    since = take(conn)
                    use(conn, rnd)
                    release(conn, since, close=close)
                    handle.putconn(conn, close=close)
                ops[op] += 1
            except Exception as exc:  # pragma: no cover - asserted below
                errors.append(f"{op}: {exc!r}")

    def resizer() -> None:
        rnd = random.Random(4242)
        try:
            while not stop.wait(rnd.uniform(0.1, 0.3)):
                if rnd.random() < 0.6:
                    new_max = rnd.randint(3, 10)
                    old = int(pool.maxconn)
                    t = time.monotonic()
                    pool.resize(new_max, minconn=rnd.randint(0, 2))
                    history[app_p].record(t, time.monotonic(), old, new_max)
                    changes["resize"] += 1
                else:
                    new_max = rnd.randint(2, 8)
                    old = int(handle.pool.maxconn)
                    write_yaml(rnd.randint(0, min(2, new_max)), new_max)
                    t = time.monotonic()
                    reg.reload()
                    history[app_r].record(t, time.monotonic(), old, new_max)
                    changes["reload"] += 1
        except Exception as exc:  # pragma: no cover - asserted below
            errors.append(f"resizer: {exc!r}")

    def sampler() -> None:
        probe = primary.connect()
        try:
            with probe.cursor() as cur:
                while not stop.is_set():
                    t_stats = time.monotonic()
                    size_p, size_r = pool.stats()["size"], handle.pool.stats()["size"]
                    s0 = time.monotonic()
                    cur.execute("SELECT application_name, pid FROM pg_stat_activity"
                                " WHERE application_name = ANY(%s)", ([app_p, app_r],))
                    rows = cur.fetchall()
                    s1 = time.monotonic()
                    with lock:  # a backend the test began closing before s1 may linger
                        counts = Counter(a for a, pid in rows
                                         if closed_at.get(pid, s1 + 1) > s1)
                    samples.append((s0, s1, counts[app_p], counts[app_r], t_stats, size_p,
                                    size_r))
        except Exception as exc:  # pragma: no cover - asserted below
            errors.append(f"sampler: {exc!r}")
        finally:
            probe.close()

    threads = [threading.Thread(target=worker, args=(i,), name=f"fault-stress-{i}")
               for i in range(STRESS_THREADS)]
    threads += [threading.Thread(target=resizer), threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    stop.wait(STRESS_S)
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)

    assert errors == []
    assert shared == []  # no connection was ever in two hands
    assert changes["resize"] and changes["reload"]
    over = []
    for s0, s1, on_p, on_r, t_stats, size_p, size_r in samples:
        for app, on, size, t in ((app_p, on_p, size_p, t_stats), (app_r, on_r, size_r, t_stats)):
            if on > history[app].bound(s0, s1):
                over.append((app, "server", on, history[app].bound(s0, s1)))
            if size > history[app].bound(t, t):
                over.append((app, "pool size", size, history[app].bound(t, t)))
    assert over == [], f"maxconn exceeded: {over[:10]} (of {len(over)})"
    assert len(samples) > 10

    def quiet(p: ConnectionPool) -> bool:
        s = p.stats()
        return (s["opening"] == 0 and s["waiting"] == 0 and s["in_use"] == 0
                and s["size"] == s["idle"] + s["in_use"] and s["size"] <= s["maxconn"])

    assert wait_until(lambda: quiet(pool) and quiet(handle.pool)), (pool.stats(),
                                                                    handle.pool.stats())
    assert handle.pool is reg.get("main").pool  # retuned in place, never replaced
    total = sum(ops.values())
    st_p, st_r = pool.stats(), handle.pool.stats()
    max_p = max(s[2] for s in samples)
    max_r = max(s[3] for s in samples)
    print(f"\nFAULT: stress {STRESS_THREADS} threads for {STRESS_S:g} s: {total} checkouts"
          f" ({dict(ops)}), {changes['resize']} resizes (maxconn 3..10) and"
          f" {changes['reload']} YAML reloads (maxconn 2..8); {len(samples)} server samples:"
          f" max backends pool {max_p}, registry {max_r}, 0 over the maxconn in effect"
          f" (slack {SHRINK_SLACK:g} s; longest hold {max_hold[0] * 1000:.0f} ms); 0 connections"
          f" in two hands; {len(errors)} errors; at rest pool size {st_p['size']} ="
          f" idle {st_p['idle']} + in use {st_p['in_use']}, registry size {st_r['size']} ="
          f" idle {st_r['idle']} + in use {st_r['in_use']}; pool closed"
          f" {st_p['closed_by_reason']}, registry closed {st_r['closed_by_reason']}")
    assert_no_leak([primary], {app_p: [pool], app_r: [handle.pool]})


def test_query_timeout_bounds_a_query_on_a_frozen_reader(
        fresh_cluster, dns_server, supervisor, closer):
    _, r1, r2 = fresh_cluster.servers
    name = "readers.fault.test"
    dns_server.set_a(name, [r1.host, r2.host], ttl=30)
    app = new_app("query-timeout")
    pool = ConnectionPool(
        minconn=2, maxconn=4, application_name=app, timeout=2, query_timeout=1.0,
        dsn=f"host={name} port={fresh_cluster.port} user=postgres dbname=postgres",
        dns=dns_settings(dns_server), supervisor=supervisor, connect_timeout=1)
    closer(pool)
    assert wait_until(lambda: pool.stats()["idle"] == 2)  # one on each replica
    conns = [pool.getconn(), pool.getconn()]
    on_r1 = next(c for c in conns if served_by(c) == r1.host)
    for c in conns:
        if c is not on_r1:
            pool.putconn(c)
    r1.freeze()
    try:
        t0 = time.monotonic()
        with pytest.raises(psycopg2.OperationalError), on_r1.cursor() as cur:
            cur.execute("SELECT 1")  # in flight on the frozen server
        bounded = time.monotonic() - t0
        pool.putconn(on_r1)  # broken: discarded
        label = f"{r1.host}:{fresh_cluster.port}"
        assert pool.stats()["addresses"][label]["banned"]
        for _ in range(20):  # the others serve
            with pool.conn() as conn:
                assert served_by(conn) == r2.host
    finally:
        r1.thaw()
    print(f"\nFAULT: query on a frozen reader with query_timeout=1.0: failed after {bounded:.2f} s,"
          f" address banned, 20 checkouts served by the other replica meanwhile")
    assert 0.9 <= bounded < 2.0
    assert_no_leak([r1, r2], {app: [pool]})
