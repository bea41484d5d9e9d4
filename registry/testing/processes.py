"""The processes under the harness: PostgreSQL binaries, free ports, the postgres user, the
per-process scratch directory with its ``initdb`` template, and the spawner of long-lived servers.

Data lives under ``/dev/shm`` (``/tmp`` when that is missing); every data dir is a ``cp -a`` copy
of one ``initdb`` template made once per process; every long-lived program runs as a direct child
behind ``setpriv --pdeathsig=INT``, so a killed test runner leaves nothing behind. When the tests
run as root, every PostgreSQL program runs as the ``postgres`` system user. Whatever is still
running at interpreter exit is stopped (:func:`track` registers it).
"""

from __future__ import annotations

import atexit
import contextlib
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = [
    "HarnessError",
    "PG_USER",
    "POLL_INTERVAL",
    "READY_TIMEOUT",
    "STOP_TIMEOUT",
    "ServerStartError",
    "base_dir",
    "find_pg_bindir",
    "free_port",
    "run_pg",
    "spawn_logged",
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




class HarnessError(RuntimeError):
    """The test harness could not do what was asked (missing binaries, a failed command...)."""


class ServerStartError(HarnessError):
    """A postgres server did not become ready; the message holds the tail of its log."""


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


def run_pg(cmd: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
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
_live_servers: set[Any] = set()
_live_clusters: set[Any] = set()


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


def _stop_all(servers: Iterable[Any], mode: str = "fast") -> None:
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


_run_pg = run_pg  # the name the harness modules used first
