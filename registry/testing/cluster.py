"""Local PostgreSQL servers for tests: a primary and streaming replicas on loopback addresses.

Every server of a :class:`LocalCluster` listens on its own ``127.0.0.x`` address and all of them
share ONE port, so a test can point a pool at ``host=a,b,c port=P`` exactly like a multi-host
production DSN.  Data lives under ``/dev/shm`` (``/tmp`` when that is missing), every data dir is a
``cp -a`` copy of one ``initdb`` template made once per process, and every ``postgres`` runs as a
direct child behind ``setpriv --pdeathsig=INT`` so a killed test runner leaves no server behind.

When the tests run as root, every PostgreSQL program runs as the ``postgres`` system user.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import pwd
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, TypeVar

import psycopg2
import psycopg2.extensions

__all__ = [
    "HarnessError",
    "LocalCluster",
    "PgServer",
    "ServerStartError",
    "SqlServer",
    "base_dir",
    "find_pg_bindir",
    "free_port",
]

log = logging.getLogger(__name__)

PG_USER = "postgres"
READY_TIMEOUT = 30.0
POLL_INTERVAL = 0.005
STOP_TIMEOUT = 30.0
_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}

# Settings appended to the template's postgresql.conf: fast, deterministic, replication-ready.
_TEMPLATE_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "wal_writer_delay": "10ms",
    # off would let a replica read lag up to 200 ms behind a commit
    "synchronous_commit": "on",
    "max_connections": "300",
    "wal_level": "replica",
    "max_wal_senders": "10",
    "hot_standby": "on",
    # a socket in a shared dir clashes between clusters on one port, and one inside the data dir
    # is copied by pg_basebackup and stops the replica from starting
    "unix_socket_directories": "''",
    "listen_addresses": "''",
    "logging_collector": "off",
    "log_destination": "'stderr'",
    "log_line_prefix": "'%m [%p] %q%a '",
    # a replica that lost its primary retries after this long (default 5 s): keeps failover fast
    "wal_retrieve_retry_interval": "100ms",
    # concurrent pg_basebackups: one's checkpoint must not recycle WAL another still streams
    "wal_keep_size": "256MB",
}
_HBA_LINES = (
    "host all all 127.0.0.0/8 trust",
    "host replication all 127.0.0.0/8 trust",
    "host all all ::1/128 trust",
    "host replication all ::1/128 trust",
)

T = TypeVar("T")
Params = Sequence[Any] | Mapping[str, Any] | None
Rows = list[tuple[Any, ...]]


class HarnessError(RuntimeError):
    """The test harness could not do what was asked (missing binaries, a failed command...)."""


class ServerStartError(HarnessError):
    """A postgres server did not become ready; the message holds the tail of its log."""


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


# --------------------------------------------------------------------------------------------
# Binaries, ports, users
# --------------------------------------------------------------------------------------------

_INSTALL_HINT = (
    "PostgreSQL server binaries (postgres, initdb, pg_ctl, pg_basebackup) were not found. "
    "Install them (Debian/Ubuntu: `apt-get install postgresql`; Fedora: "
    "`dnf install postgresql-server`; macOS: `brew install postgresql`) or set "
    "PGREGISTRY_PG_BIN to the directory that holds them."
)


def _version_key(path: Path) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in path.parent.name.split("."):
        if not piece.isdigit():
            return (-1,)
        parts.append(int(piece))
    return tuple(parts)


def find_pg_bindir() -> str:
    """The directory holding the PostgreSQL server binaries.

    ``$PGREGISTRY_PG_BIN`` if set, else the newest ``/usr/lib/postgresql/*/bin``, else the
    ``pg_config --bindir`` or the directory of ``postgres`` on ``PATH``.
    """
    env = os.environ.get("PGREGISTRY_PG_BIN")
    if env:
        if not (Path(env) / "postgres").is_file():
            raise HarnessError(f"PGREGISTRY_PG_BIN={env!r} holds no 'postgres' binary")
        return env
    debian = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if (d / "postgres").is_file()]
    if debian:
        return str(max(debian, key=_version_key))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and (Path(out) / "postgres").is_file():
            return out
    postgres = shutil.which("postgres")
    if postgres:
        return str(Path(postgres).resolve().parent)
    raise HarnessError(_INSTALL_HINT)


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _port_is_free(address: str, port: int) -> bool:
    # No SO_REUSEADDR: even a TIME_WAIT leftover makes the port count as taken.
    with socket.socket(_family(address), socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


_given_ports: set[int] = set()
_port_lock = threading.Lock()


def free_port(addresses: Sequence[str] = ("127.0.0.1",)) -> int:
    """A TCP port free on every one of ``addresses``, never handed out before in this process."""
    if not addresses:
        raise ValueError("free_port needs at least one address")
    with _port_lock:
        for _ in range(500):
            with socket.socket(_family(addresses[0]), socket.SOCK_STREAM) as sock:
                sock.bind((addresses[0], 0))
                port = int(sock.getsockname()[1])
            if port in _given_ports:
                continue
            if all(_port_is_free(address, port) for address in addresses[1:]):
                _given_ports.add(port)
                return port
    raise HarnessError(f"no TCP port is free on all of {list(addresses)}")


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _chown_to_pg(path: Path) -> None:
    if _running_as_root():
        entry = pwd.getpwnam(PG_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _pg_env() -> dict[str, str]:
    # PG* variables of the caller (PGHOST, PGPORT, PGOPTIONS...) must not leak into our servers.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _pg_popen_kwargs() -> dict[str, Any]:
    """Popen arguments that make a PostgreSQL program run as the right user."""
    kwargs: dict[str, Any] = {"env": _pg_env(), "cwd": "/"}
    if _running_as_root():
        kwargs.update(user=PG_USER, group=PG_USER, extra_groups=[])
    return kwargs


def _run_pg(cmd: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a short-lived PostgreSQL program (initdb, pg_basebackup, pg_ctl), raising on failure."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            list(cmd),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **_pg_popen_kwargs(),
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"{cmd[0]} timed out after {timeout:.0f} s: {' '.join(cmd)}") from exc
    log.debug("%s took %.3f s", Path(cmd[0]).name, time.monotonic() - started)
    if done.returncode != 0:
        raise HarnessError(
            f"{' '.join(cmd)} failed with exit code {done.returncode}:\n"
            f"{done.stdout.strip()}\n{done.stderr.strip()}".rstrip()
        )
    return done


# --------------------------------------------------------------------------------------------
# The per-process base directory and the initdb template
# --------------------------------------------------------------------------------------------

_base_lock = threading.Lock()
_base_path: Path | None = None
_base_owner_pid = 0


def base_dir() -> Path:
    """This process's scratch directory (``/dev/shm/pgregistry-<pid>-<random>``), made on first use.

    Mode 0755 and owned by postgres when running as root, so the postgres user can reach the data
    dirs below it. Removed at interpreter exit.
    """
    global _base_path, _base_owner_pid
    with _base_lock:
        if _base_path is not None and _base_owner_pid == os.getpid() and _base_path.is_dir():
            return _base_path
        shm = Path("/dev/shm")
        parent = shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None
        if parent is None:
            parent = Path(tempfile.gettempdir())
        _remove_stale_dirs(parent)
        path = parent / f"pgregistry-{os.getpid()}-{secrets.token_hex(4)}"
        path.mkdir(mode=0o755)
        path.chmod(0o755)  # whatever the umask
        _chown_to_pg(path)
        if _base_owner_pid != os.getpid():
            atexit.register(_cleanup_at_exit)
        _base_path, _base_owner_pid = path, os.getpid()
        log.debug("harness base dir %s", path)
        return path


def _remove_stale_dirs(parent: Path) -> None:
    """Remove base dirs left by harness processes that no longer exist (a SIGKILLed test run:
    its servers died with it, its files did not)."""
    for path in parent.glob("pgregistry-*-*"):
        try:
            owner = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if owner == os.getpid() or Path(f"/proc/{owner}").exists():
            continue
        if any(_postgres_running_in(path)):
            continue
        log.debug("removing stale harness dir %s", path)
        shutil.rmtree(path, ignore_errors=True)


def _postgres_running_in(path: Path) -> Iterator[int]:
    """Pids of live postmasters whose data dir lies under ``path``."""
    for pidfile in path.glob("**/postmaster.pid"):
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if Path(f"/proc/{pid}").exists():
            yield pid


