"""OpenTelemetry metrics for a registry's pools or standalone pools (the ``otel`` extra:
``pip install 'pgregistry[otel]'``, which brings ``opentelemetry-api`` only; the application
chooses the SDK and exporter).

    registry.instrument_otel()                    # the global meter provider
    inst = instrument_pools(pool, meter_provider=provider)
    inst.uninstrument()

Instruments follow OpenTelemetry's semantic conventions for database client connection pools
(``model/db/metrics.yaml`` of open-telemetry/semantic-conventions, status "development"),
each with the attribute ``db.client.connection.pool.name`` (the registry's name for the pool,
or the standalone pool's ``name``):

=========================================  ===============  ============  =======================
instrument                                 kind             unit          value
=========================================  ===============  ============  =======================
``db.client.connection.count``             UpDownCounter    {connection}  ``stats()`` idle / in
                                                                          use, by
                                                                          ``db.client.connection
                                                                          .state`` = idle | used
``db.client.connection.idle.max``          UpDownCounter    {connection}  maxconn
``db.client.connection.idle.min``          UpDownCounter    {connection}  minconn
``db.client.connection.max``               UpDownCounter    {connection}  maxconn
``db.client.connection.pending_requests``  UpDownCounter    {request}     callers waiting
``db.client.connection.timeouts``          Counter          {timeout}     checkouts that timed
                                                                          out
``db.client.connection.create_time``       Histogram        s             each connection opened
``db.client.connection.wait_time``         Histogram        s             each checkout
``db.client.connection.use_time``          Histogram        s             each checkout to its
                                                                          return
=========================================  ===============  ============  =======================

The up-down counters and counters are observable: read from ``stats()`` when the SDK collects.
The three histograms are recorded as things happen, through the pool's timing listener: while a
pool is instrumented its checkouts and returns take the pool's slow path (as with leak
detection), and each checkout and return costs one SDK ``Histogram.record`` (several
microseconds in the Python SDK: ``make bench BENCH_ARGS=--otel`` measures it);
``histograms=False`` leaves them out and the pools their fast paths. An uninstrumented pool
pays nothing.

Our own figures, under ``pgregistry.``: ``pgregistry.pool.connection.opening``,
``pgregistry.pool.connection.opened``, ``pgregistry.pool.connection.closed`` (by
``pgregistry.close.reason``), ``pgregistry.pool.connect_errors``, ``pgregistry.pool.checkouts``,
``pgregistry.pool.rollbacks``, ``pgregistry.pool.role_changes``,
``pgregistry.pool.leaks_detected``; per address (``network.peer.address``,
``network.peer.port``): ``pgregistry.address.connection.count`` (by state idle | used |
opening), ``pgregistry.address.active``, ``pgregistry.address.banned``,
``pgregistry.address.connects``, ``pgregistry.address.connect_failures``; per DNS name
(``dns.question.name``): ``pgregistry.dns.addresses``, ``pgregistry.dns.members``,
``pgregistry.dns.ttl`` (s), ``pgregistry.dns.stale``, ``pgregistry.dns.queries``,
``pgregistry.dns.refresh_failures``, ``pgregistry.dns.stale_served``,
``pgregistry.dns.answer_changes``; per Aurora topology (``pgregistry.topology.cluster``, the
instance host pattern): ``pgregistry.topology.instances`` (by ``pgregistry.role``),
``pgregistry.topology.available``, ``pgregistry.topology.refreshes``,
``pgregistry.topology.refresh_failures``; for a registry (``pgregistry.registry.path``, its YAML
file): ``pgregistry.registry.generation``, ``pgregistry.registry.reloads``,
``pgregistry.registry.reload_errors``. No error text and no secret is ever an attribute.

Everything instrumented on one meter provider shares one set of instruments (OpenTelemetry
creates a name once per meter): two registries, or a registry and standalone pools, report
side by side; their pool names must differ.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .metrics import CLOSE_REASONS, StatsSource, require_extra

require_extra("opentelemetry.metrics", "otel", "pgregistry.otel")

from opentelemetry import metrics as otel_metrics  # noqa: E402
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation  # noqa: E402

__all__ = ["Instrumented", "OtelInstrumentation", "instrument_pools", "instrument_registry"]

logger = logging.getLogger(__name__)

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
#: Histogram bucket boundaries in seconds, given to the SDK as advice (its default boundaries
#: are meant for milliseconds).
TIME_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                  10.0, 30.0, 60.0)
#: How long one ``stats()`` snapshot serves the callbacks of one collection.
SNAPSHOT_REUSE_S = 0.2

Rows = Iterable[Observation]


class _PoolTimings:
    """The timing listener given to one pool: records into the three histograms with the
    pool's name."""

    __slots__ = ("_attrs", "_create", "_wait", "_use")

    def __init__(self, name: str, create: Histogram, wait: Histogram, use: Histogram) -> None:
        self._attrs = {POOL_NAME: name}
        self._create, self._wait, self._use = create, wait, use

    def connection_created(self, seconds: float) -> None:
        self._create.record(seconds, self._attrs)

    def connection_waited(self, seconds: float) -> None:
        self._wait.record(seconds, self._attrs)

    def connection_used(self, seconds: float) -> None:
        self._use.record(seconds, self._attrs)


