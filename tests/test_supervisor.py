"""The supervisor keeps time and nothing else (issue 10).

Fake-clock tests show the scheduling logic: the heap holds O(live tasks), cancelled tasks drop
what they referenced, a state change that moves a deadline earlier asks for a step. Real-thread
tests (a supervisor of their own, short intervals, bounded waits) show that the deadlines hold:
surplus connections reaped on time, leak warnings on time with the true hold, and a host that
hangs delaying nothing but its own pool; and that 1,000 registries come and go without a trace.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
import yaml
from helpers import wait_until
from pgregistry import Registry
from pgregistry.pools import ConnectionPool, FakeClock, PoolError, Supervisor, workers
from pgregistry.pools.sched import COMPACT_MIN_STALE, Scheduler, Task
from pgregistry.schemas import load_config

# -- the schedule (fake clock) ----------------------------------------------------------------


def test_a_task_at_infinity_is_not_on_the_heap_and_a_request_brings_it():
    clock = FakeClock()
    sched = Scheduler(clock)
    ran: list[float] = []
    task = sched.add(Task("t", lambda now: ran.append(now) or math.inf), math.inf)
    assert sched.heap_size() == 0 and sched.next_deadline() is None
    sched.request_by(task, clock.monotonic() + 5)  # earlier than inf: asks
    assert sched.run_due() == 1 and ran == [clock.monotonic()]
    assert sched.heap_size() == 0  # back at infinity


def test_request_by_asks_only_when_earlier():
    clock = FakeClock()
    sched = Scheduler(clock)
    now = clock.monotonic()
    task = sched.add(Task("t", lambda now: now + 10), now + 10)
    sched.request_by(task, now + 20)  # later than its deadline: nothing to do
    assert sched.run_due() == 0
    sched.request_by(task, now + 3)
    assert sched.run_due() == 1  # asked: it ran at once and chose its own next deadline


def test_cancelled_tasks_leave_the_heap_and_drop_what_they_held():
    sched = Scheduler(FakeClock())

    class Owner:
        def tick(self, now: float) -> float:
            return now + 60

    keep = sched.add(Task("keep", lambda now: now + 1), 1.0)
    owners = []
    for i in range(1000):
        owner = Owner()
        owners.append(weakref.ref(owner))
        task = sched.add(Task(f"t{i}", owner.tick), 30.0 + i)
        del owner
        sched.cancel(task)
        assert sched.heap_size() <= 2 * COMPACT_MIN_STALE + 1
    gc.collect()
    assert all(ref() is None for ref in owners)  # the heap kept none of them alive
    assert sched.next_deadline() == 1.0 and keep.due == 1.0


def test_deadlines_moved_earlier_do_not_grow_the_heap():
    sched = Scheduler(FakeClock())
    task = sched.add(Task("t", lambda now: None), 10_000.0)
    for i in range(5000):
        sched.add(task, 9_999.0 - i)  # each move leaves its old entry behind...
    assert sched.heap_size() <= 2 * COMPACT_MIN_STALE + 1  # ...compacted away


def test_a_bound_method_task_holds_its_object_weakly():
    sup = Supervisor(clock=FakeClock(), start=False)

    class Owner:
        def tick(self, now: float) -> float:
            return now + 1

    owner = Owner()
    ref = weakref.ref(owner)
    sup.add_task("owner", owner.tick, due=0.0)
    assert sup.run_due() == 1
    del owner
    gc.collect()
    assert ref() is None
    sup.clock.advance(2)
    sup.run_until_idle()
    assert sup.scheduler.next_deadline() is None  # its task left the schedule


def test_a_callers_connect_above_minconn_asks_for_the_reap(make_pool, stepped):
    pool = make_pool(minconn=1, maxconn=4, idle_timeout=1, reap_idle_interval=1)
    stepped.run_until_idle()
    assert pool._task.due is not None and pool._task.due >= stepped.clock.monotonic() + 30
    conns = [pool.getconn() for _ in range(3)]  # two connects of the caller's own
    for c in conns:
        pool.putconn(c)
    stepped.run_until_idle()  # the requests it got
    now = stepped.clock.monotonic()
    assert pool._task.due is not None and pool._task.due <= now + 1  # not the 60 s recheck
    stepped.clock.advance(1.0)
    stepped.run_until_idle()
    stepped.clock.advance(1.0)
    stepped.run_until_idle()
    assert pool.stats()["size"] == 1
    assert pool.stats()["closed_by_reason"] == {"idle": 2}


def test_a_checkout_with_leak_detection_asks_for_its_check(make_pool, stepped):
    pool = make_pool(minconn=1, maxconn=2, leak_detection_threshold=1)
    stepped.run_until_idle()
    assert pool._task.due is not None and pool._task.due >= stepped.clock.monotonic() + 30
    conn = pool.getconn()
    stepped.run_until_idle()
    assert pool._task.due is not None and pool._task.due <= stepped.clock.monotonic() + 1
    pool.putconn(conn)


def test_a_checked_out_connections_lifetime_is_in_the_next_deadline(make_pool, stepped):
    pool = make_pool(minconn=1, maxconn=2, lifetime_timeout=100, lifetime_jitter=0)
    stepped.run_until_idle()
    conn = pool.getconn()
    stepped.run_until_idle()
    # returned before its expiry, nobody tells the supervisor: its deadline is already there
    assert pool._task.due is not None and pool._task.due <= stepped.clock.monotonic() + 100
    pool.putconn(conn)


def test_a_new_dns_answer_asks_for_its_refresh(make_pool, pg_server, dns_server, stepped):
    name = "moving.supervisor.test"
    dns_server.set_a(name, [pg_server.host], ttl=30)
    pool = make_pool(minconn=0, maxconn=2, dsn=f"host={name} port={pg_server.port} "
                     "user=postgres dbname=postgres",
                     dns={"nameservers": ["127.0.0.1"], "port": dns_server.port,
                          "lifetime": 1.0, "timeout": 0.5})
    stepped.run_until_idle()  # nothing resolved yet: the 60 s recheck
    now = stepped.clock.monotonic()
    assert pool._task.due is not None and pool._task.due >= now + 59
    pool.putconn(pool.getconn())  # the caller's connect resolves the name: a TTL of 30 s
    stepped.run_until_idle()
    refresh_at = pool._connector.refresh_due()
    assert refresh_at is not None and refresh_at <= now + 30
    assert pool._task.due is not None and pool._task.due <= refresh_at  # told, not 60 s late


# -- I/O workers ------------------------------------------------------------------------------


def test_io_workers_are_bounded_per_key_and_in_total_and_exit_when_idle():
    io = workers.IOWorkers(per_key=2, max_threads=3, idle_s=0.2)
    gate = threading.Event()
    running: dict[str, int] = {}
    peak: dict[str, int] = {}
    lock = threading.Lock()
    done = threading.Semaphore(0)

    def job(key: str) -> None:
        with lock:
            running[key] = running.get(key, 0) + 1
            peak[key] = max(peak.get(key, 0), running[key])
        gate.wait(10)
        with lock:
            running[key] -= 1
        done.release()

    for _ in range(5):
        io.submit("hung", lambda: job("hung"))
    assert wait_until(lambda: io.stats()["running"] == 2, timeout=5)
    io.submit("ok", lambda: job("ok"))  # the third thread: past the hung host's two
    assert wait_until(lambda: io.stats()["running"] == 3, timeout=5)
    assert io.stats()["threads"] == 3 and io.stats()["queued"] == 3
    gate.set()
    for _ in range(6):
        assert done.acquire(timeout=10)
    assert peak == {"hung": 2, "ok": 1}
    assert wait_until(lambda: io.stats()["threads"] == 0, timeout=5)  # all exited when idle


def test_a_steppable_supervisor_runs_its_io_inline():
    sup = Supervisor(clock=FakeClock(), start=False)
    seen: list[str] = []
    sup.submit_io("k", lambda: seen.append(threading.current_thread().name))
    assert seen == [threading.current_thread().name]


# -- the real supervisor thread: deadlines on time --------------------------------------------


@pytest.fixture
def real_supervisor() -> Iterator[Supervisor]:
    """A supervisor with its own thread and I/O workers (the process's one, in miniature)."""
    sup = Supervisor()
    yield sup
    sup.stop()


def test_surplus_connections_are_reaped_on_time(make_pool, pg_server, real_supervisor):
    pool = make_pool(minconn=1, maxconn=4, idle_timeout=1, reap_idle_interval=1,
                     supervisor=real_supervisor)
    assert wait_until(lambda: pool.stats()["idle"] == 1)
    conns = [pool.getconn() for _ in range(4)]  # callers grow it to 4
    for c in conns:
        pool.putconn(c)
    t0 = time.monotonic()
    assert pg_server.backend_count(pool.app) == 4
    assert wait_until(lambda: pg_server.backend_count(pool.app) == 1, timeout=3)
    took = time.monotonic() - t0
    print(f"\nREAP: 4 -> 1 on the server {took:.2f} s after the returns "
          "(idle_timeout=1, reap_idle_interval=1)")
    assert took < 3
    assert pool.stats()["closed_by_reason"] == {"idle": 3}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[tuple[float, str]] = []
        self.arrived = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((time.monotonic(), record.getMessage()))
        self.arrived.set()


def test_a_leak_warning_comes_on_time_with_the_true_hold(make_pool, real_supervisor):
    pool = make_pool(minconn=1, maxconn=2, leak_detection_threshold=1,
                     supervisor=real_supervisor)
    assert wait_until(lambda: pool.stats()["idle"] == 1)
    handler = _Records()
    logger = logging.getLogger("pgregistry.pools.maintenance")
    logger.addHandler(handler)
    try:
        t0 = time.monotonic()
        conn = pool.getconn()
        assert handler.arrived.wait(5)
        at, message = handler.records[0]
        time.sleep(max(0.0, t0 + 2.0 - time.monotonic()))  # the hold: 2 s in all
        pool.putconn(conn)
    finally:
        logger.removeHandler(handler)
    late = at - t0
    said = float(message.split("checked out for ")[1].split(" s")[0])
    print(f"\nLEAK: warning {late:.2f} s after the checkout (threshold 1 s), stating {said} s")
    assert 1.0 <= late < 1.5
    assert abs(said - late) <= 0.15  # the hold it states is the hold so far
    assert pool.stats()["leaks_detected"] == 1


def test_a_hanging_host_delays_nothing_but_its_own_pool(make_pool, pg_server, hanging_port,
                                                       real_supervisor):
    hung = make_pool(minconn=2, maxconn=2, supervisor=real_supervisor,
                     dsn=f"host=127.0.0.1 port={hanging_port} user=u connect_timeout=10")
    assert wait_until(lambda: hung.stats()["opening"] == 1)  # its prewarm hangs from now on
    t0 = time.monotonic()
    other = make_pool(minconn=2, maxconn=4, query_timeout=1, ping_timeout=1, timeout=10,
                      supervisor=real_supervisor)
    assert wait_until(lambda: other.stats()["idle"] == 2, timeout=5)
    prewarm_s = time.monotonic() - t0

    with other.conn() as conn, conn.cursor() as cur:
        t1 = time.monotonic()
        with pytest.raises(psycopg2.Error):
            cur.execute("SELECT pg_sleep(6)")
        query_s = time.monotonic() - t1

    # a frozen server behind an idle connection: the checkout's ping is cut at ping_timeout
    other.validation_bypass = 0  # every checkout pings
    conn = other.getconn()
    victim = conn.info.backend_pid
    other.putconn(conn)
    # the cut connection's replacement (its address was banned for a second)
    assert wait_until(lambda: other.stats()["idle"] == 2, timeout=10)
    os.kill(victim, signal.SIGSTOP)
    try:
        t2 = time.monotonic()
        try:
            for _ in range(2):  # one of the two idle ones is the frozen one
                c = other.getconn()
                other.putconn(c)
        except PoolError:
            pass  # its address banned and no other: a clear error, on time
        ping_s = time.monotonic() - t2
    finally:
        os.kill(victim, signal.SIGCONT)
    assert hung.stats()["opening"] == 1  # still hanging all along
    print(f"\nHANG: beside a prewarm hanging 10 s: prewarm to 2 in {prewarm_s:.2f} s, "
          f"a 6 s query cut after {query_s:.2f} s (query_timeout=1), checkouts past a frozen "
          f"server in {ping_s:.2f} s (ping_timeout=1)")
    assert prewarm_s < 1.0
    assert query_s < 1.5
    assert ping_s < 2.0


# -- 1,000 registries come and go -------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_thousand_registries_leave_no_trace(pg_server, tmp_path, real_supervisor):
    sup = real_supervisor
    lasting = ConnectionPool(1, 2, dsn=pg_server.dsn(), supervisor=sup, name="lasting")
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "defaults": {"user": "postgres", "dbname": "postgres", "port": pg_server.port,
                     "host": pg_server.host, "connect_timeout": 2},
        "pools": {"a": {"minconn": 0, "maxconn": 2}, "b": {"minconn": 0, "maxconn": 2}},
    }))
    config = load_config(path)
    refs: list[weakref.ref[Any]] = []

    def cycle(keep: bool) -> None:
        with Registry(config, supervisor=sup) as reg:
            with reg.get("a").conn() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
            if keep:
                refs.append(weakref.ref(reg))
                refs.extend(weakref.ref(reg.get(n).pool) for n in ("a", "b"))
        with lasting.conn() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")

    # (no log records meanwhile: the suite's capture keeps every one, which is not ours to count)
    quiet = logging.getLogger("pgregistry")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        for _ in range(100):  # warm up: imports, caches, the allocator's arenas
            cycle(False)
        gc.collect()
        rss0 = _rss_bytes()
        t0 = time.monotonic()
        for i in range(1000):
            cycle(i % 10 == 0)
        took = time.monotonic() - t0
        gc.collect()
        grown = _rss_bytes() - rss0
        heap = sup.scheduler.heap_size()
        alive = sum(ref() is not None for ref in refs)
        print(f"\nCYCLES: 1000 registries created, used and closed in {took:.1f} s beside a "
              f"long-lived pool: RSS {grown / 1e6:+.2f} MB, heap {heap} entries, "
              f"{alive}/{len(refs)} sampled registries and pools alive")
        assert alive == 0
        assert heap <= 2 * COMPACT_MIN_STALE + 8  # O(live pools), not O(pools ever made)
        assert grown < 2_000_000
    finally:
        quiet.setLevel(level)
        lasting.close()


