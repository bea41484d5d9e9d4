"""One PostgreSQL server for tests: :class:`PgServer` (a local ``postgres`` process on one
loopback address and port) and the small SQL-client surface every server backend shares
(:class:`SqlServer`, :class:`SqlClientMixin`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import psycopg2
import psycopg2.extensions

from .processes import (
    _STOP_SIGNALS,
    PG_USER,
    POLL_INTERVAL,
    READY_TIMEOUT,
    STOP_TIMEOUT,
    HarnessError,
    ServerStartError,
    _children_of,
    _is_same_process,
    _live_lock,
    _live_servers,
    _proc_stat,
    _run_pg,
    _signal_if_same,
    find_pg_bindir,
    spawn_logged,
)

__all__ = ["Params", "PgServer", "Rows", "SqlClientMixin", "SqlServer"]

log = logging.getLogger(__name__)

Params = Sequence[Any] | Mapping[str, Any] | None
Rows = list[tuple[Any, ...]]


class SqlServer(Protocol):
    """The small surface tests use from any server backend (local process or container)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    def dsn(self, **extra: Any) -> str: ...

    def connect(self, **kw: Any) -> psycopg2.extensions.connection: ...

    def execute(self, sql: str, params: Params = None) -> Rows | None: ...

    def backend_count(self, application_name: str | None = None) -> int: ...

    def stop(self) -> None: ...


