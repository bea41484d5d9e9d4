"""``maxconn`` holds for sockets (issue 11, "Lifecycle"): a connection being closed keeps its
slot until its close has returned, whichever thread closes it (a caller's return, an I/O
worker of the supervisor, an interrupt's recovery), so a pool never has more than ``maxconn``
sockets to its server open or opening. Sampled on real servers: the process's own TCP
sockets to the server (``/proc/self/fd`` and ``/proc/net/tcp``) and the server's backends."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from typing import Any

import psycopg2
import pytest
from helpers import wait_until
from pgregistry.pools import ConnectionPool, PoolTimeout
from reliability import Armed, Interrupt, books_exact, interruptible, new_app

MAXCONN = 4


def _sockets_to(host: str, port: int, skip_fd: int = -1,
                ignore: frozenset[str] = frozenset()) -> set[str]:
    """The TCP sockets of this process connected to host:port, or connecting (a TCP socket
    with no peer that is not listening), but the one on ``skip_fd`` and those in ``ignore``
    (strays of earlier tests), as their ``socket:[inode]`` names: a socket open on two
    descriptors (a dup) counts once."""
    seen: set[str] = set()
    peerless: set[str] = set()
    fd_of: dict[str, str] = {}
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) == skip_fd:
            continue
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
            if not link.startswith("socket:[") or link in seen or link in ignore:
                continue
            fd_of[link] = fd
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue  # closed meanwhile
        try:
            if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
                continue
            try:
                peer = sock.getpeername()
            except OSError:  # no peer: connecting (to this server?), or listening
                if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    peerless.add(link)
                continue
            if peer == (host, port):
                seen.add(link)
        finally:
            sock.close()
    if peerless and port:
        seen |= peerless & _connecting_to(host, port)
    elif peerless:
        seen |= peerless
    # A second look: only the sockets still open on the same descriptor count, so all were
    # open at once (between the two passes), not one closed before another was opened.
    still: set[str] = set()
    for link in seen:
        try:
            if os.readlink(f"/proc/self/fd/{fd_of[link]}") == link:
                still.add(link)
        except OSError:
            continue
    return still


def _connecting_to(host: str, port: int) -> set[str]:
    """The sockets (``socket:[inode]``) whose remote end in /proc/net/tcp is host:port."""
    want = "".join(f"{int(b):02X}" for b in reversed(host.split("."))) + f":{port:04X}"
    found = set()
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            if fields[2] == want:
                found.add(f"socket:[{fields[9]}]")
    return found


class Sampler:
    """Samples, until stopped, the client-side sockets to the server and (``server``) the
    server's backends of ``app`` (on its own connection, not counted); keeps the maxima."""

    def __init__(self, host: str, port: int, server: Any = None, app: str = "") -> None:
        self.host, self.port, self.server, self.app = host, port, server, app
        self.stop = threading.Event()
        self.max_sockets = 0
        self.max_backends = 0
        self.samples = 0
        self.backend_samples = 0
        self.admin = server.connect() if server is not None else None
        self.strays = frozenset(_sockets_to("", 0))  # no peer before the test: not ours
        self.threads = [threading.Thread(target=self._sockets, daemon=True)]
        if self.admin is not None:
            self.admin.autocommit = True
            self.threads.append(threading.Thread(target=self._backends, daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
        if self.admin is not None:
            self.admin.close()

    def _sockets(self) -> None:
        skip = self.admin.fileno() if self.admin is not None else -1
        while not self.stop.is_set():
            n = len(_sockets_to(self.host, self.port, skip, self.strays))
            self.max_sockets = max(self.max_sockets, n)
            self.samples += 1

    def _backends(self) -> None:
        assert self.admin is not None
        with self.admin.cursor() as cur:
            while not self.stop.is_set():
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                            (self.app,))
                self.max_backends = max(self.max_backends, int(cur.fetchone()[0]))
                self.backend_samples += 1


def _work(pool: ConnectionPool, seed: int, until: float, errors: list[BaseException],
          counts: dict[str, int]) -> None:
    rng = random.Random(seed)
    try:
        while time.monotonic() < until:
            conn = pool.getconn(timeout=10)
            kind = rng.choices(["use", "close", "broken"], [5, 3, 2])[0]
            try:
                with conn.cursor() as cur:
                    if kind == "broken":  # the server ends this backend: a broken connection
                        cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")
                    else:
                        cur.execute("SELECT 1")
            except psycopg2.Error:
                pass
            pool.putconn(conn, close=kind == "close")
            counts[kind] = counts.get(kind, 0) + 1
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def test_never_more_sockets_than_maxconn_under_closes_and_broken_connections(
        solo_server, supervisor, closer):
    clean_db = solo_server  # this module's own server: no other test's pool connects to it
    app = new_app("sockets")
    pool = ConnectionPool(minconn=2, maxconn=MAXCONN, dsn=clean_db.dsn(), supervisor=supervisor,
                          application_name=app, timeout=10, query_timeout=1)
    closer(pool)
    sampler = Sampler(clean_db.host, clean_db.port, clean_db, app)
    sampler.start()
    errors: list[BaseException] = []
    counts: dict[str, int] = {}
    until = time.monotonic() + 3.0
    workers = [threading.Thread(target=_work, args=(pool, i, until, errors, counts))
               for i in range(10)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    sampler.join(10)
    print(f"\nRELIABILITY: maxconn={MAXCONN}, 10 threads for 3 s ({counts}): at most "
          f"{sampler.max_sockets} client sockets ({sampler.samples} samples) and "
          f"{sampler.max_backends} server backends ({sampler.backend_samples} samples)")
    assert not errors, errors
    assert not any(t.is_alive() for t in workers)
    assert counts.get("close") and counts.get("broken")
    assert sampler.samples > 20 and sampler.backend_samples > 20
    assert 0 < sampler.max_sockets <= MAXCONN
    assert sampler.max_backends <= MAXCONN
    assert not books_exact(pool, clean_db, app)


def test_query_timeout_cuts_on_a_frozen_server_never_exceed_maxconn(solo_server, supervisor,
                                                                   closer):
    app = new_app("sockets-cut")
    pool = ConnectionPool(minconn=0, maxconn=2, dsn=solo_server.dsn(), supervisor=supervisor,
                          application_name=app, query_timeout=0.3, connect_timeout=1,
                          timeout=3)
    closer(pool)
    held = [pool.getconn(), pool.getconn()]
    sampler = Sampler(solo_server.host, solo_server.port)
    outcomes: list[str] = []

    def cut(conn: Any) -> None:  # the watchdog cuts it; the return closes it
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            outcomes.append("ok")
        except psycopg2.Error:
            outcomes.append("cut")
        pool.putconn(conn)

    def wait() -> None:  # waits for the slots the cuts free, then connects to a frozen server
        try:
            pool.putconn(pool.getconn(timeout=2.5))
            outcomes.append("got")
        except (PoolTimeout, psycopg2.Error, Exception):
            outcomes.append("failed")

    threads = [threading.Thread(target=cut, args=(c,)) for c in held]
    threads += [threading.Thread(target=wait) for _ in range(4)]
    sampler.start()
    solo_server.freeze()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(8)
    finally:
        solo_server.thaw()
        sampler.join(10)
    print(f"\nRELIABILITY: 2 query_timeout cuts on a frozen server, 4 waiters (maxconn=2):"
          f" {sorted(outcomes)}, at most {sampler.max_sockets} client sockets")
    assert not any(t.is_alive() for t in threads)
    assert outcomes.count("cut") == 2
    assert sampler.max_sockets <= 2
    assert wait_until(lambda: not books_exact(pool, solo_server, app, timeout=0.1), 10)


@pytest.mark.parametrize("where", ["caller", "io_worker"])
def test_a_slot_stays_counted_until_its_close_returns(solo_server, supervisor, closer,
                                                      where):
    """A close that takes long (here: held on an event, as a close on a slow link may) keeps
    its slot: a checkout meanwhile waits, and gets the slot when the close returns."""
    app = new_app("sockets-slow-close")
    closing = threading.Event()
    release = threading.Event()

    class SlowClose(psycopg2.extensions.connection):
        def close(self) -> None:
            if not self.closed and threading.current_thread().name != "MainThread":
                closing.set()
                release.wait(10)
            super().close()

    pool = ConnectionPool(minconn=0, maxconn=1, dsn=solo_server.dsn(), supervisor=supervisor,
                          application_name=app, connection_factory=SlowClose, timeout=5,
                          idle_timeout=0.2, reap_idle_interval=0.05 if where == "io_worker"
                          else 0)
    closer(pool)
    strays = frozenset(_sockets_to("", 0))
    conn = pool.getconn()
    if where == "caller":
        returner = threading.Thread(target=pool.putconn, args=(conn,), kwargs={"close": True})
        returner.start()
    else:  # reaped as idle by the supervisor: closed on one of its I/O workers
        pool.putconn(conn)
    try:
        assert closing.wait(5)
        assert pool.stats()["size"] == 1
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.3)  # the slot is the closing connection's
        assert len(_sockets_to(solo_server.host, solo_server.port, ignore=strays)) <= 1
    finally:
        release.set()
    conn = pool.getconn(timeout=5)  # the close returned: the slot is free
    pool.putconn(conn)
    if where == "caller":
        returner.join(5)
    assert not books_exact(pool, solo_server, app)


def test_an_interrupt_in_a_close_frees_its_slot_exactly_once(pg_server, supervisor, closer):
    app = new_app("sockets-interrupt")
    armed = Armed()
    pool = ConnectionPool(minconn=0, maxconn=2, dsn=pg_server.dsn(), supervisor=supervisor,
                          application_name=app, connection_factory=interruptible(armed),
                          timeout=5)
    closer(pool)
    for _ in range(3):
        conn = pool.getconn()
        armed.arm("close")
        with pytest.raises(Interrupt):
            pool.putconn(conn, close=True)
        assert pool.stats()["size"] == 0  # freed, and only once (never below zero)
    conns = [pool.getconn(), pool.getconn()]  # both slots usable
    for c in conns:
        pool.putconn(c)
    assert pool.stats()["size"] == 2
    assert not books_exact(pool, pg_server, app)
