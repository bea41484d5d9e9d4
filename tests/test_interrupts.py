"""Interrupts leave the books exact (issue 11): an exception that is not an ``Exception``
(KeyboardInterrupt, SystemExit, an asynchronous exception) anywhere in getconn, putconn or a
connect raises from the interrupted call and leaves the pool exactly as if the call had failed
cleanly: slots, opening counts, waiters and prewarm state.

The targeted cases interrupt one chosen step of a real connection to a real server (a
``connection_factory`` whose method raises once, see ``reliability.interruptible``); the fuzz
test throws asynchronous exceptions (``PyThreadState_SetAsyncExc``) into 8 working threads at
random moments and then checks the books against the server.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from typing import Any

import psycopg2
import pytest
from helpers import run_load_for, wait_until
from pgregistry.pools import ConnectionPool, PoolError
from reliability import (
    Armed,
    Interrupt,
    all_slots_usable,
    books_exact,
    interruptible,
    new_app,
)


def _pool(server: Any, sup: Any, closer: Any, armed: Armed, **kw: Any) -> ConnectionPool:
    kw.setdefault("minconn", 0)
    kw.setdefault("maxconn", 1)
    kw.setdefault("timeout", 2)
    app = new_app("int")
    pool = ConnectionPool(dsn=server.dsn(), application_name=app, supervisor=sup,
                          connection_factory=interruptible(armed), **kw)
    pool.app = app  # type: ignore[attr-defined]
    closer(pool)
    return pool


def _usable_after(pool: ConnectionPool, server: Any) -> None:
    why = books_exact(pool, server, pool.app)  # type: ignore[attr-defined]
    assert not why, f"books not exact after the interrupt: {why}"
    # exact by the pool's own doing, not because the garbage collector found a lost one
    assert "garbage_collected" not in pool.stats()["closed_by_reason"], pool.stats()
    assert len(all_slots_usable(pool, int(pool.maxconn), timeout=2)) == pool.maxconn


def test_an_interrupt_while_a_checkout_connects_gives_the_slot_back(pg_server, supervisor,
                                                                    closer):
    armed = Armed()
    pool = _pool(pg_server, supervisor, closer, armed)
    armed.arm("__init__", "after")  # the connection is open on the server, then: interrupt
    with pytest.raises(Interrupt) as info:
        pool.getconn()
    assert armed.fired == ["__init__"]
    del info  # its traceback holds the half-made connection (as an app's handler would)
    gc.collect()
    st = pool.stats()
    assert (st["size"], st["opening"]) == (0, 0), st
    _usable_after(pool, pg_server)


def test_an_interrupt_in_configure_raises_itself_and_gives_the_slot_back(pg_server, supervisor,
                                                                         closer):
    armed = Armed()
    calls = []

    def configure(conn: Any) -> None:
        calls.append(conn)
        if len(calls) == 1:
            raise Interrupt("interrupt in configure")

    pool = _pool(pg_server, supervisor, closer, armed, configure=configure)
    with pytest.raises(Interrupt):  # not wrapped in a PoolError: an interrupt stays one
        pool.getconn()
    _usable_after(pool, pg_server)


def test_an_interrupted_checkout_connect_does_not_stop_prewarm(pg_server, stepped, closer):
    armed = Armed()
    pool = _pool(pg_server, stepped, closer, armed, minconn=1, maxconn=2)
    armed.arm("__init__", "after")
    with pytest.raises(Interrupt) as info:
        pool.getconn()  # the caller's own connect (the stepped supervisor has not run yet)
    del info  # its traceback holds the half-made connection (as an app's handler would)
    gc.collect()
    stepped.run_until_idle()  # prewarm: once the caller's connect is over, it may go on
    assert pool.stats()["idle"] == 1, pool.stats()
    _usable_after(pool, pg_server)


@pytest.mark.parametrize("method", ["rollback", "close"])
def test_an_interrupt_on_the_return_path_frees_the_slot(pg_server, supervisor, closer, method):
    armed = Armed()
    pool = _pool(pg_server, supervisor, closer, armed, maxconn=2)
    conn = pool.getconn()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")  # a transaction left open: the return rolls it back
    armed.arm(method)
    with pytest.raises(Interrupt):
        pool.putconn(conn, close=method == "close")
    assert armed.fired == [method]
    assert conn.closed  # discarded: the caller still holds it, the pool does not
    _usable_after(pool, pg_server)


def test_an_interrupt_in_reset_frees_the_slot(pg_server, supervisor, closer):
    armed = Armed()
    calls = []

    def reset(conn: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise Interrupt("interrupt in reset")

    pool = _pool(pg_server, supervisor, closer, armed, maxconn=2, reset=reset)
    conn = pool.getconn()
    with pytest.raises(Interrupt):
        pool.putconn(conn)
    assert conn.closed
    _usable_after(pool, pg_server)


def test_an_interrupt_in_the_borrow_ping_frees_the_slot(pg_server, supervisor, closer):
    armed = Armed()
    pool = _pool(pg_server, supervisor, closer, armed, maxconn=2, validation_bypass=0)
    pool.putconn(pool.getconn())  # one idle connection: the next checkout pings it
    armed.arm("cursor")
    with pytest.raises(Interrupt):
        pool.getconn()
    assert armed.fired == ["cursor"]
    gc.collect()
    _usable_after(pool, pg_server)


def test_an_interrupt_while_waiting_leaves_the_queue(pg_server, supervisor, closer):
    """Ctrl-C in the main thread while it waits at maxconn: a signal handler raises (as
    Python's SIGINT handler does) and the wait ends with that exception, out of the queue."""
    armed = Armed()
    pool = _pool(pg_server, supervisor, closer, armed, maxconn=1)
    held = pool.getconn()

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise Interrupt("signal")

    def send_when_waiting() -> None:
        if wait_until(lambda: pool.stats()["waiting"] == 1, 5):
            os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, raise_interrupt)
    sender = threading.Thread(target=send_when_waiting)
    try:
        sender.start()
        t0 = time.monotonic()
        with pytest.raises(Interrupt):
            pool.getconn(timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        sender.join(10)
        signal.signal(signal.SIGUSR1, previous)
    assert pool.stats()["waiting"] == 0
    pool.putconn(held)
    _usable_after(pool, pg_server)


# -- the fuzz test -----------------------------------------------------------------------------

FUZZ_THREADS = 8
FUZZ_MAXCONN = 6
FUZZ_SECONDS = 10.0
FUZZ_SEED = 20261130


def _async_raise(thread: threading.Thread, exc: type[BaseException] | None) -> int:
    """Throw ``exc`` into ``thread`` at its next bytecode boundary (None: withdraw a pending
    one). Returns how many thread states were modified."""
    ident = thread.ident
    assert ident is not None
    obj = ctypes.py_object(exc) if exc is not None else None
    return int(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), obj))