class SqlClientMixin:
    """``connect``, ``execute`` and ``backend_count`` for any server class with a ``dsn()``
    (a local PgServer, a container, ...)."""

    def dsn(self, **extra: Any) -> str:  # pragma: no cover - provided by the class
        raise NotImplementedError

    def connect(self, **kw: Any) -> psycopg2.extensions.connection:
        """A new autocommit connection (pass ``autocommit=False`` for a transactional one)."""
        autocommit = bool(kw.pop("autocommit", True))
        kw.setdefault("connect_timeout", 5)
        conn: psycopg2.extensions.connection = psycopg2.connect(self.dsn(), **kw)
        conn.autocommit = autocommit
        return conn

    def execute(self, sql: str, params: Params = None) -> Rows | None:
        """Run one statement on a fresh autocommit connection: its rows, or None."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description is not None else None
        finally:
            conn.close()

    def backend_count(self, application_name: str | None = None) -> int:
        """Client backends in pg_stat_activity, not counting the session that asks."""
        sql = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        params: tuple[Any, ...] = ()
        if application_name is not None:
            sql += " AND application_name = %s"
            params = (application_name,)
        rows = self.execute(sql, params)
        assert rows is not None
        return int(rows[0][0])


class PgServer(SqlClientMixin):
    """One local ``postgres`` process on ``host:port`` with its data in ``datadir``."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        datadir: str | os.PathLike[str],
        *,
        bindir: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.port = int(port)
        self.datadir = Path(datadir)
        self.bindir = bindir or find_pg_bindir()
        self.log_path = (
            Path(log_path) if log_path else self.datadir.with_name(self.datadir.name + ".log")
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._frozen: dict[int, int] = {}  # pid -> start time of every process we SIGSTOPped
        self._lock = threading.RLock()
        # more addresses to listen on besides ``host`` (e.g. "::1"); applied at the next start
        self.extra_listen: list[str] = []

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PgServer {self.name} {self.host}:{self.port} {state}>"

    # -- state ----------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def frozen(self) -> bool:
        return bool(self._frozen)

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of the server's log."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 256 * max(n, 1)))
                lines = fh.read().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    # -- start and stop -------------------------------------------------------------------------

    def _command(self) -> list[str]:
        cmd = [
            str(Path(self.bindir) / "postgres"),
            "-D", str(self.datadir),
            "-c", f"listen_addresses={','.join([self.host, *self.extra_listen])}",
            "-c", f"port={self.port}",
            "-c", "unix_socket_directories=",
            "-c", f"cluster_name={self.name}",
        ]  # fmt: skip
        setpriv = shutil.which("setpriv")
        if setpriv:
            # The kernel sends SIGINT (fast shutdown) to the postmaster when we die.
            cmd = [setpriv, "--pdeathsig=INT", "--", *cmd]
        return cmd

    def start(self, wait: bool = True, timeout: float = READY_TIMEOUT) -> None:
        """Start the postmaster as a direct child; with ``wait``, return once it accepts queries."""
        with self._lock:
            if self.running:
                return
            self._close_log()
            self._frozen.clear()
            cmd = self._command()
            self._proc, self._log_file = spawn_logged(cmd, self.log_path)
            with _live_lock:
                _live_servers.add(self)
            log.debug("started %s pid %s", self.name, self._proc.pid)
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll until the server accepts a connection (and is really this server)."""
        started = time.monotonic()
        deadline = started + timeout
        last_error: Exception | None = None
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise ServerStartError(
                    f"postgres {self.name} ({self.host}:{self.port}) is not running "
                    f"(exit code {code}); log tail:\n{self.log_tail()}"
                )
            try:
                conn = psycopg2.connect(
                    host=self.host, port=self.port, user=PG_USER, dbname="postgres",
                    connect_timeout=1,
                )  # fmt: skip
            except psycopg2.OperationalError as exc:
                last_error = exc
            else:
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT current_setting('data_directory')")
                        row = cur.fetchone()
                finally:
                    conn.close()
                if row is None or os.path.realpath(row[0]) != os.path.realpath(self.datadir):
                    raise ServerStartError(
                        f"{self.host}:{self.port} is answered by another server "
                        f"(data directory {row[0] if row else None!r})"
                    )
                log.debug("%s ready in %.3f s", self.name, time.monotonic() - started)
                return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"postgres {self.name} ({self.host}:{self.port}) not ready after "
                    f"{timeout:.0f} s ({last_error}); log tail:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def stop(self, mode: str = "fast", wait: bool = True, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server: ``fast`` (SIGINT), ``smart`` (SIGTERM) or ``immediate`` (SIGQUIT).

        Signals only our own postmaster; a frozen server is thawed first. With ``wait`` it
        returns once the postmaster has exited (SIGKILL after ``timeout``).
        """
        try:
            sig = _STOP_SIGNALS[mode]
        except KeyError:
            raise ValueError(f"stop mode must be one of {sorted(_STOP_SIGNALS)}") from None
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            self.thaw()
            if proc.poll() is None:
                proc.send_signal(sig)
            if not wait:
                return
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s: SIGKILL", self.name, timeout)
                self._kill_locked()
                return
            self._forget()
            log.debug("stopped %s (%s)", self.name, mode)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash), then wait until its backends are gone too."""
        with self._lock:
            if self._proc is None:
                return
            self._kill_locked()

    def _kill_locked(self) -> None:
        proc = self._proc
        assert proc is not None
        children = _children_of(proc.pid) if proc.poll() is None else {}
        children.update(self._frozen)
        children.pop(proc.pid, None)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        # Orphaned backends exit once they see the postmaster is gone; a stopped one never would.
        for pid, start_time in children.items():
            _signal_if_same(pid, start_time, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while children and time.monotonic() < deadline:
            children = {p: s for p, s in children.items() if _is_same_process(p, s)}
            if children:
                time.sleep(POLL_INTERVAL)
        for pid, start_time in children.items():
            log.warning("backend %s of killed %s still alive: SIGKILL", pid, self.name)
            _signal_if_same(pid, start_time, signal.SIGKILL)
        self._frozen.clear()
        self._forget()
        log.debug("killed %s", self.name)

    def _forget(self) -> None:
        self._proc = None
        self._close_log()
        with _live_lock:
            _live_servers.discard(self)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- freeze ---------------------------------------------------------------------------------

    def freeze(self) -> None:
        """SIGSTOP the postmaster and all its children: connects and queries hang."""
        with self._lock:
            pid = self.pid
            if pid is None:
                raise HarnessError(f"{self.name} is not running")
            stat = _proc_stat(pid)
            if stat is None:
                raise HarnessError(f"{self.name} vanished")
            os.kill(pid, signal.SIGSTOP)
            self._frozen[pid] = stat[2]
            # kill() returns before the stop lands: wait for it, so no child forked meanwhile
            # escapes the scan below.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                stat = _proc_stat(pid)
                if stat is None or stat[0] == "T":
                    break
                time.sleep(0.001)
            for child, start_time in _children_of(pid).items():
                _signal_if_same(child, start_time, signal.SIGSTOP)
                self._frozen[child] = start_time
            log.debug("froze %s (%d processes)", self.name, len(self._frozen))

    def thaw(self) -> None:
        """SIGCONT everything :meth:`freeze` stopped. Always safe to call."""
        with self._lock:
            targets = dict(self._frozen)
            pid = self.pid
            if targets and pid is not None:
                targets.update(_children_of(pid))
            for child, start_time in targets.items():
                if child != pid:
                    _signal_if_same(child, start_time, signal.SIGCONT)
            if pid is not None and pid in targets:
                _signal_if_same(pid, targets[pid], signal.SIGCONT)
            if targets:
                log.debug("thawed %s", self.name)
            self._frozen.clear()

    # -- replication ----------------------------------------------------------------------------

    def promote(self, timeout: float = 30.0) -> None:
        """Promote this standby (``pg_ctl promote -w``) and wait until it accepts writes."""
        _run_pg(
            [
                str(Path(self.bindir) / "pg_ctl"),
                "promote", "-w", "-t", str(int(timeout)), "-D", str(self.datadir),
            ],
            timeout=timeout + 10,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while self.is_in_recovery():
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.name} still in recovery after promote")
            time.sleep(POLL_INTERVAL)

    def is_in_recovery(self) -> bool:
        rows = self.execute("SELECT pg_is_in_recovery()")
        assert rows is not None
        return bool(rows[0][0])

    # -- SQL ------------------------------------------------------------------------------------

    def dsn(self, **extra: Any) -> str:
        """A libpq ``key=value`` string for this server; ``extra`` adds or overrides keys."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": PG_USER,
            "dbname": "postgres",
        }
        params.update(extra)
        return str(psycopg2.extensions.make_dsn(**{k: str(v) for k, v in params.items()}))