# -- the watchdog's deadlines (cuts) on the one supervisor ---------------------------------------


def test_cuts_run_when_due_and_a_cancelled_one_never_does():
    clock = FakeClock()
    sup = Supervisor(clock=clock, start=False)
    fired: list[str] = []
    a = sup.watch(clock.monotonic() + 1.0, lambda: fired.append("a"))
    b = sup.watch(clock.monotonic() + 2.0, lambda: fired.append("b"))
    assert sup.scheduler.next_deadline() == clock.monotonic() + 1.0
    Supervisor.unwatch(a)  # one store: no lock, no search
    assert sup.scheduler.next_deadline() == clock.monotonic() + 2.0
    clock.advance(1.5)
    assert sup.run_due() == 0 and fired == []
    clock.advance(1.0)
    assert sup.run_due() == 1 and fired == ["b"]
    Supervisor.unwatch(b)  # (after it ran: harmless)
    assert sup.scheduler.next_deadline() is None and sup.scheduler.cuts_size() == 0


def test_cancelled_cuts_do_not_pile_up():
    """One cut per query, cancelled when it ends: the heap stays O(cuts live), not O(queries
    within the timeout)."""
    clock = FakeClock()
    sched = Scheduler(clock)
    live = [sched.at(clock.monotonic() + 30.0, lambda: None) for _ in range(10)]
    for _ in range(100_000):
        Scheduler.uncut(sched.at(clock.monotonic() + 30.0, lambda: None))
    assert sched.cuts_size() < 2 * 1024
    assert all(item in sched._cuts for item in live)


