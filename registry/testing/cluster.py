"""Local PostgreSQL clusters for tests: a primary and streaming replicas on loopback addresses.

Every server of a :class:`LocalCluster` listens on its own ``127.0.0.x`` address and all of them
share ONE port, so a test can point a pool at ``host=a,b,c port=P`` exactly like a multi-host
production DSN. The servers themselves are :class:`~.servers.PgServer`; binaries, ports and the
scratch directory are in :mod:`.processes`; an Aurora-like cluster (topology functions, DNS
endpoints) is :mod:`.aurora`. This module also re-exports the names tests import from it.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import psycopg2.extensions

from .processes import (
    PG_USER,
    POLL_INTERVAL,
    HarnessError,
    ServerStartError,
    _children_of,
    _copy_template,
    _live_clusters,
    _live_lock,
    _make_dir,
    _port_is_free,
    _proc_stat,
    _run_pg,
    _stop_all,
    _template,
    base_dir,
    find_pg_bindir,
    free_port,
    spawn_logged,
)
from .servers import Params, PgServer, Rows, SqlClientMixin, SqlServer

__all__ = [
    "HarnessError",
    "LocalCluster",
    "Params",
    "PgServer",
    "Rows",
    "ServerStartError",
    "SqlClientMixin",
    "SqlServer",
    "base_dir",
    "find_pg_bindir",
    "free_port",
    "spawn_logged",
]

# names tests and older harness modules import from here
_REEXPORTED = (PG_USER, _children_of, _proc_stat, _make_dir)

log = logging.getLogger(__name__)


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
