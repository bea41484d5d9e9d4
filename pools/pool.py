"""ConnectionPool: a thread-safe pool of psycopg2 connections, and how its parts fit.

The pool is a facade over small parts, each one concept with its invariants at its top:

- ``bag``: the books (one lock), the lock-free checkout/return hot path, fair waiting;
- ``opening``: opening a connection into a counted slot, closing one that left the books;
- ``returning``: cleaning a returned connection (rollback, the user's reset, role check);
- ``maintenance``: the supervisor's step for this pool (prewarm, reaping, expiry, leaks);
- ``placement``: connections over addresses (retirement, rebalancing);
- ``roles``: the writer guard, servers that change role;
- ``watchdog``: deadlines on pings and queries a frozen server would hang;
- ``stats``: counters, the stats snapshot, error text; ``fork``: after ``fork()``.
- ``settings``: checks, ``retune``, what the hot path needs from the settings.

The parts talk through the bag (the shared state, changed only under its lock) and through
callbacks the pool wires here; none imports the pool. ``getconn`` and ``putconn`` are the bag's
own methods, bound on each pool (no forwarding call on the hot path). Maintenance runs on the
process's one supervisor thread through ``_maintain(now)``; getconn/putconn never wait for it.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import psycopg2.extensions as ext

from .addresses import DEFAULT_MEMBERSHIP_WINDOW_S
from .bag import Bag
from .checkout import Checkout
from .clock import REAL_CLOCK, Clock, RealClock
from .connector import Connector
from .entry import Entry
from .fork import forget_inherited
from .fork import register as _register_for_fork
from .lag import LagMonitor
from .listener import Dedicated, Listener
from .maintenance import RECHECK_INTERVAL_S, Maintenance
from .opening import Opener, close_quietly
from .placement import Placement
from .resolver import DnsSettings, HostResolver
from .returning import RECYCLE_MODES, Restorer
from .roles import READ_ONLY_SQLSTATE, RoleGuard, server_role
from .settings import (
    LIVE_SETTINGS,
    Setting,
    apply_checkout_settings,
    check_arguments,
    check_sizes,
    retune,
)
from .stats import WAIT_BUCKETS_S, pool_stats
from .supervisor import Supervisor, get_supervisor
from .timing import TimingListener, Timings
from .watchdog import Watchdog

__all__ = ["ConnectionPool", "READ_ONLY_SQLSTATE", "RECHECK_INTERVAL_S", "WAIT_BUCKETS_S",
           "server_role"]

logger = logging.getLogger(__name__)

Connection = ext.connection

_pool_counter = iter(range(1, 1 << 62))


class ConnectionPool:
    """A pool of psycopg2 connections.

    The first seven parameters are those of psycopg2_pool2's ``ConnectionPool`` (in its order);
    everything else is keyword-only. Unknown keywords are libpq connection parameters (``host``,
    ``port``, ``dbname``, ``user``, ``connect_timeout``, ...), merged over ``dsn``.

    :param minconn: connections kept open (prewarmed, refilled by the supervisor).
    :param maxconn: never more connections than this, opening ones included.
    :param idle_timeout: seconds a connection above ``minconn`` may sit idle before it is reaped
        (``None``: never).
    :param reap_idle_interval: seconds between idle reaps by the supervisor (0: never; call
        :meth:`reap_idle_connections` yourself).
    :param lifetime_timeout: a connection's lifetime in seconds, each jittered by
        ±``lifetime_jitter`` (``None``: forever). Expired idle connections are closed by the
        supervisor; checked-out ones on return.
    :param test_on_borrow: ping a connection (``SELECT 1``) before handing it out, unless it was
        returned less than ``validation_bypass`` seconds ago.
    :param background_prewarm: open ``minconn`` connections on the supervisor thread; when false
        they are opened in the constructor, which raises if it cannot.
    :param timeout: default seconds ``getconn`` waits when the pool is at ``maxconn``; 0 raises
        :class:`PoolTimeout` at once.
    :param max_waiting: callers allowed to wait at once (0: no limit); beyond it
        :class:`PoolTooManyWaiters` at once.
    :param reuse: ``"fifo"`` (the connection idle longest goes first) or ``"lifo"``.
    :param configure: called once with each new connection before it is first handed out.
    :param recycle: ``"fast"`` (rollback only, no ping), ``"verified"`` (ping on checkout),
        ``"clean"`` (also ``DISCARD ALL`` on return, bounded by ``ping_timeout``); ``None``:
        ``test_on_borrow`` decides. See ``returning``.
    :param max_replica_lag: seconds of replication lag past which a replica gets no new
        checkouts (see ``lag``); ``None``: off. Live.
    :param password_file, password_provider: see ``credentials`` (asked per new connection).
    :param reset: called with each returned connection (after the rollback); if it raises, the
        connection is discarded.
    :param autocommit: set ``conn.autocommit`` on every new connection.
    :param dns_membership_window: seconds (float, 0..3600, default 300) an address a host
        name's DNS answers named stays a member of the pool after the last answer that named
        it. A name whose answers rotate (Aurora's reader endpoint answers ONE instance per
        query) is the union of its answers over this window, so a rotation never closes a
        connection; an address that DNS no longer names leaves when the window ends, or at
        once when connecting to it fails. 0 follows each answer exactly. The default keeps a
        member of a 15-instance endpoint sampled every second with odds of being dropped by
        chance of 1e-9 per window (see ``pgregistry.pools.addresses``). Live (``retune``).
    :param discovery: ``"dns"``, ``"aurora"`` (members from the cluster's topology,
        ``aurora_replica_status()``, see :mod:`pgregistry.pools.topology`) or ``"auto"``
        (default: ``aurora`` for an Aurora cluster or reader endpoint name, else ``dns``).
    :param instance_host_pattern: with ``aurora``, an instance endpoint with ``?`` for the
        instance id (default: derived from an RDS endpoint name; ``ValueError`` otherwise).
    :param topology_refresh_interval: seconds between topology refreshes (default 30).
    """


    # Live settings kept by the parts that use them (retune() sets them by name).
    timeout = Setting("_bag", "timeout")
    max_waiting = Setting("_bag", "max_waiting")
    idle_timeout = Setting("_maintenance", "idle_timeout")
    reconnect_backoff = Setting("_maintenance", "backoff_initial")
    reconnect_backoff_max = Setting("_maintenance", "backoff_max")
    lifetime_timeout = Setting("_opener", "lifetime_timeout")
    lifetime_jitter = Setting("_opener", "lifetime_jitter")
    rebalance_fraction = Setting("_placement", "rebalance_fraction")
    rebalance_interval = Setting("_placement", "rebalance_interval")
    role_check_interval = Setting("_roles", "check_interval")
    ping_timeout = Setting("_watchdog", "ping_timeout")
    dns_membership_window = Setting("_connector", "membership_window")

    def __init__(
        self,
        minconn: int = 1,
        maxconn: int | float = 10,
        idle_timeout: float | None = 300.0,
        reap_idle_interval: float = 300.0,
        lifetime_timeout: float | None = 86400.0,
        test_on_borrow: bool = True,
        background_prewarm: bool = True,
        *,
        dsn: str | None = None,
        name: str | None = None,
        timeout: float = 30.0,
        max_waiting: int = 0,
        reuse: str = "fifo",
        lifetime_jitter: float = 0.1,
        validation_bypass: float = 0.5,
        configure: Callable[[Connection], None] | None = None,
        reset: Callable[[Connection], None] | None = None,
        autocommit: bool | None = None,
        reconnect_backoff: float = 1.0,
        reconnect_backoff_max: float = 60.0,
        clock: Clock | None = None,
        supervisor: Supervisor | None = None,
        rng: random.Random | None = None,
        dns: DnsSettings | Mapping[str, Any] | None = None,
        resolver: HostResolver | None = None,
        placement: str = "least_connections",
        address_ban: float = 1.0,
        address_ban_max: float = 60.0,
        rebalance_fraction: float = 0.25,
        rebalance_interval: float = 1.0,
        role: str = "any",
        role_check_interval: float = 5.0,
        leak_detection_threshold: float | None = None,
        ping_timeout: float = 5.0,
        query_timeout: float | None = None,
        recycle: str | None = None,
        dns_membership_window: float = DEFAULT_MEMBERSHIP_WINDOW_S,
        max_replica_lag: float | None = None,
        discovery: str = "auto",
        instance_host_pattern: str | None = None,
        topology_refresh_interval: float = 30.0,
        **connect_kwargs: Any,
    ) -> None:
        check_arguments(
            minconn=minconn, maxconn=maxconn, timeout=timeout, idle_timeout=idle_timeout,
            reap_idle_interval=reap_idle_interval, lifetime_timeout=lifetime_timeout,
            validation_bypass=validation_bypass, reconnect_backoff=reconnect_backoff,
            lifetime_jitter=lifetime_jitter, reuse=reuse, max_waiting=max_waiting, role=role,
            rebalance_fraction=rebalance_fraction,
        )
        if role == "writer" and connect_kwargs.get("target_session_attrs") in (None, "any"):
            # a writer pool connects only where writes are accepted
            connect_kwargs["target_session_attrs"] = "read-write"

        self.name = name or f"pool-{next(_pool_counter)}"
        self._clock = clock or (supervisor.clock if supervisor else REAL_CLOCK)
        self._supervisor = supervisor or get_supervisor()
        self._rng = rng or random.Random()
        self._connector = Connector(
            dsn, dns=dns, resolver=resolver, clock=self._clock, placement=placement,
            ban_initial=address_ban, ban_max=address_ban_max, rng=self._rng, name=self.name,
            membership_window=dns_membership_window, role=role, discovery=discovery,
            instance_host_pattern=instance_host_pattern,
            topology_refresh_interval=topology_refresh_interval, **connect_kwargs,
        )
        self._dedicated = Dedicated(self.name, self._connector)  # listeners' connections
        self._role = role
        self._test_on_borrow = test_on_borrow
        self._validation_bypass = validation_bypass
        self._leak_threshold = leak_detection_threshold or None

        # the books and the hot path (the hot path reads time through a plain function: the
        # builtin, for the real clock)
        now_fn = time.monotonic if isinstance(self._clock, RealClock) else self._clock.monotonic
        bag = self._bag = Bag(self.name, minconn=minconn, maxconn=maxconn, timeout=timeout,
                              max_waiting=max_waiting, fifo=reuse == "fifo", now=now_fn)
        self._task = self._supervisor.register(self, due=math.inf)
        request, task = self._supervisor.request, self._task

        def wake() -> None:
            request(task)

        self._wake = wake
        self._connector.set_wake(wake)  # a new topology (pools/topology.py): look again now
        self._connector.set_io(self._supervisor.submit_io)  # where its query runs

        orphans = bag.orphans

        def on_lost(wref: Any) -> None:  # a checked-out connection was garbage-collected
            orphans.append(wref)
            request(task)

        self._watchdog = Watchdog(
            self.name, self._supervisor, self._clock, ban=self._ban_timed_out,
            label_of=self._label_of, ping_timeout=ping_timeout, query_timeout=query_timeout,
        )
        sup = self._supervisor

        def wake_by(deadline: float) -> None:
            sup.request_by(task, deadline)

        if query_timeout:  # the server cancels a statement past it (see watchdog)
            self._watchdog.server_side = self._connector.add_session_setting(
                "statement_timeout", str(max(1, round(query_timeout * 1000))))
        self._opener = Opener(
            bag, self._connector, self._watchdog, self._clock, self._rng, on_lost=on_lost,
            wake=wake, dispose=sup.run_io, autocommit=autocommit, configure=configure,
            lifetime_timeout=lifetime_timeout, lifetime_jitter=lifetime_jitter,
        )
        self._opener.server_role = server_role
        self._placement = Placement(
            bag, self._opener, self._connector, wake=wake, submit=sup.submit_io,
            rebalance_fraction=rebalance_fraction, rebalance_interval=rebalance_interval,
        )
        self._roles = RoleGuard(
            role, bag, self._connector, self._clock, retire=self._placement.retire, wake=wake,
            check_interval=role_check_interval,
        )
        self._roles.bounded = self._watchdog.bounded
        role_changed = self._roles.changed if role != "any" else None
        self._restorer = Restorer(bag, reset=reset, role_changed=role_changed,
                                  bounded=self._watchdog.bounded)
        self._maintenance = Maintenance(
            bag, self._opener, self._placement, self._roles if role != "any" else None,
            self._connector, self._rng, now=self._clock.monotonic(), submit=sup.submit_io,
            wake=wake, wake_by=wake_by, idle_timeout=idle_timeout,
            reap_idle_interval=reap_idle_interval, leak_threshold=self._leak_threshold,
            backoff_initial=reconnect_backoff, backoff_max=reconnect_backoff_max,
        )
        # the bag's hooks
        bag.ping = self._ping_entry
        bag.role_changed = role_changed
        bag.open_for_caller = self._opener.open_for_caller
        bag.restore = self._restorer.restore
        bag.close_conn = self._opener.close
        bag.forgotten = self._forgotten
        self._recycle: str | None = None
        self.recycle = recycle  # (sets test_on_borrow and the return path)
        self._lag: LagMonitor | None = None
        self.max_replica_lag = max_replica_lag
        # the hot path: the bag's own methods, with no forwarding call
        self.getconn = bag.getconn  # type: ignore[method-assign]
        self.putconn = bag.putconn  # type: ignore[method-assign]
        self._pid = os.getpid()
        _register_for_fork(self)

        logger.info(
            "pool %s: created (%s, minconn=%s, maxconn=%s)",
            self.name, self._connector.describe(), minconn, maxconn,
        )
        if minconn and not background_prewarm:
            self._maintenance.prewarm_now(self.close)
        wake()

    # -- wiring -------------------------------------------------------------------------------

    def _apply_checkout_settings(self) -> None:
        """What the hot path needs from the settings (see ``settings.apply_checkout_settings``)."""
        apply_checkout_settings(
            self._bag, self._restorer, self._maintenance, role=self._role, recycle=self._recycle,
            ping_after=self._validation_bypass if self._test_on_borrow else math.inf,
            leak_threshold=self._leak_threshold)

    # -- timing listeners (metrics) ---------------------------------------------------------

    @property
    def timing_listeners(self) -> tuple[TimingListener, ...]:
        """The listeners told every connect, checkout and return time (see pools.timing)."""
        timings = self._bag.timings
        return timings.listeners if timings is not None else ()

    def add_timing_listener(self, listener: TimingListener) -> None:
        """Tell ``listener`` how long each connect (``connection_created``), checkout
        (``connection_waited``) and checkout-to-return (``connection_used``) takes, in seconds.
        While a pool has listeners its checkouts and returns take the slow path (about a lock
        each); without, nothing is timed. Adding one twice adds it once."""
        if listener not in self.timing_listeners:
            self._set_timing_listeners((*self.timing_listeners, listener))

    def remove_timing_listener(self, listener: TimingListener) -> None:
        """Stop telling ``listener``; one that was not added is ignored."""
        self._set_timing_listeners(tuple(x for x in self.timing_listeners if x is not listener))

    def _set_timing_listeners(self, listeners: tuple[TimingListener, ...]) -> None:
        self._bag.timings = Timings(listeners) if listeners else None
        self._apply_checkout_settings()

    def _ping_entry(self, e: Entry, conn: Connection, budget_s: float | None) -> bool:
        return self._ping(conn, e, budget_s)

    def _ping(self, conn: Connection, e: Entry | None = None,
              budget_s: float | None = None) -> bool:
        """A bounded ``SELECT 1`` (see Watchdog.ping); a timeout bans ``e``'s address."""
        return self._watchdog.ping(conn, e.address if e is not None else None, budget_s)

    def _ban_timed_out(self, label: str) -> None:
        self._connector.book.mark(label, self._clock.monotonic(), "timeout")

    def _label_of(self, conn: Connection) -> str | None:
        e = self._bag.entries.get(id(conn))
        return e.address if e is not None else None

    def _forgotten(self, e: Entry) -> None:
        """An entry left the books (under the lock)."""
        self._connector.book.closed(e.address)
        self._watchdog.untrack(e.key)

    def _maintain(self, now: float) -> float | None:
        """One maintenance step (the supervisor calls this; see maintenance.Maintenance)."""
        nxt = self._maintenance.step(now)
        if self._lag is not None and nxt is not None and not self._bag.closed:
            nxt = min(nxt, self._lag.step(now))
        return nxt

    # -- public API -------------------------------------------------------------------------

    @property
    def minconn(self) -> int:
        return self._bag.minconn

    @property
    def maxconn(self) -> int | float:
        return self._bag.maxconn

    @property
    def closed(self) -> bool:
        return self._bag.closed

    @property
    def role(self) -> str:
        return self._role

    @property
    def query_timeout(self) -> float | None:
        return self._watchdog.query_timeout

    @property
    def max_replica_lag(self) -> float | None:
        return self._lag.max_lag_s if self._lag is not None else None

    @max_replica_lag.setter
    def max_replica_lag(self, value: float | None) -> None:
        self._lag = LagMonitor.retune(self._lag, value, self.name, self._connector, self._clock,
                                      retire=self._placement.retire, wake=self._wake)

    @property
    def recycle(self) -> str | None:
        return self._recycle

    @recycle.setter
    def recycle(self, value: str | None) -> None:
        if value is not None and value not in RECYCLE_MODES:
            raise ValueError(f"recycle must be one of {RECYCLE_MODES} (or None), got {value!r}")
        self._recycle = value
        self._restorer.discard_all = value == "clean"
        if value is not None:
            self._test_on_borrow = value != "fast"
        self._apply_checkout_settings()

    @property
    def test_on_borrow(self) -> bool:
        return self._test_on_borrow

    @test_on_borrow.setter
    def test_on_borrow(self, value: bool) -> None:
        self._test_on_borrow = bool(value)
        self._apply_checkout_settings()

    @property
    def validation_bypass(self) -> float:
        return self._validation_bypass

    @validation_bypass.setter
    def validation_bypass(self, value: float) -> None:
        self._validation_bypass = value
        self._apply_checkout_settings()

    @property
    def leak_detection_threshold(self) -> float | None:
        return self._leak_threshold

    @leak_detection_threshold.setter
    def leak_detection_threshold(self, value: float | None) -> None:
        self._leak_threshold = value or None
        self._apply_checkout_settings()
        self._supervisor.request(self._task)

    @property
    def reap_idle_interval(self) -> float:
        return self._maintenance.reap_idle_interval

    @reap_idle_interval.setter
    def reap_idle_interval(self, value: float) -> None:
        self._maintenance.set_reap_idle_interval(value, self._clock.monotonic())

    def conn(self, timeout: float | None = None) -> Checkout:
        """``with pool.conn() as conn:`` check out a connection and give it back on exit."""
        return Checkout(self, timeout)

    def getconn(self, timeout: float | None = None) -> Connection:
        """Check out a connection: an idle one, else a new one below ``maxconn``, else wait up
        to ``timeout`` seconds (default: the pool's ``timeout``; 0: raise at once).

        Raises :class:`PoolTimeout` (:class:`PoolTooManyWaiters` past ``max_waiting``),
        :class:`PoolClosed`, or :class:`ConnectError` when the pool's own connect fails.
        (Each pool binds the bag's method in its place: see ``bag.Bag.getconn``.)"""
        return self._bag.getconn(timeout)

    def putconn(self, conn: Connection, close: bool = False) -> None:
        """Give a connection back. Uncommitted work is rolled back; a broken, closed or expired
        connection is closed and its slot freed; ``close=True`` closes it. A connection this pool
        does not hold as checked out raises :class:`BadConnectionError`, leaving the pool as
        it was. (Each pool binds the bag's method in its place: see ``bag.Bag.putconn``.)"""
        self._bag.putconn(conn, close)

    def reap_idle_connections(self) -> int:
        """Close idle connections above ``minconn`` that have been idle longer than
        ``idle_timeout``, and idle ones past their lifetime. Returns how many were closed."""
        return self._maintenance.reap(self._clock.monotonic(), reap_idle=True)

    def owns(self, conn: object) -> bool:
        """Whether ``conn`` is a connection this pool gave out and has not had back."""
        return self._bag.owns(conn)

    def report_read_only(self, conn: Connection) -> None:
        """A write failed with SQLSTATE 25006 on ``conn``: on a writer pool, its server is a
        demoted writer. (``pool.conn()`` and registry handles call this for you.)"""
        self._roles.report_read_only(conn)

    def replicas_lagging(self) -> bool:
        """Every replica lags more than ``max_replica_lag`` (a registry falls back then)."""
        return self._lag is not None and self._lag.all_over

    def unreachable(self) -> bool:
        """Nothing to serve with and nowhere to try: no open connection, and every address
        banned (or none known). A registry falls back to another pool then."""
        with self._bag.lock:
            if self._bag.size > 0:
                return False
        return self._connector.all_banned(self._clock.monotonic())

    # Settings a running pool takes in place; everything else is connection identity.
    LIVE_SETTINGS = LIVE_SETTINGS

    def retune(self, **settings: Any) -> None:
        """Apply settings in place (sizes, timeouts, reuse order, placement, bans...). A new
        ``lifetime_timeout`` applies to connections opened from now on. Raises ``ValueError``
        for a setting that is connection identity, or a negative value (see
        ``settings.retune``)."""
        retune(self, self._bag, self._connector.book, self._wake, settings)

    def set_credentials(self, **source: Any) -> None:
        """New connections' password source from now on (``Credentials``' keywords)."""
        self._connector.set_credentials(**source)
        logger.info("pool %s: credentials now from %s", self.name,
                    self._connector.credentials.describe())

    def listener(self, **kwargs: Any) -> Listener:
        """LISTEN/NOTIFY on a dedicated connection outside ``maxconn`` (see ``listener``)."""
        return self._dedicated.listener(lambda: self, **kwargs)

    def open_dedicated(self, deadline: float | None = None) -> tuple[Connection, str]:
        """A connection outside the books, and its address (see ``listener.Dedicated``)."""
        return self._dedicated.open(deadline)

    def release_dedicated(self, label: str) -> None:
        self._dedicated.release(label)

    def set_dns(self, dns: DnsSettings | Mapping[str, Any] | None) -> None:
        """Resolve with new DNS settings from now on (answers are fetched afresh)."""
        self._connector.resolver = HostResolver(dns, self._clock)
        self._supervisor.request(self._task)

    def clear_idle(self, reason: str = "cleared") -> int:
        """Close every idle connection now, whatever ``minconn`` says (the supervisor refills
        to ``minconn`` afterwards). Returns how many were closed."""
        return self._opener.close_idle(reason)

    def resize(self, maxconn: int | float, minconn: int | None = None) -> None:
        """Change the sizes live. Growing serves waiters at once; shrinking closes surplus idle
        connections now and surplus checked-out ones on return. Raises ``ValueError`` for
        sizes ``ConnectionPool`` would refuse."""
        new_min = self._bag.minconn if minconn is None else minconn
        check_sizes(new_min, maxconn)
        self._maintenance.resize(maxconn, new_min, self._clock.monotonic())

    def close(self) -> None:
        """Close the pool: idle connections now, checked-out ones when they come back. Waiters
        and later calls get :class:`PoolClosed`. Idempotent."""
        bag = self._bag
        with bag.lock:
            if bag.closed:
                return
            bag.closed = True
            bag.cap = -1
            bag.fail_waiters_locked()
            # in the same locked step (a return racing this sees closed and closes its own)
            conns = [(e, bag.forget_locked(e)) for e in bag.drain_idle_locked()]
        self._supervisor.unregister(self._task)
        self._connector.close()  # leaves the cluster's shared topology
        for e, conn in conns:
            self._opener.close(e, conn, "pool_closed")
        self._dedicated.close()
        if self._lag is not None:
            self._lag.close()
        logger.info("pool %s: closed", self.name)

    def close_all(self) -> None:
        """Close the pool and every connection it gave out, in use or not (psycopg2's
        ``closeall``)."""
        with self._bag.lock:
            in_use = [e.wref() for e in self._bag.entries.values() if e.wref is not None]
        self.close()
        for conn in in_use:
            if conn is not None and not conn.closed:
                close_quietly(conn)

    def stats(self) -> dict[str, Any]:
        """Sizes and counters: a snapshot taken under the lock."""
        out = pool_stats(self._bag, self._connector, self._clock.monotonic, role=self._role,
                         role_changes=self._roles.changes, recycle=self._recycle,
                         max_replica_lag=self.max_replica_lag)
        out["listeners"] = self._dedicated.stats()
        return out

    def status(self) -> dict[str, int | float]:
        """psqlpy's four figures."""
        bag = self._bag
        with bag.lock:
            return {
                "max_size": bag.maxconn,
                "size": bag.size,
                "available": len(bag.idle),
                "waiting": len(bag.waiters),
            }

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"size={self._bag.size}/{self.maxconn}"
        return f"<ConnectionPool {self.name!r} {self._connector.describe()} {state}>"

    # -- fork ---------------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """In a child process: forget every inherited connection without closing it (see
        fork.py), and start afresh; the supervisor prewarms anew. Never logs."""
        forget_inherited(self._bag.reset_after_fork())
        self._maintenance.reset_backoff()
        self._maintenance.pid = self._pid = os.getpid()
        self._connector.after_fork()
        if not self.closed:
            self._supervisor.request(self._task)
            self._supervisor.start_if_needed()