def test_a_cut_fires_on_the_supervisor_thread_even_when_it_sleeps_toward_a_later_deadline(
        real_supervisor):
    sup = real_supervisor
    sup.add_task("far", lambda now: now + 3600.0, due=time.monotonic() + 3600.0)
    assert wait_until(lambda: sup.scheduler._sleeping_until > time.monotonic() + 1.0,
                      timeout=5.0)  # the thread sleeps (up to its longest nap)
    fired = threading.Event()
    where: list[str] = []
    cancelled: list[str] = []

    def cut() -> None:
        where.append(threading.current_thread().name)
        fired.set()

    t0 = time.monotonic()
    Supervisor.unwatch(sup.watch(t0 + 0.1, lambda: cancelled.append("x")))
    sup.watch(t0 + 0.2, cut)
    assert fired.wait(5.0)
    took = time.monotonic() - t0
    print(f"\nRELIABILITY: a 0.2 s cut fired after {took:.3f} s")
    assert took < 0.2 + 0.5
    assert where == ["pgregistry-supervisor"] and cancelled == []


def test_pools_with_query_timeout_run_on_the_supervisor_and_io_workers_only(make_pool):
    """The thread model: the watchdog keeps its deadlines on the process's one supervisor; no
    timer thread of its own (``pgregistry-deadlines`` is gone), and a caller's sub-second
    connect runs on an I/O worker (no ``pgregistry-connect`` threads)."""
    before = {t.ident for t in threading.enumerate()}
    pools = [make_pool(supervisor=None, minconn=2, maxconn=3, query_timeout=1, ping_timeout=1,
                       test_on_borrow=True) for _ in range(2)]
    seen: set[str] = set()
    errors: list[BaseException] = []

    def load(pool: ConnectionPool) -> None:
        try:
            for _ in range(100):
                with pool.conn() as conn, conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.execute("SELECT pg_sleep(0.001)")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def sub_second_connects() -> None:  # a caller's connect with < 1 s left: an I/O worker
        try:
            for _ in range(5):
                pool = make_pool(supervisor=None, minconn=0, maxconn=1, query_timeout=1)
                conn = pool.getconn(timeout=0.9)
                pool.putconn(conn, close=True)
                pool.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    callers = [threading.Thread(target=load, args=(p,), name=f"qt-caller-{i}")
               for i, p in enumerate(pools * 2)]
    callers.append(threading.Thread(target=sub_second_connects, name="qt-connects"))
    for t in callers:
        t.start()
    give_up = time.monotonic() + 60.0
    while any(t.is_alive() for t in callers) and time.monotonic() < give_up:
        seen |= {t.name for t in threading.enumerate()
                 if t.name.startswith("pgregistry") and t.ident not in before}
        callers[0].join(0.01)  # (a bounded wait on the load, then look again)
    for t in callers:
        t.join(10)
        assert not t.is_alive()
    assert errors == []
    names = {t.name for t in threading.enumerate()}
    assert not any(n.startswith(("pgregistry-deadlines", "pgregistry-connect"))
                   for n in names | seen)
    assert "pgregistry-supervisor" in names
    assert seen <= {"pgregistry-supervisor", "pgregistry-io"}, seen


def test_a_callers_connect_starts_at_once_beside_a_hanging_hosts_work():
    """``start_now`` (a caller's sub-second connect) queues behind no key's work and no total
    bound: with every worker taken by a host that hangs, it still starts at once."""
    io = workers.IOWorkers(per_key=1, max_threads=1, idle_s=0.5)
    hang = threading.Event()
    try:
        io.submit("frozen-host", hang.wait)
        io.submit("frozen-host", hang.wait)  # queued behind it
        assert wait_until(lambda: io.stats()["running"] == 1, timeout=5.0)
        ran = threading.Event()
        where: list[str] = []
        t0 = time.monotonic()
        io.start_now("connect", lambda: (where.append(threading.current_thread().name),
                                         ran.set()))
        assert ran.wait(5.0)
        assert time.monotonic() - t0 < 1.0
        assert where == [workers.THREAD_NAME]
        assert io.stats()["queued"] == 1  # the host's own queue is untouched
    finally:
        hang.set()
    assert wait_until(lambda: io.stats()["threads"] == 0, timeout=10.0)  # all exit when idle
