"""PgBouncer in front of local PostgreSQL servers, for tests.

A :class:`PgBouncer` writes its own ``pgbouncer.ini`` and user list into a directory under the
harness's :func:`~pgregistry.testing.cluster.base_dir`, and runs ``pgbouncer`` in the foreground as
a direct child, spawned exactly like the cluster's postmasters: from the harness's long-lived
spawner thread, behind ``setpriv --pdeathsig=INT`` (a killed test runner leaves no bouncer
behind), and as the ``postgres`` user when the tests run as root (PgBouncer refuses root).

Its ``[databases]`` section maps ``postgres`` (and the ``*`` fallback, so any database name
works) to one backend; the admin console (``dbname=pgbouncer``) is open to ``postgres``.

    with PgBouncer(cluster.primary) as bouncer:
        conn = psycopg2.connect(bouncer.dsn())
        bouncer.server_count()          # server connections PgBouncer holds to the backend
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psycopg2
import psycopg2.extensions

from .processes import (
    PG_USER,
    POLL_INTERVAL,
    READY_TIMEOUT,
    HarnessError,
    ServerStartError,
    _make_dir,
    base_dir,
    free_port,
    spawn_logged,
)
from .servers import Params, PgServer, Rows

__all__ = ["PgBouncer", "find_pgbouncer"]

log = logging.getLogger(__name__)

DEFAULT_BINARY = "/usr/sbin/pgbouncer"  # Debian's package puts it outside a user's PATH
STOP_TIMEOUT = 10.0

_INSTALL_HINT = (
    "pgbouncer was not found. Install it (Debian/Ubuntu: `apt-get install pgbouncer`; Fedora: "
    "`dnf install pgbouncer`; macOS: `brew install pgbouncer`) or set PGREGISTRY_PGBOUNCER to "
    "the pgbouncer binary."
)

# Keys of a PgBouncer [databases] entry that a libpq connection string may carry.
_DB_KEYS = ("host", "port", "dbname", "user", "password", "client_encoding", "timezone")
_BARE_VALUE = re.compile(r"^[A-Za-z0-9_.,:/*+-]+$")

Backends = PgServer | Sequence[PgServer] | Mapping[str, str] | str


def find_pgbouncer() -> str:
    """The pgbouncer binary: ``$PGREGISTRY_PGBOUNCER``, else ``pgbouncer`` on ``PATH``, else
    ``/usr/sbin/pgbouncer``. Raises :class:`HarnessError` naming the package to install."""
    env = os.environ.get("PGREGISTRY_PGBOUNCER")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise HarnessError(
                f"PGREGISTRY_PGBOUNCER={env!r} is not an executable file. {_INSTALL_HINT}"
            )
        return env
    found = shutil.which("pgbouncer")
    if found:
        return found
    if os.path.isfile(DEFAULT_BINARY) and os.access(DEFAULT_BINARY, os.X_OK):
        return DEFAULT_BINARY
    raise HarnessError(_INSTALL_HINT)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _quote(value: str) -> str:
    """A value for a PgBouncer connection string (single quotes, doubled inside)."""
    if _BARE_VALUE.match(value):
        return value
    return "'" + value.replace("'", "''") + "'"


def _entry(params: Mapping[str, str]) -> str:
    return " ".join(f"{key}={_quote(str(value))}" for key, value in params.items())


def _primary_of(servers: Sequence[PgServer]) -> PgServer:
    """One server: that one (it may be a replica). Several: the first running non-standby."""
    if not servers:
        raise ValueError("PgBouncer needs at least one backend server")
    if len(servers) == 1:
        return servers[0]
    for server in servers:
        if server.running and not server.is_in_recovery():
            return server
    raise HarnessError(f"no running primary among {servers!r}")


def _entries_from_dsn(dsn: str) -> dict[str, str]:
    """``postgres`` and ``*`` entries from a libpq connection string (key=value or URI)."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        raise ValueError(f"invalid backend connection string: {str(exc).strip()}") from None
    unknown = sorted(set(params) - set(_DB_KEYS))
    if unknown:
        raise ValueError(f"PgBouncer database entries cannot take {unknown}")
    if "," in params.get("host", ""):
        raise ValueError("give PgBouncer one backend host, not a list")
    named = {key: params[key] for key in _DB_KEYS if key in params}
    named.setdefault("dbname", "postgres")
    fallback = {key: value for key, value in named.items() if key != "dbname"}
    return {"postgres": _entry(named), "*": _entry(fallback)}