class OtelInstrumentation:
    """The instruments of one meter provider, shared by everything instrumented on it (an
    instrument name can be created only once per meter: a second registry or pool on the same
    provider joins the first one's instruments). Each :func:`instrument_registry` or
    :func:`instrument_pools` call adds one :class:`Instrumented` source."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self._lock = threading.Lock()
        self._sources: list[Instrumented] = []
        self._snapshot: tuple[float, dict[str, Mapping[str, Any]], list[Mapping[str, Any]]]
        self._snapshot = (-1e18, {}, [])
        self._histograms: tuple[Histogram, Histogram, Histogram] | None = None
        m = meter
        updown, counter = m.create_observable_up_down_counter, m.create_observable_counter
        updown("db.client.connection.count", [self._cb(self._count)], "{connection}",
               "The number of connections that are currently in state described by the state "
               "attribute.")
        updown("db.client.connection.idle.max", [self._cb(self._pool_key("maxconn"))],
               "{connection}", "The maximum number of idle open connections allowed (maxconn).")
        updown("db.client.connection.idle.min", [self._cb(self._pool_key("minconn"))],
               "{connection}", "The minimum number of idle open connections allowed (minconn: "
               "connections the pool keeps open).")
        updown("db.client.connection.max", [self._cb(self._pool_key("maxconn"))],
               "{connection}", "The maximum number of open connections allowed.")
        updown("db.client.connection.pending_requests", [self._cb(self._pool_key("waiting"))],
               "{request}", "The number of current pending requests for an open connection.")
        counter("db.client.connection.timeouts",
                [self._cb(self._pool_key("checkout_timeouts"))], "{timeout}",
                "The number of connection timeouts that have occurred trying to obtain a "
                "connection from the pool.")
        # ours
        updown("pgregistry.pool.connection.opening", [self._cb(self._pool_key("opening"))],
               "{connection}", "Connections being opened.")
        for key, name, unit, text in (
            ("connections_opened", "pgregistry.pool.connection.opened", "{connection}",
             "Connections opened."),
            ("connect_errors", "pgregistry.pool.connect_errors", "{error}",
             "Failed attempts to open a connection."),
            ("checkouts", "pgregistry.pool.checkouts", "{checkout}", "Connections handed out."),
            ("rollbacks", "pgregistry.pool.rollbacks", "{rollback}",
             "Returned connections that had to be rolled back."),
            ("role_changes", "pgregistry.pool.role_changes", "{change}",
             "Times a server of the pool was seen changing role."),
            ("leaks_detected", "pgregistry.pool.leaks_detected", "{checkout}",
             "Checkouts held longer than leak_detection_threshold."),
        ):
            counter(name, [self._cb(self._pool_key(key))], unit, text)
        counter("pgregistry.pool.connection.closed", [self._cb(self._closed)], "{connection}",
                "Connections closed, by pgregistry.close.reason.")
        updown("pgregistry.address.connection.count", [self._cb(self._address_count)],
               "{connection}", "Connections of the pool to the address, by state.")
        for key, name, text in (
            ("active", "pgregistry.address.active",
             "1 while the address is in the latest DNS answer (or configured) for its host."),
            ("banned", "pgregistry.address.banned",
             "1 while the address is banned after failures."),
        ):
            updown(name, [self._cb(self._address_key(key))], "1", text)
        for key, name, unit, text in (
            ("connects", "pgregistry.address.connects", "{connection}",
             "Connections opened to the address."),
            ("connect_failures", "pgregistry.address.connect_failures", "{error}",
             "Failed connects to the address."),
        ):
            counter(name, [self._cb(self._address_key(key))], unit, text)
        updown("pgregistry.dns.addresses", [self._cb(self._dns_len("addresses"))], "{address}",
               "Addresses in the current answer for the name.")
        updown("pgregistry.dns.members", [self._cb(self._dns_len("members"))], "{address}",
               "Addresses the pool uses for the name (its answers within the membership "
               "window).")
        m.create_observable_gauge("pgregistry.dns.ttl", [self._cb(self._dns_key("ttl_s"))], "s",
                                  "TTL of the current answer for the name.")
        updown("pgregistry.dns.stale", [self._cb(self._dns_key("stale"))], "1",
               "1 while the answer in use is past its TTL (refresh failing).")
        for key, name, unit, text in (
            ("queries", "pgregistry.dns.queries", "{query}", "DNS queries for the name."),
            ("refresh_failures", "pgregistry.dns.refresh_failures", "{query}",
             "Failed DNS queries for the name."),
            ("stale_served", "pgregistry.dns.stale_served", "{answer}",
             "Times an expired answer was used for the name."),
            ("answer_changes", "pgregistry.dns.answer_changes", "{answer}",
             "Refreshes whose addresses differed from the last."),
        ):
            counter(name, [self._cb(self._dns_key(key))], unit, text)
        updown("pgregistry.topology.instances", [self._cb(self._topology_instances)],
               "{instance}", "Instances of the Aurora cluster's topology by role.")
        updown("pgregistry.topology.available", [self._cb(self._topology_available)], "1",
               "1 while the topology can be read (else the pool uses DNS discovery).")
        for key, name, text in (
            ("refreshes", "pgregistry.topology.refreshes", "Topology refreshes."),
            ("refresh_failures", "pgregistry.topology.refresh_failures",
             "Topology refreshes that failed."),
        ):
            counter(name, [self._cb(self._topology_key(key))], "{refresh}", text)
        updown("pgregistry.registry.generation", [self._cb(self._registry_key("generation"))],
               "1", "The configuration generation in use.")
        counter("pgregistry.registry.reloads", [self._cb(self._registry_key("reloads"))],
                "{reload}", "Reloads that succeeded.")
        counter("pgregistry.registry.reload_errors",
                [self._cb(self._registry_key("reload_errors"))], "{reload}",
                "Reloads rejected (the running config stays).")

    def add(self, source: StatsSource, histograms: bool) -> Instrumented:
        inst = Instrumented(self, source, histograms)
        with self._lock:
            self._sources.append(inst)
            self._snapshot = (-1e18, {}, [])
        for pool in source.pools:
            inst.attach(pool)
        return inst

    def remove(self, inst: Instrumented) -> None:
        with self._lock:
            if inst in self._sources:
                self._sources.remove(inst)
            self._snapshot = (-1e18, {}, [])

    def histograms(self) -> tuple[Histogram, Histogram, Histogram]:
        """create_time, wait_time, use_time (created on first use)."""
        with self._lock:
            if self._histograms is None:
                m = self.meter
                self._histograms = (
                    m.create_histogram(
                        "db.client.connection.create_time", "s",
                        "The time it took to create a new connection.",
                        explicit_bucket_boundaries_advisory=TIME_BUCKETS_S),
                    m.create_histogram(
                        "db.client.connection.wait_time", "s",
                        "The time it took to obtain an open connection from the pool.",
                        explicit_bucket_boundaries_advisory=TIME_BUCKETS_S),
                    m.create_histogram(
                        "db.client.connection.use_time", "s",
                        "The time between borrowing a connection and returning it to the "
                        "pool.", explicit_bucket_boundaries_advisory=TIME_BUCKETS_S),
                )
            return self._histograms

    # -- observable callbacks -----------------------------------------------------------------

    def _cb(self, fn: Callable[[dict[str, Mapping[str, Any]], list[Mapping[str, Any]]], Rows],
            ) -> Callable[[CallbackOptions], Rows]:
        def callback(options: CallbackOptions) -> Rows:
            pools, registries = self._read()
            return list(fn(pools, registries))
        return callback

    def _read(self) -> tuple[dict[str, Mapping[str, Any]], list[Mapping[str, Any]]]:
        """Every source's pools (a name already seen is skipped, with a warning) and registry
        figures; one read serves every callback of one collection (they run back to back)."""
        now = time.monotonic()
        with self._lock:
            at, pools, registries = self._snapshot
            if now - at <= SNAPSHOT_REUSE_S:
                return pools, registries
            sources = list(self._sources)
        pools, registries = {}, []
        for inst in sources:
            some, registry = inst.source.snapshot()
            for name, s in some.items():
                if name in pools:
                    logger.warning("otel: two pools named %r; reporting only the first", name)
                    continue
                pools[name] = s
            if registry is not None:
                registries.append(registry)
        with self._lock:
            self._snapshot = (time.monotonic(), pools, registries)
        return pools, registries

    @staticmethod
    def _count(pools: dict[str, Mapping[str, Any]], _: Any) -> Rows:
        for name, s in pools.items():
            for key, state in (("idle", "idle"), ("in_use", "used")):
                v = _number(s.get(key))
                if v is not None:
                    yield Observation(v, {POOL_NAME: name, STATE: state})

    @staticmethod
    def _pool_key(key: str) -> Callable[..., Rows]:
        def rows(pools: dict[str, Mapping[str, Any]], _: Any) -> Rows:
            for name, s in pools.items():
                v = _number(s.get(key))
                if v is not None:
                    yield Observation(v, {POOL_NAME: name})
        return rows

    @staticmethod
    def _closed(pools: dict[str, Mapping[str, Any]], _: Any) -> Rows:
        for name, s in pools.items():
            by = s.get("closed_by_reason")
            by = by if isinstance(by, Mapping) else {}
            for reason in (*CLOSE_REASONS, *sorted(str(r) for r in by if r not in CLOSE_REASONS)):
                v = _number(by.get(reason, 0)) or 0
                yield Observation(v, {POOL_NAME: name, "pgregistry.close.reason": reason})

    @staticmethod
    def _addresses(pools: dict[str, Mapping[str, Any]],
                   ) -> Iterable[tuple[dict[str, Any], Mapping[str, Any]]]:
        for name, s in pools.items():
            addresses = s.get("addresses")
            if not isinstance(addresses, Mapping):
                continue
            for label, a in addresses.items():
                if isinstance(a, Mapping):
                    yield {POOL_NAME: name, **_peer(str(label))}, a

    def _address_count(self, pools: dict[str, Mapping[str, Any]], _: Any) -> Rows:
        for attrs, a in self._addresses(pools):
            for key, state in (("idle", "idle"), ("in_use", "used"), ("opening", "opening")):
                v = _number(a.get(key))
                if v is not None:
                    yield Observation(v, {**attrs, STATE: state})

    def _address_key(self, key: str) -> Callable[..., Rows]:
        def rows(pools: dict[str, Mapping[str, Any]], _: Any) -> Rows:
            for attrs, a in self._addresses(pools):
                v = _number(a.get(key))
                if v is not None:
                    yield Observation(v, attrs)
        return rows

    @staticmethod
    def _names(pools: dict[str, Mapping[str, Any]],
               ) -> Iterable[tuple[dict[str, Any], Mapping[str, Any]]]:
        for name, s in pools.items():
            dns = s.get("dns")
            if not isinstance(dns, Mapping):
                continue
            for qname, d in dns.items():
                if isinstance(d, Mapping):
                    yield {POOL_NAME: name, "dns.question.name": str(qname)}, d

    def _dns_len(self, key: str) -> Callable[..., Rows]:
        def rows(pools: dict[str, Mapping[str, Any]], _: Any) -> Rows:
            for attrs, d in self._names(pools):
                items = d.get(key)
                if isinstance(items, (list, tuple)):
                    yield Observation(len(items), attrs)
        return rows

    def _dns_key(self, key: str) -> Callable[..., Rows]:
        def rows(pools: dict[str, Mapping[str, Any]], _: Any) -> Rows:
            for attrs, d in self._names(pools):
                v = _number(d.get(key))
                if v is not None:
                    yield Observation(v, attrs)
        return rows

    @staticmethod
    def _topologies(pools: dict[str, Mapping[str, Any]],
                    ) -> Iterable[tuple[dict[str, Any], Mapping[str, Any]]]:
        for name, s in pools.items():
            t = s.get("topology")
            if isinstance(t, Mapping):
                cluster = str(t.get("instance_host_pattern"))
                yield {POOL_NAME: name, "pgregistry.topology.cluster": cluster}, t

    def _topology_instances(self, pools: dict[str, Mapping[str, Any]], _: Any) -> Rows:
        for attrs, t in self._topologies(pools):
            instances = t.get("instances")
            if isinstance(instances, Mapping):
                roles = [i.get("role") for i in instances.values() if isinstance(i, Mapping)]
                for role in ("writer", "reader"):
                    yield Observation(roles.count(role), {**attrs, "pgregistry.role": role})

    def _topology_available(self, pools: dict[str, Mapping[str, Any]], _: Any) -> Rows:
        for attrs, t in self._topologies(pools):
            state = t.get("state")
            if state is not None:
                yield Observation(int(state != "unavailable"), attrs)

    def _topology_key(self, key: str) -> Callable[..., Rows]:
        def rows(pools: dict[str, Mapping[str, Any]], _: Any) -> Rows:
            for attrs, t in self._topologies(pools):
                v = _number(t.get(key))
                if v is not None:
                    yield Observation(v, attrs)
        return rows

    @staticmethod
    def _registry_key(key: str) -> Callable[..., Rows]:
        def rows(_: Any, registries: list[Mapping[str, Any]]) -> Rows:
            for registry in registries:
                v = _number(registry.get(key))
                if v is not None:
                    path = str(registry.get("path") or "")
                    yield Observation(v, {"pgregistry.registry.path": path})
        return rows


class Instrumented:
    """One registry or set of pools reported on a provider's :class:`OtelInstrumentation`;
    what :func:`instrument_registry` and :func:`instrument_pools` return.
    :meth:`uninstrument` stops reporting it and detaches its timing listeners."""

    def __init__(self, shared: OtelInstrumentation, source: StatsSource,
                 histograms: bool) -> None:
        self.shared = shared
        self.source = source
        self.histograms = histograms
        self._lock = threading.Lock()
        self._active = True
        self._listeners: weakref.WeakKeyDictionary[Any, _PoolTimings] = \
            weakref.WeakKeyDictionary()

    def attach(self, pool: Any) -> None:
        """Record ``pool``'s create, wait and use times, unless ``histograms`` is off (a
        registry calls this for every pool it builds). Idempotent."""
        if not self.histograms:
            return
        create, wait, use = self.shared.histograms()
        with self._lock:
            if not self._active or pool in self._listeners:
                return
            listener = _PoolTimings(str(pool.name), create, wait, use)
            self._listeners[pool] = listener
        pool.add_timing_listener(listener)

    def uninstrument(self) -> None:
        """Stop: its pools are no longer observed (OpenTelemetry cannot delete instruments;
        they report the other sources, or nothing) and lose their timing listeners."""
        with self._lock:
            self._active = False
            attached = list(self._listeners.items())
            self._listeners.clear()
        self.shared.remove(self)
        for pool, listener in attached:
            pool.remove_timing_listener(listener)
        registry = self.source.registry
        if registry is not None:
            registry.remove_pool_observer(self.attach)


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    return None


def _peer(label: str) -> dict[str, Any]:
    """``ip:port`` (``[v6]:port``) as network.peer.address and network.peer.port."""
    host, sep, port = label.rpartition(":")
    if not sep or not port.isdigit():
        return {"network.peer.address": label}
    return {"network.peer.address": host.strip("[]"), "network.peer.port": int(port)}


_shared: dict[int, tuple[Any, OtelInstrumentation]] = {}
_shared_lock = threading.Lock()


def _instrumentation(meter_provider: Any) -> OtelInstrumentation:
    """The provider's one instrumentation (made on first use)."""
    from . import __version__

    provider = meter_provider or otel_metrics.get_meter_provider()
    with _shared_lock:
        found = _shared.get(id(provider))
        if found is None or found[0] is not provider:
            found = (provider, OtelInstrumentation(provider.get_meter("pgregistry", __version__)))
            _shared[id(provider)] = found
        return found[1]


def instrument_registry(registry: Any, meter_provider: Any = None, *,
                        histograms: bool = True) -> Instrumented:
    """Instrument ``registry``'s pools, now and after every reload (see the module docstring),
    on ``meter_provider`` (default: the global meter provider). ``histograms=False`` leaves out
    the three time histograms (nothing is then recorded per checkout: the pools keep their
    fast paths). Same as ``registry.instrument_otel()``."""
    inst = _instrumentation(meter_provider).add(StatsSource.of_registry(registry), histograms)
    registry.add_pool_observer(inst.attach)
    return inst


def instrument_pools(*pools: Any, meter_provider: Any = None,
                     histograms: bool = True) -> Instrumented:
    """Instrument standalone ``ConnectionPool`` objects (attribute
    ``db.client.connection.pool.name`` = the pool's ``name``); ``histograms`` as for
    :func:`instrument_registry`. Raises ``TypeError`` when given no pool or something without
    ``stats()``."""
    return _instrumentation(meter_provider).add(StatsSource.of_pools(*pools), histograms)