def _stacks(threads: list[threading.Thread]) -> str:
    """Where each live thread of ``threads`` is (for a hang's report)."""
    frames = sys._current_frames()
    return "\n".join(f"--- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
                     for t in threads if t.is_alive() and t.ident in frames)


class ConfigureFailed(Exception):
    """A connect that fails after the server accepted it (the fuzz test's failing connects)."""


def test_fuzz_random_interrupts_into_8_threads_leave_the_books_exact(pg_server, supervisor,
                                                                     closer):
    """8 threads run ``with pool.conn()`` (some leave a transaction open, some fail inside the
    block, some return with ``close=True``; 1 connect in 8 fails in ``configure``) while
    asynchronous exceptions land in them at random moments, for 10 s. Then: no RuntimeError,
    the pool's size equals its backends on the server, nothing opening, in use or waiting,
    and all ``maxconn`` slots can be checked out at once.

    The pool's loggers are silenced meanwhile: ``logging.Handler.handle`` takes its lock
    outside its ``try`` and is itself not safe against asynchronous exceptions (a lock left
    held would hang the run; that is Python's logging, not the pool)."""
    rng = random.Random(FUZZ_SEED)
    app = new_app("fuzz")
    connects = [0]
    failing = [True]  # (not after the fuzz: the checks need every connect to work)

    def configure(conn: Any) -> None:
        connects[0] += 1
        if failing[0] and connects[0] % 8 == 0:
            raise ConfigureFailed("the 8th connect fails")

    pool = ConnectionPool(minconn=2, maxconn=FUZZ_MAXCONN, dsn=pg_server.dsn(),
                          application_name=app, supervisor=supervisor, timeout=2,
                          validation_bypass=0.005, configure=configure)
    closer(pool)
    assert wait_until(lambda: pool.stats()["idle"] == 2, 5)
    stop = threading.Event()
    counts = {"ops": 0, "interrupts": 0, "pool_errors": 0}
    bad: list[str] = []

    def one_op(r: random.Random) -> None:
        kind = r.random()
        if kind < 0.15:
            conn = pool.getconn(timeout=2)
            pool.putconn(conn, close=True)
        elif kind < 0.3:
            try:
                with pool.conn(timeout=2) as conn, conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    raise ValueError("the app fails inside the block")
            except ValueError:
                pass
        else:
            with pool.conn(timeout=2) as conn:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                if kind < 0.6:
                    conn.commit()  # else: the transaction is left open for the return

    def worker(seed: int) -> None:
        r = random.Random(seed)
        while True:
            try:
                if stop.is_set():
                    return
                try:
                    one_op(r)
                    counts["ops"] += 1
                except Interrupt:
                    counts["interrupts"] += 1
                except (PoolError, psycopg2.Error, ConfigureFailed):
                    counts["pool_errors"] += 1
                except RuntimeError as exc:
                    bad.append(f"RuntimeError: {exc!r}")
                except Exception as exc:  # noqa: BLE001 - recorded, the test fails on it
                    bad.append(repr(exc))
            except Interrupt:
                counts["interrupts"] += 1  # landed in this loop's own code

    threads = [threading.Thread(target=worker, args=(rng.randrange(1 << 30),), daemon=True)
               for _ in range(FUZZ_THREADS)]
    pool_logger = logging.getLogger("pgregistry")  # (its modules' loggers inherit the level)
    level = pool_logger.level
    pool_logger.setLevel(logging.CRITICAL + 1)
    thrown = 0
    try:
        for t in threads:
            t.start()
        end = time.monotonic() + FUZZ_SECONDS
        while time.monotonic() < end:
            run_load_for(rng.uniform(0.001, 0.008))
            thrown += _async_raise(rng.choice(threads), Interrupt)
        for t in threads:
            _async_raise(t, None)  # withdraw what has not landed yet
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        stop.set()
        pool_logger.setLevel(level)
    failing[0] = False
    hung = [t.name for t in threads if t.is_alive()]
    gc.collect()  # connections an interrupt left unreferenced give their slots back
    st = pool.stats()
    print(f"\nRELIABILITY: fuzz {FUZZ_SECONDS:g} s, {FUZZ_THREADS} threads, maxconn"
          f" {FUZZ_MAXCONN}: {thrown} interrupts thrown, {counts['interrupts']} seen,"
          f" {counts['ops']} operations done, {counts['pool_errors']} pool errors (failing"
          f" connects, timeouts), {len(bad)} unexpected errors; at rest size {st['size']},"
          f" idle {st['idle']}, closed {st['closed_by_reason']}")
    assert not hung, f"threads still running: {hung}\n{_stacks(threads)}"
    assert not bad, bad[:10]
    why = books_exact(pool, pg_server, app)
    assert not why, f"books not exact after the fuzz: {why}"
    # the pool kept working throughout (a pool that lost its slots serves only timeouts)
    assert counts["ops"] > 300 and counts["interrupts"] > 100, (counts, thrown)
    pids = all_slots_usable(pool, FUZZ_MAXCONN, timeout=5)
    assert len(set(pids)) == FUZZ_MAXCONN
    why = books_exact(pool, pg_server, app)
    assert not why, f"books not exact after using every slot: {why}"