def _make_dir(parent: Path, prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    _chown_to_pg(path)
    return path


_template_lock = threading.Lock()
_templates: dict[str, Path] = {}


def _template(bindir: str) -> Path:
    """The initdb template for ``bindir``, made once per process (thread-safe)."""
    with _template_lock:
        base = base_dir()
        path = _templates.get(bindir)
        if path is not None and path.is_relative_to(base) and path.is_dir():
            return path
        started = time.monotonic()
        path = _make_dir(base, "template-") / "data"
        _run_pg(
            [
                str(Path(bindir) / "initdb"),
                "-D", str(path),
                "-A", "trust",
                "-U", PG_USER,
                "--no-sync",
                "-E", "UTF8",
                "--locale=C",
                "--wal-segsize=1",  # 1 MB WAL files: backups and WAL switches copy far less
            ]
        )  # fmt: skip
        with (path / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# pgregistry test harness\n")
            for key, value in _TEMPLATE_SETTINGS.items():
                conf.write(f"{key} = {value}\n")
        with (path / "pg_hba.conf").open("a", encoding="utf-8") as hba:
            hba.write("\n# pgregistry test harness\n" + "\n".join(_HBA_LINES) + "\n")
        _templates[bindir] = path
        log.info("made PostgreSQL template %s in %.2f s", path, time.monotonic() - started)
        return path


def _copy_template(bindir: str, datadir: Path) -> None:
    # cp -a keeps the postgres ownership and the 0700 mode of the template.
    subprocess.run(["cp", "-a", str(_template(bindir)), str(datadir)], check=True, timeout=60)


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


class _Spawner:
    """Forks the long-lived server processes from one thread that lives as long as the process.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, not the process: a
    postmaster started from a short-lived thread (a thread pool, a timeout helper) would get
    SIGINT as soon as that thread finished.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _loop(self) -> None:
        while True:
            fn, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

    def run(self, fn: Callable[[], T]) -> T:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="pgregistry-spawner", daemon=True
                )
                self._thread.start()
        future: Future[T] = Future()
        self._jobs.put((fn, future))
        return future.result()


_spawner = _Spawner()


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process from /proc, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name may hold spaces and parentheses: split after its closing parenthesis
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _children_of(ppid: int) -> dict[int, int]:
    """{pid: start time} of the live children of ``ppid``."""
    children: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _proc_stat(int(entry))
        if stat is not None and stat[1] == ppid:
            children[int(entry)] = stat[2]
    return children


def _is_same_process(pid: int, start_time: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[2] == start_time and stat[0] not in ("Z", "X")


def _signal_if_same(pid: int, start_time: int, sig: signal.Signals) -> None:
    if _is_same_process(pid, start_time):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


_live_lock = threading.Lock()
_live_servers: set[PgServer] = set()
_live_clusters: set[LocalCluster] = set()


def _cleanup_at_exit() -> None:
    if _base_owner_pid != os.getpid():  # a forked child inherited the handler: not ours
        return
    with _live_lock:
        clusters = list(_live_clusters)
        servers = list(_live_servers)
    for cluster in clusters:
        try:
            cluster.stop()
        except Exception:  # keep going: the rest must still be stopped
            log.exception("stopping %r at exit", cluster)
    _stop_all(servers, "fast")
    if _base_path is not None:
        shutil.rmtree(_base_path, ignore_errors=True)


def _stop_all(servers: Iterable[PgServer], mode: str = "fast") -> None:
    """Stop several servers at once: signal all of them, then wait for each."""
    servers = list(servers)
    for server in servers:
        server.stop(mode, wait=False)
    for server in servers:
        server.stop(mode)


def spawn_logged(cmd: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Start ``cmd`` (as postgres when root) from the long-lived spawner thread, its output
    appended to ``log_path``, in a session of its own (a Ctrl-C of the test runner must not
    reach it; the parent-death signal stops it). Returns the process and the open log file."""
    log_file = log_path.open("ab")
    proc = _spawner.run(
        lambda: subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **_pg_popen_kwargs(),
        )
    )
    return proc, log_file


# --------------------------------------------------------------------------------------------
# One server
# --------------------------------------------------------------------------------------------


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



# --------------------------------------------------------------------------------------------
# A primary with replicas
# --------------------------------------------------------------------------------------------


def _bind_failed(error: ServerStartError) -> bool:
    text = str(error)
    return "could not bind" in text or "could not create any TCP/IP sockets" in text


class LocalCluster:
    """A primary on ``base_ip`` and streaming replicas on the next addresses, all on one port."""

    def __init__(
        self,
        n_replicas: int = 2,
        base_ip: str = "127.0.0.11",
        port: int | None = None,
        *,
        bindir: str | None = None,
        spare_addresses: int = 7,
    ) -> None:
        if n_replicas < 0:
            raise ValueError("n_replicas must be >= 0")
        first = ipaddress.ip_address(base_ip)
        if not first.is_loopback:
            raise ValueError(f"{base_ip} is not a loopback address")
        size = n_replicas + 1 + max(spare_addresses, 0)
        self.addresses: list[str] = [str(first + i) for i in range(size)]
        if not ipaddress.ip_address(self.addresses[-1]).is_loopback:
            raise ValueError(f"{size} addresses from {base_ip} leave the loopback range")
        self.n_replicas = n_replicas
        self.bindir = bindir
        self._requested_port = port
        self.port: int = port or 0
        self.dir: Path | None = None
        self._primary: PgServer | None = None
        self.replicas: list[PgServer] = []
        self._retired: list[PgServer] = []
        self._counter = 0
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return (
            f"<LocalCluster port={self.port} primary={self._primary and self._primary.host}"
            f" replicas={[r.host for r in self.replicas]}>"
        )

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def primary(self) -> PgServer:
        if self._primary is None:
            raise HarnessError("the cluster is not started")
        return self._primary

    @property
    def servers(self) -> list[PgServer]:
        """The primary then the replicas."""
        return ([self._primary] if self._primary is not None else []) + list(self.replicas)

    @property
    def started(self) -> bool:
        return self._primary is not None

    def _new_server(self, role: str, host: str) -> PgServer:
        assert self.dir is not None and self.bindir is not None
        self._counter += 1
        name = role if role == "primary" else f"{role}{self._counter - 1}"
        return PgServer(
            name,
            host,
            self.port,
            self.dir / name,
            bindir=self.bindir,
            log_path=self.dir / f"{name}.log",
        )

    def start(self) -> LocalCluster:
        """Start the primary from the template, then make and start the replicas."""
        with self._lock:
            if self._primary is not None:
                return self
            started = time.monotonic()
            self.bindir = self.bindir or find_pg_bindir()
            _template(self.bindir)
            self.dir = _make_dir(base_dir(), "cluster-")
            with _live_lock:
                _live_clusters.add(self)
            try:
                self._start_primary()
                self._start_replicas(self.n_replicas)
            except BaseException:
                self.stop()
                raise
            log.info(
                "cluster on port %d (%s) started in %.2f s",
                self.port, ", ".join(s.host for s in self.servers), time.monotonic() - started,
            )  # fmt: skip
            return self

    def _start_primary(self) -> None:
        assert self.bindir is not None
        attempts = 1 if self._requested_port else 5
        for attempt in range(attempts):
            self.port = self._requested_port or free_port(self.addresses)
            self._counter = 0
            primary = self._new_server("primary", self.addresses[0])
            _copy_template(self.bindir, primary.datadir)
            try:
                primary.start()
            except ServerStartError as exc:
                primary.stop("immediate")
                if attempt + 1 < attempts and _bind_failed(exc):
                    log.info("port %d got taken, trying another one", self.port)
                    shutil.rmtree(primary.datadir, ignore_errors=True)
                    continue
                raise
            self._primary = primary
            return

    def _basebackup(self, server: PgServer) -> None:
        assert self.bindir is not None
        _run_pg(
            [
                str(Path(self.bindir) / "pg_basebackup"),
                "-h", self.primary.host,
                "-p", str(self.port),
                "-U", PG_USER,
                "-D", str(server.datadir),
                "-R", "-X", "stream", "-c", "fast", "--no-sync",
            ]
        )  # fmt: skip

    def _free_addresses(self) -> list[str]:
        used = {s.host for s in self.servers}
        return [a for a in self.addresses if a not in used]

    def _start_replicas(self, count: int) -> list[PgServer]:
        free = self._free_addresses()
        if count > len(free):
            raise HarnessError(f"no free address left for {count} more replicas")
        new = [self._new_server("replica", free[i]) for i in range(count)]
        if not new:
            return new
        if len(new) == 1:
            self._basebackup(new[0])
        else:
            with ThreadPoolExecutor(max_workers=len(new), thread_name_prefix="pgr-bb") as pool:
                list(pool.map(self._basebackup, new))
        for server in new:
            self.replicas.append(server)
            server.start(wait=False)
        for server in new:
            server.wait_ready()
        return new

    def add_replica(self, ip: str | None = None) -> PgServer:
        """Make and start one more replica of the current primary (next free address)."""
        with self._lock:
            self.primary  # noqa: B018  (raises when not started)
            if ip is None:
                return self._start_replicas(1)[0]
            if ip in {s.host for s in self.servers}:
                raise HarnessError(f"{ip} is already used by this cluster")
            if ip not in self.addresses:
                if not ipaddress.ip_address(ip).is_loopback:
                    raise ValueError(f"{ip} is not a loopback address")
                if not _port_is_free(ip, self.port):
                    raise HarnessError(f"port {self.port} is taken on {ip}")
                self.addresses.append(ip)
            server = self._new_server("replica", ip)
            self._basebackup(server)
            self.replicas.append(server)
            server.start()
            return server

    def remove_replica(self, server: PgServer) -> None:
        """Stop a replica and delete its data."""
        with self._lock:
            if server not in self.replicas:
                raise ValueError(f"{server!r} is not a replica of this cluster")
            self.replicas.remove(server)
            server.stop("fast")
            shutil.rmtree(server.datadir, ignore_errors=True)

    def failover(self, new_primary: PgServer | None = None) -> PgServer:
        """Stop the primary, promote a replica, re-point the other replicas; the new primary.

        The old primary is stopped and leaves the cluster (it would need pg_rewind to rejoin).
        """
        with self._lock:
            old = self.primary
            running = [r for r in self.replicas if r.running]
            if new_primary is None:
                if not running:
                    raise HarnessError("no running replica to promote")
                new_primary = running[0]
            elif new_primary not in running:
                raise HarnessError(f"{new_primary!r} is not a running replica of this cluster")
            started = time.monotonic()
            old.stop("fast")
            new_primary.promote()
            others = [r for r in self.replicas if r is not new_primary]
            for replica in others:
                if not replica.running:
                    continue
                conninfo = psycopg2.extensions.make_dsn(
                    host=new_primary.host,
                    port=str(self.port),
                    user=PG_USER,
                    application_name=replica.name,
                )
                replica.execute("ALTER SYSTEM SET primary_conninfo = %s", (conninfo,))
                replica.execute("SELECT pg_reload_conf()")
            self._retired.append(old)
            self._primary = new_primary
            self.replicas = others
            log.info(
                "failover %s -> %s in %.2f s",
                old.name, new_primary.name, time.monotonic() - started,
            )  # fmt: skip
            return new_primary

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Wait until every running replica has replayed the primary's current WAL position."""
        rows = self.primary.execute("SELECT pg_current_wal_lsn()::text")
        assert rows is not None
        target = str(rows[0][0])
        deadline = time.monotonic() + timeout
        for replica in [r for r in self.replicas if r.running]:
            conn = replica.connect()
            try:
                with conn.cursor() as cur:
                    while True:
                        cur.execute(
                            "SELECT coalesce(pg_last_wal_replay_lsn() >= %s::pg_lsn, false)",
                            (target,),
                        )
                        row = cur.fetchone()
                        if row is not None and row[0]:
                            break
                        if time.monotonic() > deadline:
                            raise TimeoutError(
                                f"{replica.name} did not replay {target} in {timeout} s"
                            )
                        time.sleep(POLL_INTERVAL)
            finally:
                conn.close()

    def stop(self) -> None:
        """Stop every server (thawing frozen ones) and delete the cluster's directory."""
        with self._lock:
            _stop_all(self.servers + self._retired, "fast")
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            self._primary = None
            self.replicas = []
            self._retired = []
            with _live_lock:
                _live_clusters.discard(self)
