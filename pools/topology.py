"""Aurora topology discovery: the cluster's instances and their roles, read from the cluster
itself, shared by every pool of one cluster.

Facts (AWS's Aurora PostgreSQL documentation and its JDBC/Python drivers; TESTING.md, "Aurora
as it really is"):

- every instance answers ``aurora_replica_status()``: a row per instance with ``server_id``
  (the instance id), ``session_id`` (``'MASTER_SESSION_ID'`` on the writer's row),
  ``replica_lag_in_msec`` and ``last_update_timestamp``; rows of departed instances linger, so
  rows (but the writer's) older than :data:`STALE_ROW_S` (300 s, AWS's driver's rule) are
  ignored. ``aurora_db_instance_identifier()`` names the instance that answered;
- an instance's endpoint is its id in the cluster's domain: ``instance_host_pattern`` with
  ``?`` for the id, e.g. ``?.c9akciq32.eu-west-1.rds.amazonaws.com``, derived from a cluster
  (``<name>.cluster-<id>...``) or reader (``<name>.cluster-ro-<id>...``) endpoint name as AWS's
  driver does;
- the cluster endpoint's DNS follows a failover late (up to 40-60 s per AWS's driver docs);
  the topology names the new writer as soon as it is promoted.

Invariants: one :class:`ClusterTopology` per (instance host pattern, port) in the process;
it never blocks a checkout (readers of :attr:`ClusterTopology.snapshot` get the last good one,
or None); at most one refresh of a topology runs at a time, never on the supervisor thread
(:meth:`ClusterTopology.maybe_refresh` hands it to the supervisor's I/O workers, or to a
thread of its own that ends with it); a refresh that outlives
:attr:`ClusterTopology.refresh_budget_s` is abandoned: the socket of its query is shut down
(the watchdog's way: a frozen instance cannot keep a worker), its late result is dropped, and
the next one may start. While a writer is being hunted (after a writer pool saw its writer go)
the topology is refreshed every :data:`FAILOVER_REFRESH_S` until it names another writer.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import math
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from .clock import REAL_CLOCK, Clock
from .watchdog import PingGuard

__all__ = [
    "DISCOVERY_MODES",
    "ClusterTopology",
    "Instance",
    "MASTER_SESSION_ID",
    "Snapshot",
    "TopologyUnavailable",
    "check_instance_host_pattern",
    "derive_instance_host_pattern",
    "fetch_topology",
    "parse_topology",
    "resolve_discovery",
    "shared_topology",
]

logger = logging.getLogger(__name__)

DISCOVERY_MODES = ("dns", "aurora", "auto")
MASTER_SESSION_ID = "MASTER_SESSION_ID"
STALE_ROW_S = 300.0  # AWS's driver ignores rows (but the writer's) older than this
FAILOVER_REFRESH_S = 1.0  # while hunting a new writer
REQUEST_MIN_INTERVAL_S = 1.0  # refreshes asked for by failures: at most this often
TOPOLOGY_QUERY = (
    "SELECT server_id::text, session_id::text, replica_lag_in_msec::float8,"
    " last_update_timestamp FROM aurora_replica_status()"
)
IDENTIFIER_QUERY = "SELECT aurora_db_instance_identifier()::text"

# <name>.cluster-[ro-|custom-]<cluster id>.<region>.rds.amazonaws.com[.cn]
_RDS_ENDPOINT = re.compile(
    r"^(?P<name>[a-z0-9-]+)\.(?P<kind>cluster-ro-|cluster-custom-|cluster-)"
    r"(?P<domain>[a-z0-9]+\.[a-z0-9-]+\.rds\.amazonaws\.com(?:\.cn)?)\.?$",
    re.IGNORECASE,
)
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


# -- configuration ---------------------------------------------------------------------------


def resolve_discovery(discovery: str, host: str) -> str:
    """The discovery a pool uses: ``"dns"`` or ``"aurora"``.

    ``auto`` is ``aurora`` for an Aurora cluster (``<name>.cluster-<id>...``) or reader
    (``<name>.cluster-ro-<id>...``) endpoint, else ``dns``; a custom endpoint
    (``.cluster-custom-``) stays ``dns`` because the topology does not say which instances it
    holds. Raises ``ValueError`` for an unknown mode."""
    if discovery not in DISCOVERY_MODES:
        raise ValueError(f"discovery must be one of {DISCOVERY_MODES}, got {discovery!r}")
    if discovery != "auto":
        return discovery
    m = _RDS_ENDPOINT.match(host or "")
    return "aurora" if m is not None and m["kind"] != "cluster-custom-" else "dns"


def derive_instance_host_pattern(host: str) -> str | None:
    """``?.<cluster id>.<region>.rds.amazonaws.com`` for an RDS cluster, reader or custom
    endpoint name (as AWS's driver derives it); None for any other name."""
    m = _RDS_ENDPOINT.match(host or "")
    return None if m is None else f"?.{m['domain'].lower().rstrip('.')}"


def check_instance_host_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a host name with exactly one ``?`` (the instance id) as a
    whole label; raise ``ValueError`` saying what is wrong otherwise."""
    if pattern.count("?") != 1:
        raise ValueError(
            f"instance_host_pattern must hold exactly one '?' (the instance id), got {pattern!r}"
        )
    labels = pattern.rstrip(".").split(".")
    if "?" not in labels:
        raise ValueError(
            f"instance_host_pattern: '?' must be a whole DNS label (e.g. '?.abc.eu-west-1."
            f"rds.amazonaws.com'), got {pattern!r}"
        )
    if any(not re.fullmatch(r"[A-Za-z0-9-]{1,63}", lb) for lb in labels if lb != "?"):
        raise ValueError(f"instance_host_pattern is not a host name: {pattern!r}")
    return pattern


# -- what a topology is -----------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One instance of the cluster as the topology names it."""

    server_id: str
    role: str  # "writer" or "reader"
    host: str  # its instance endpoint
    replica_lag_ms: float
    last_update: dt.datetime | None


@dataclass(frozen=True)
class Snapshot:
    """The topology at one refresh. ``fetched_at`` on the topology's clock."""

    instances: tuple[Instance, ...]
    source: str  # the instance id that answered
    fetched_at: float
    ignored: tuple[str, ...] = ()  # stale rows of departed instances

    @property
    def writer(self) -> Instance | None:
        return next((i for i in self.instances if i.role == "writer"), None)

    @property
    def readers(self) -> tuple[Instance, ...]:
        return tuple(i for i in self.instances if i.role == "reader")

    def for_role(self, role: str) -> tuple[Instance, ...]:
        """The instances a pool of ``role`` connects to: the writer for ``writer``; the readers
        for ``reader`` (the writer when there is none, as Aurora's reader endpoint does);
        every instance for ``any``."""
        if role == "writer":
            w = self.writer
            return (w,) if w is not None else ()
        if role == "reader":
            return self.readers or self.for_role("writer")
        return self.instances


class TopologyUnavailable(Exception):
    """The cluster does not give its topology: ``reason`` is a short, fixed kind
    (``function_missing``, ``permission_denied``, ``empty``, ``error``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_topology(
    rows: Iterable[Sequence[Any]], pattern: str, source: str, fetched_at: float
) -> Snapshot:
    """A :class:`Snapshot` from ``aurora_replica_status()`` rows ``(server_id, session_id,
    replica_lag_in_msec, last_update_timestamp)``. Rows other than the writer's older than
    :data:`STALE_ROW_S` before the newest row are dropped (departed instances); of several
    writer rows the newest wins. Raises :class:`TopologyUnavailable` ("empty") when no row is
    left, ``ValueError`` for an instance id that cannot be a DNS label."""
    parsed: list[tuple[str, bool, float, dt.datetime | None]] = []
    for server_id, session_id, lag, updated in rows:
        sid = str(server_id)
        if not _INSTANCE_ID.match(sid):
            raise ValueError(f"topology: instance id {sid!r} cannot be a DNS label")
        parsed.append((sid, session_id == MASTER_SESSION_ID, float(lag or 0.0), updated))
    if not parsed:
        raise TopologyUnavailable("empty", "aurora_replica_status() returned no rows")
    stamps = [u for *_, u in parsed if u is not None]
    newest = max(stamps) if stamps else None

    def age_s(updated: dt.datetime | None) -> float:
        if newest is None or updated is None:
            return 0.0
        return (newest - updated).total_seconds()

    writers = sorted((p for p in parsed if p[1]), key=lambda p: age_s(p[3]))
    writer_id = writers[0][0] if writers else None
    instances: list[Instance] = []
    ignored: list[str] = []
    for sid, _, lag, updated in parsed:
        is_writer = sid == writer_id
        if not is_writer and age_s(updated) > STALE_ROW_S:
            ignored.append(sid)
            continue
        instances.append(Instance(sid, "writer" if is_writer else "reader",
                                  pattern.replace("?", sid), lag, updated))
    instances.sort(key=lambda i: (i.role != "writer", i.server_id))
    return Snapshot(tuple(instances), source, fetched_at, tuple(ignored))


def fetch_topology(conn: psycopg2.extensions.connection) -> tuple[list[tuple[Any, ...]], str]:
    """Run the topology query on ``conn``: (rows, the answering instance's id). Raises
    :class:`TopologyUnavailable` when the functions are missing or not allowed."""
    try:
        with conn.cursor() as cur:
            cur.execute(TOPOLOGY_QUERY)
            rows = list(cur.fetchall())
            cur.execute(IDENTIFIER_QUERY)
            row = cur.fetchone()
    except psycopg2.errors.UndefinedFunction as exc:
        raise TopologyUnavailable(
            "function_missing",
            "aurora_replica_status() does not exist here (not Aurora PostgreSQL?)",
        ) from exc
    except psycopg2.errors.InsufficientPrivilege as exc:
        raise TopologyUnavailable(
            "permission_denied",
            "permission denied for aurora_replica_status() (grant EXECUTE to the pool's user)",
        ) from exc
    finally:
        if not conn.closed and not conn.autocommit:
            conn.rollback()
    return rows, str(row[0]) if row and row[0] else "?"


# -- one cluster's shared topology -------------------------------------------------------------

#: ``probe(host) -> connection``: open a connection to one host (resolved as the pool resolves).
Probe = Callable[[str], psycopg2.extensions.connection]
#: ``submit(key, job)``: run ``job`` off the supervisor's thread (``Supervisor.submit_io``).
Submit = Callable[[str, Callable[[], None]], None]


@dataclass
class _Subscriber:
    wake: Callable[[], None]
    refresh_interval_s: float


class ClusterTopology:
    """The shared topology of one Aurora cluster (its instance host pattern and port).

    Pools subscribe (:meth:`subscribe`) with a wake callback and their refresh interval; the
    shortest interval wins. The supervisor drives it through the pools' maintenance:
    :meth:`due` says when, :meth:`maybe_refresh` starts one refresh in a worker thread, which
    wakes every subscriber when it is done."""

    def __init__(self, pattern: str, port: str, *, clock: Clock = REAL_CLOCK) -> None:
        self.pattern = pattern
        self.port = port
        self.clock = clock
        self.key = f"{pattern}:{port}"
        self.snapshot: Snapshot | None = None
        self.version = 0  # bumped with every new snapshot
        self.unavailable: TopologyUnavailable | None = None  # the last verdict, while it holds
        self.last_error: str | None = None
        self.last_refresh_at: float | None = None
        self.refreshes = 0
        self.refresh_failures = 0
        self.refresh_budget_s = 10.0
        self._lock = threading.Lock()
        self._subs: dict[int, _Subscriber] = {}
        self._ids = itertools.count()
        self._next_at = -math.inf  # refresh at once
        self._running_since: float | None = None
        self._generation = 0
        self._hunting: str | None = None  # the writer id that went, while hunting a new one
        self._hunt_started_at: float | None = None
        self._last_request_at = -math.inf
        self._warned: set[str] = set()
        self._guard: PingGuard | None = None  # the running refresh's query

    def __repr__(self) -> str:
        return f"<ClusterTopology {self.key} v{self.version}>"

    # -- subscribers ---------------------------------------------------------------------------

    def subscribe(self, wake: Callable[[], None], refresh_interval_s: float) -> int:
        with self._lock:
            sid = next(self._ids)
            self._subs[sid] = _Subscriber(wake, refresh_interval_s)
            return sid

    def unsubscribe(self, sid: int) -> None:
        with self._lock:
            self._subs.pop(sid, None)

    @property
    def refresh_interval_s(self) -> float:
        with self._lock:
            return min((s.refresh_interval_s for s in self._subs.values()), default=30.0)

    def _wake_all(self) -> None:
        with self._lock:
            wakes = [s.wake for s in self._subs.values()]
        for wake in wakes:
            try:
                wake()
            except Exception:  # a subscriber's trouble is not the topology's
                logger.debug("topology %s: wake failed", self.key, exc_info=True)

    # -- schedule ------------------------------------------------------------------------------

    @property
    def hunting(self) -> bool:
        return self._hunting is not None

    def due(self) -> float:
        """When the next refresh should start (on the clock); while one runs, when it is
        abandoned."""
        with self._lock:
            if self._running_since is not None:
                return self._running_since + self.refresh_budget_s
            return self._next_at

    def request(self, now: float | None = None) -> bool:
        """Ask for a refresh soon (at most once per :data:`REQUEST_MIN_INTERVAL_S`): a
        connect failed, an instance answered oddly. Returns whether it was moved earlier."""
        now = self.clock.monotonic() if now is None else now
        with self._lock:
            if now - self._last_request_at < REQUEST_MIN_INTERVAL_S or self._next_at <= now:
                return False
            self._last_request_at = now
            self._next_at = now
        self._wake_all()
        return True

    def writer_gone(self, now: float | None = None) -> None:
        """A writer pool saw its writer go (connect refused, 25006, in recovery): refresh at
        once, then every second until the topology names another writer."""
        now = self.clock.monotonic() if now is None else now
        with self._lock:
            snap = self.snapshot
            writer = snap.writer if snap is not None else None
            started = self._hunting is None
            if started:
                self._hunting = writer.server_id if writer is not None else ""
                self._hunt_started_at = now
                self._next_at = min(self._next_at, now)
        if started:
            logger.warning(
                "topology %s: writer %s lost: refreshing every %.0f s until a new writer "
                "appears", self.key, self._hunting or "(unknown)", FAILOVER_REFRESH_S,
            )
            self._wake_all()

    def writer_confirmed(self, host: str) -> None:
        """A writer pool connected (read-write) to ``host``: if that is the topology's writer,
        the hunt is over."""
        with self._lock:
            snap = self.snapshot
            writer = snap.writer if snap is not None else None
            if self._hunting is None or writer is None or writer.host != host.lower():
                return
            self._hunting = None
            self._hunt_started_at = None
            self._next_at = max(self._next_at, self.clock.monotonic() + min(
                (s.refresh_interval_s for s in self._subs.values()), default=30.0))

    # -- refreshing ----------------------------------------------------------------------------

    def maybe_refresh(self, now: float, probe: Probe, seeds: Sequence[str],
                      submit: Submit | None = None) -> bool:
        """Start a refresh if one is due and none is running (or the one running is past its
        budget): on ``submit`` (the supervisor's I/O workers, ``Supervisor.submit_io``), else
        on a thread of its own that ends with it. ``probe`` opens a connection to a host;
        ``seeds`` are hosts to try after the known instances (the cluster's endpoints). Returns
        whether a refresh was started."""
        with self._lock:
            running = self._running_since is not None
            if running and now < self._running_since + self.refresh_budget_s:  # type: ignore[operator]
                return False
            if not running and now < self._next_at:
                return False
            stuck, self._guard = self._guard, None
            if running:
                logger.warning("topology %s: a refresh got no answer in %.0f s: abandoned",
                               self.key, self.refresh_budget_s)
            self._generation += 1
            generation = self._generation
            self._running_since = now
            hosts = self._sources(seeds)
        if running and stuck is not None:
            stuck.expire()  # its blocked read returns at once; the worker ends
        if submit is not None:
            submit(f"topology {self.key}", lambda: self._refresh(generation, probe, hosts))
            return True
        worker = threading.Thread(
            target=self._refresh, args=(generation, probe, hosts),
            name=f"pgregistry-topology-{self.pattern.split('.', 2)[1][:20]}", daemon=True,
        )
        worker.start()
        return True

    def refresh_now(self, probe: Probe, seeds: Sequence[str]) -> None:
        """One refresh in the calling thread (tests, and a constructor that must know)."""
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._running_since = self.clock.monotonic()
            hosts = self._sources(seeds)
        self._refresh(generation, probe, hosts)

    def _sources(self, seeds: Sequence[str]) -> list[str]:
        """Hosts to ask, in order: while hunting a writer the readers first (the old writer
        last); otherwise the writer then the readers; then the seeds."""
        snap = self.snapshot
        known: list[Instance] = list(snap.instances) if snap is not None else []
        if self._hunting is not None:
            known.sort(key=lambda i: i.server_id == self._hunting)
        hosts = [i.host for i in known]
        return list(dict.fromkeys([*hosts, *seeds]))

    def _refresh(self, generation: int, probe: Probe, hosts: list[str]) -> None:
        errors: list[str] = []
        snapshot: Snapshot | None = None
        verdict: TopologyUnavailable | None = None
        for host in hosts:
            try:
                conn = probe(host)
            except Exception as exc:  # noqa: BLE001 - every failure means "try the next one"
                errors.append(f"{host}: {_first_line(exc)}")
                continue
            guard = PingGuard(conn)
            with self._lock:
                if generation == self._generation:
                    self._guard = guard
            try:
                rows, source = fetch_topology(conn)
                snapshot = parse_topology(rows, self.pattern, source, self.clock.monotonic())
            except TopologyUnavailable as exc:
                verdict = exc  # the same on every instance: no use asking the others
            except (psycopg2.Error, ValueError) as exc:
                errors.append(f"{host}: {_first_line(exc)}")
                continue
            finally:
                guard.finish()
                _close_quietly(conn)
            break
        self._finish(generation, snapshot, verdict, errors)

    def _finish(self, generation: int, snapshot: Snapshot | None,
                verdict: TopologyUnavailable | None, errors: list[str]) -> None:
        now = self.clock.monotonic()
        warn: tuple[str, str] | None = None
        info: str | None = None
        with self._lock:
            if generation != self._generation:
                return  # abandoned: a newer refresh owns the state
            self._running_since = None
            self._guard = None
            self.last_refresh_at = now
            self.refreshes += 1
            interval = min((s.refresh_interval_s for s in self._subs.values()), default=30.0)
            if snapshot is not None:
                changed = self.snapshot is None or _shape(self.snapshot) != _shape(snapshot)
                self.snapshot = snapshot
                self.version += 1
                self.last_error = None
                if self.unavailable is not None:
                    info = "the topology is available again"
                self.unavailable = None
                writer = snapshot.writer
                if self._hunting is not None and writer is not None \
                        and writer.server_id != self._hunting:
                    took = now - (self._hunt_started_at or now)
                    info = (f"new writer {writer.server_id}, {took:.2f} s after the old one "
                            "was seen to go")
                    self._hunting = None
                    self._hunt_started_at = None
                if changed:
                    logger.info("topology %s: %s (from %s)", self.key, describe(snapshot),
                                snapshot.source)
            else:
                self.refresh_failures += 1
                if verdict is not None:
                    self.unavailable = verdict
                    self.last_error = str(verdict)
                    if verdict.reason not in self._warned:
                        self._warned.add(verdict.reason)
                        warn = (verdict.reason, f"{verdict}: pools of this cluster use DNS "
                                f"discovery (retrying every {interval:.0f} s)")
                else:
                    self.last_error = "; ".join(errors) or "no instance to ask"
                    if "unreachable" not in self._warned:
                        self._warned.add("unreachable")
                        warn = ("unreachable", f"no instance answered the topology query "
                                f"({self.last_error}); serving the last one known, or DNS")
            self._next_at = now + (FAILOVER_REFRESH_S if self._hunting is not None else interval)
        if warn is not None:
            logger.warning("topology %s: %s", self.key, warn[1])
        if info is not None:
            logger.info("topology %s: %s", self.key, info)
        self._wake_all()

    # -- reading -------------------------------------------------------------------------------

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """The topology for ``stats()``: instances with roles, source, last refresh (seconds
        ago), state (``ok`` / ``hunting_writer`` / ``unavailable`` / ``unknown``)."""
        now = self.clock.monotonic() if now is None else now
        with self._lock:
            snap = self.snapshot
            if self.unavailable is not None:
                state = "unavailable"
            elif self._hunting is not None:
                state = "hunting_writer"
            elif snap is None:
                state = "unknown"
            else:
                state = "ok"
            return {
                "state": state,
                "instance_host_pattern": self.pattern,
                "instances": {
                    i.server_id: {"role": i.role, "host": i.host,
                                  "replica_lag_ms": i.replica_lag_ms}
                    for i in (snap.instances if snap is not None else ())
                },
                "ignored_stale": list(snap.ignored) if snap is not None else [],
                "source": snap.source if snap is not None else None,
                "last_refresh_s_ago": (None if self.last_refresh_at is None
                                       else round(now - self.last_refresh_at, 3)),
                "refreshes": self.refreshes,
                "refresh_failures": self.refresh_failures,
                "last_error": self.last_error,
                "refresh_interval_s": min((s.refresh_interval_s for s in self._subs.values()),
                                          default=30.0),
            }


def describe(snapshot: Snapshot) -> str:
    """``writer i1, readers i2, i3``."""
    w = snapshot.writer
    readers = ", ".join(i.server_id for i in snapshot.readers) or "none"
    return f"writer {w.server_id if w else 'none'}, readers {readers}"


def _shape(snapshot: Snapshot) -> tuple[tuple[str, str], ...]:
    return tuple((i.server_id, i.role) for i in snapshot.instances)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _close_quietly(conn: psycopg2.extensions.connection) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
        logger.debug("closing a topology connection failed", exc_info=True)


# -- the process's topologies -------------------------------------------------------------------

_topologies: weakref.WeakValueDictionary[str, ClusterTopology] = weakref.WeakValueDictionary()
_topologies_lock = threading.Lock()


def shared_topology(pattern: str, port: str, clock: Clock = REAL_CLOCK) -> ClusterTopology:
    """The process's topology of the cluster ``pattern`` (instance host pattern) on ``port``:
    the same object for every pool of that cluster while any of them holds it."""
    key = f"{pattern.lower()}:{port}"
    if clock is not REAL_CLOCK:  # a test's own clock: a topology of its own
        key += f"@{id(clock)}"
    with _topologies_lock:
        topo = _topologies.get(key)
        if topo is None:
            topo = ClusterTopology(pattern.lower(), port, clock=clock)
            _topologies[key] = topo
        return topo


def all_topologies() -> list[ClusterTopology]:
    with _topologies_lock:
        return list(_topologies.values())


def _after_fork_in_child() -> None:
    """In a forked child: a refresh running in the parent has no thread here; locks may have
    been inherited held."""
    global _topologies_lock
    _topologies_lock = threading.Lock()
    for topo in list(_topologies.values()):
        topo._lock = threading.Lock()
        topo._running_since = None
        topo._guard = None
        topo._generation += 1  # a late answer of the parent's worker cannot land here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