def _database_entries(backends: Backends) -> tuple[dict[str, str], PgServer | None]:
    """The ``[databases]`` lines and, when the backend is a PgServer, that server."""
    if isinstance(backends, PgServer):
        backends = [backends]
    if isinstance(backends, str):
        return _entries_from_dsn(backends), None
    if isinstance(backends, Mapping):
        if not backends:
            raise ValueError("PgBouncer needs at least one database entry")
        return {str(name): str(entry) for name, entry in backends.items()}, None
    server = _primary_of(list(backends))
    where = {"host": server.host, "port": str(server.port)}
    return {"postgres": _entry({**where, "dbname": "postgres"}), "*": _entry(where)}, server


def _setting(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


# --------------------------------------------------------------------------------------------
# Cleanup at exit
# --------------------------------------------------------------------------------------------

_live_lock = threading.Lock()
_live: set[PgBouncer] = set()
_atexit_pid = 0


def _register_atexit() -> None:
    # Registered at the first start, after base_dir() registered the cluster's handler: atexit
    # runs handlers last-in first-out, so bouncers stop before their backends do.
    global _atexit_pid
    with _live_lock:
        if _atexit_pid != os.getpid():
            _atexit_pid = os.getpid()
            atexit.register(_stop_live_at_exit)


def _stop_live_at_exit() -> None:
    if _atexit_pid != os.getpid():  # inherited by a forked child: not ours
        return
    with _live_lock:
        bouncers = list(_live)
    for bouncer in bouncers:
        try:
            bouncer.stop(timeout=2.0)
        except Exception:  # keep going: the others must still be stopped
            log.exception("stopping %r at exit", bouncer)


# --------------------------------------------------------------------------------------------
# The bouncer
# --------------------------------------------------------------------------------------------


def _bind_failed(log_text: str) -> bool:
    return "Address already in use" in log_text or "nowhere to listen" in log_text


class PgBouncer:
    """One local ``pgbouncer`` listening on ``host:port`` in front of one backend.

    :param backends: a :class:`PgServer` or a list of them (one server: that one; several: the
        first running primary), a libpq connection string for the backend, or a mapping of
        database name to a PgBouncer ``[databases]`` entry (written as given).
    :param extra: more ``[pgbouncer]`` settings, written last (they override the defaults).
    """

    def __init__(
        self,
        backends: Backends,
        *,
        pool_mode: str = "transaction",
        default_pool_size: int = 20,
        max_client_conn: int = 200,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if pool_mode not in ("session", "transaction", "statement"):
            raise ValueError(f"pool_mode must be session, transaction or statement: {pool_mode!r}")
        if default_pool_size < 1 or max_client_conn < 1:
            raise ValueError("default_pool_size and max_client_conn must be at least 1")
        self.backends = backends
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.max_client_conn = max_client_conn
        self._host = host
        self._requested_port = port
        self._port = port or 0
        self.extra: dict[str, Any] = dict(extra or {})
        self.dir: Path | None = None
        self.log_path: Path | None = None
        # the server behind "postgres" (None when given as a connection string or a mapping)
        self.backend: PgServer | None = None
        self.databases: dict[str, str] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PgBouncer {self._host}:{self._port} {self.pool_mode} {state}>"

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def config_path(self) -> Path | None:
        return None if self.dir is None else self.dir / "pgbouncer.ini"

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of PgBouncer's log."""
        if self.log_path is None:
            return ""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 300 * max(n, 1)))
                lines = fh.read().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    # -- configuration --------------------------------------------------------------------------

    def settings(self) -> dict[str, str]:
        """The ``[pgbouncer]`` section as it is written (``extra`` included)."""
        assert self.dir is not None
        settings: dict[str, Any] = {
            "listen_addr": self._host,
            "listen_port": self._port,
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": self.dir / "userlist.txt",
            "admin_users": PG_USER,
            "stats_users": PG_USER,
            "pool_mode": self.pool_mode,
            "default_pool_size": self.default_pool_size,
            "max_client_conn": self.max_client_conn,
            # psycopg2/libpq send these at startup; PgBouncer refuses unknown ones otherwise
            "ignore_startup_parameters": "extra_float_digits,options",
            # tests break backends on purpose: retry a failed server login soon (default 15 s)
            "server_login_retry": 0.5,
            "server_connect_timeout": 5,
            "log_stats": 0,
        }
        settings.update(self.extra)
        return {key: _setting(value) for key, value in settings.items()}

    def _write_config(self) -> None:
        assert self.dir is not None
        self.databases, self.backend = _database_entries(self.backends)
        (self.dir / "userlist.txt").write_text(f'"{PG_USER}" ""\n', encoding="utf-8")
        lines = ["; written by pgregistry.testing.pgbouncer", "[databases]"]
        lines += [f"{name} = {entry}" for name, entry in self.databases.items()]
        lines += ["", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in self.settings().items()]
        path = self.config_path
        assert path is not None
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    # -- start and stop -------------------------------------------------------------------------

    def _command(self, binary: str) -> list[str]:
        cmd = [binary, str(self.config_path)]
        setpriv = shutil.which("setpriv")
        if setpriv:
            # The kernel sends SIGINT (PgBouncer's safe shutdown) when the spawner thread dies.
            cmd = [setpriv, "--pdeathsig=INT", "--", *cmd]
        return cmd

    def start(self, timeout: float = READY_TIMEOUT, *, check_backend: bool = True) -> PgBouncer:
        """Start PgBouncer; return once it answers a connection (to the admin console, then,
        with ``check_backend``, to ``postgres`` through the backend)."""
        with self._lock:
            if self.running:
                return self
            binary = find_pgbouncer()
            _register_atexit()
            started = time.monotonic()
            if self.dir is None or not self.dir.is_dir():
                self.dir = _make_dir(base_dir(), "pgbouncer-")
            self.log_path = self.dir / "pgbouncer.log"
            attempts = 1 if self._requested_port else 5
            for attempt in range(attempts):
                self._port = self._requested_port or free_port([self._host])
                self._write_config()
                self._spawn(binary)
                try:
                    self._wait_ready(timeout, check_backend)
                except ServerStartError as exc:
                    self._halt()
                    if attempt + 1 < attempts and _bind_failed(str(exc)):
                        log.info("port %d got taken, trying another one", self._port)
                        continue
                    raise
                break
            log.info(
                "pgbouncer on %s:%d (%s mode, backend %s) ready in %.3f s",
                self._host, self._port, self.pool_mode, self.databases.get("postgres"),
                time.monotonic() - started,
            )  # fmt: skip
            return self

    def _spawn(self, binary: str) -> None:
        assert self.log_path is not None
        cmd = self._command(binary)
        self._close_log()
        self._proc, self._log_file = spawn_logged(cmd, self.log_path)
        with _live_lock:
            _live.add(self)
        log.debug("started pgbouncer pid %s: %s", self._proc.pid, " ".join(cmd))

    def _wait_ready(self, timeout: float, check_backend: bool) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise ServerStartError(
                    f"pgbouncer ({self._host}:{self._port}) is not running (exit code {code}); "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                conn = self._admin_connect()
            except psycopg2.OperationalError as exc:
                last_error = exc
            else:
                conn.close()
                break
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"pgbouncer ({self._host}:{self._port}) not ready after {timeout:.0f} s "
                    f"({last_error}); log tail:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)
        if not check_backend:
            return
        budget = max(1, int(deadline - time.monotonic()))
        try:
            self.execute("SELECT 1", connect_timeout=budget)
        except psycopg2.Error as exc:
            raise ServerStartError(
                f"pgbouncer ({self._host}:{self._port}) cannot reach its backend "
                f"{self.databases.get('postgres')!r}: {str(exc).strip()}; "
                f"log tail:\n{self.log_tail()}"
            ) from exc

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGINT (safe shutdown: PgBouncer waits for open transactions) and wait; after
        ``timeout`` seconds SIGTERM (immediate), then SIGKILL."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            started = time.monotonic()
            for sig, wait_s in (
                (signal.SIGINT, timeout),
                (signal.SIGTERM, 5.0),
                (signal.SIGKILL, 30.0),
            ):
                if proc.poll() is None:
                    proc.send_signal(sig)
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    log.warning(
                        "pgbouncer %s:%d ignored %s for %.0f s (an open transaction?)",
                        self._host, self._port, sig.name, wait_s,
                    )  # fmt: skip
            self._forget()
            log.debug("stopped pgbouncer %s:%d in %.3f s", self._host, self._port,
                      time.monotonic() - started)  # fmt: skip

    def _halt(self) -> None:
        """Stop a bouncer that failed to start, without ceremony."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._forget()

    def _forget(self) -> None:
        self._proc = None
        self._close_log()
        with _live_lock:
            _live.discard(self)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def reload(self) -> None:
        """Rewrite the configuration (``backends`` and ``extra`` may have changed) and make
        PgBouncer read it again (SIGHUP)."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise HarnessError(f"{self!r} is not running")
            self._write_config()
            proc.send_signal(signal.SIGHUP)

    # -- clients --------------------------------------------------------------------------------

    def dsn(self, **extra: Any) -> str:
        """A libpq ``key=value`` string for PgBouncer; ``extra`` adds or overrides keys."""
        params: dict[str, Any] = {
            "host": self._host,
            "port": self._port,
            "user": PG_USER,
            "dbname": "postgres",
        }
        params.update(extra)
        return str(psycopg2.extensions.make_dsn(**{k: str(v) for k, v in params.items()}))

    def connect(self, **kw: Any) -> psycopg2.extensions.connection:
        """A new autocommit connection through PgBouncer (``autocommit=False`` for a
        transactional one); other keywords are libpq parameters (``dbname``...)."""
        autocommit = bool(kw.pop("autocommit", True))
        kw.setdefault("connect_timeout", 5)
        conn: psycopg2.extensions.connection = psycopg2.connect(self.dsn(), **kw)
        conn.autocommit = autocommit
        return conn

    def execute(self, sql: str, params: Params = None, **connect_kw: Any) -> Rows | None:
        """Run one statement through PgBouncer on a fresh autocommit connection."""
        conn = self.connect(**connect_kw)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description is not None else None
        finally:
            conn.close()

    # -- the admin console ----------------------------------------------------------------------

    def _admin_connect(self) -> psycopg2.extensions.connection:
        conn: psycopg2.extensions.connection = psycopg2.connect(
            host=self._host, port=self._port, user=PG_USER, dbname="pgbouncer", connect_timeout=1
        )
        conn.autocommit = True  # the console takes simple queries only: no BEGIN
        return conn

    def admin(self, sql: str) -> Rows:
        """Run one admin console command (``SHOW POOLS``, ``SHOW SERVERS``, ``RECONNECT``...):
        its rows (empty for commands without any)."""
        conn = self._admin_connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console, each row as a dict of its columns."""
        conn = self._admin_connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f"SHOW {what}")
                names = [col[0] for col in cur.description or ()]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def server_count(self, database: str = "postgres") -> int:
        """Server connections PgBouncer holds for ``database`` (every state: active, idle,
        used, tested, logging in), from ``SHOW SERVERS``."""
        return sum(1 for row in self.show("SERVERS") if row["database"] == database)

    def server_pids(self, database: str = "postgres") -> list[int]:
        """Backend pids of those server connections (on the backend: ``pg_backend_pid()``)."""
        return [
            int(row["remote_pid"]) for row in self.show("SERVERS") if row["database"] == database
        ]

    def wait_servers(
        self,
        predicate: Callable[[list[int]], bool],
        database: str = "postgres",
        timeout: float = 10.0,
    ) -> list[int]:
        """Poll :meth:`server_pids` until ``predicate(pids)`` is true; return those pids."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.server_pids(database)
            if predicate(pids):
                return pids
            if time.monotonic() > deadline:
                raise TimeoutError(f"PgBouncer servers still {pids} after {timeout} s")
            time.sleep(POLL_INTERVAL)
