"""A ``prometheus_client`` collector for a registry's pools or standalone pools (the
``prometheus`` extra: ``pip install 'pgregistry[prometheus]'``).

    registry.register_prometheus()           # into prometheus_client's global REGISTRY
    collector = register_pools(pool_a, pool_b, collector_registry=my_registry)
    my_registry.unregister(collector)

The collector reads ``stats()`` when it is scraped (nothing runs in between) and yields
prometheus_client's own metric families, so the exposition, OpenMetrics output and the
content negotiation are prometheus_client's. Every name starts with ``pgregistry_``; series
carry a ``pool`` label (the registry's name for the pool, or ``stats()["name"]`` of a standalone
one), per-address series an ``address`` label (``ip:port``), per-DNS-name series a ``name``
label. Free text is never a label or a value: no error message, no connection string, no
password.

Families (counters end in ``_total`` in the exposition):

- pools: ``pool_info`` {role, placement}, ``pool_connections`` {state: idle | in_use |
  opening}, ``pool_size``, ``pool_min_size``, ``pool_max_size``, ``pool_waiting``,
  ``pool_closed``, ``pool_checkouts``, ``pool_checkout_timeouts``,
  ``pool_checkout_wait_seconds`` (histogram; a checkout that did not wait counts as 0 s),
  ``pool_checkout_wait_seconds_max``, ``pool_connections_opened``, ``pool_connections_closed``
  {reason}, ``pool_connect_errors``, ``pool_rollbacks``, ``pool_role_changes``,
  ``pool_leaks_detected``, ``pool_connection_create_seconds`` (histogram, when the pool keeps
  it), ``pool_fallback_active`` {fallback}, ``pool_fallback_checkouts``;
- addresses: ``address_connections`` {state}, ``address_open_connections``, ``address_active``,
  ``address_banned``, ``address_ban_remaining_seconds``, ``address_connects``,
  ``address_connect_failures``;
- DNS names: ``dns_addresses``, ``dns_ttl_seconds``, ``dns_expires_in_seconds``, ``dns_stale``,
  ``dns_queries``, ``dns_refresh_failures``, ``dns_stale_served``, ``dns_members``,
  ``dns_answer_changes``, ``dns_family_failures`` {rdtype};
- Aurora topology (``discovery: aurora``; label ``cluster``, the instance host pattern):
  ``topology_instances`` {role}, ``topology_available``, ``topology_hunting_writer``,
  ``topology_refresh_age_seconds``, ``topology_refreshes``, ``topology_refresh_failures``;
- the registry: ``registry_generation``, ``registry_reloads``, ``registry_reload_errors``,
  ``registry_last_reload_timestamp_seconds``, ``registry_last_reload_success``,
  ``registry_last_reload_duration_seconds``, ``registry_draining_pools``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from .metrics import CLOSE_REASONS, CONNECTION_STATES, StatsSource, require_extra

require_extra("prometheus_client", "prometheus", "pgregistry.prometheus")

from prometheus_client import REGISTRY, CollectorRegistry  # noqa: E402
from prometheus_client.core import (  # noqa: E402
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector  # noqa: E402

__all__ = ["PoolCollector", "register_pools", "register_registry"]

logger = logging.getLogger(__name__)

PREFIX = "pgregistry_"
_M = TypeVar("_M", bound=Metric)


class _Families:
    """Families by name, created on first use with their label names, kept in order."""

    def __init__(self) -> None:
        self._by_name: dict[str, Metric] = {}

    def gauge(self, name: str, help_: str, labels: tuple[str, ...]) -> GaugeMetricFamily:
        return self._get(name, lambda: GaugeMetricFamily(PREFIX + name, help_, labels=labels))

    def counter(self, name: str, help_: str, labels: tuple[str, ...]) -> CounterMetricFamily:
        return self._get(name, lambda: CounterMetricFamily(PREFIX + name, help_, labels=labels))

    def histogram(self, name: str, help_: str, labels: tuple[str, ...]) -> HistogramMetricFamily:
        return self._get(name,
                         lambda: HistogramMetricFamily(PREFIX + name, help_, labels=labels))

    def info(self, name: str, help_: str, labels: tuple[str, ...]) -> InfoMetricFamily:
        return self._get(name, lambda: InfoMetricFamily(PREFIX + name, help_, labels=labels))

    def _get(self, name: str, make: Callable[[], _M]) -> _M:
        fam = self._by_name.get(name)
        if fam is None:
            fam = self._by_name[name] = make()
        return fam  # type: ignore[return-value]  # one name, one kind: the callers' tables

    def __iter__(self) -> Iterator[Metric]:
        return (f for f in self._by_name.values() if f.samples)


def _number(value: Any) -> float | None:
    """A sample value from a stats value: numbers and booleans; anything else is left out."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _timestamp(value: Any) -> float | None:
    """Unix seconds from a number or an ISO 8601 string (naive ones are taken as UTC)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        return None
    try:
        when = _dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


def _buckets(raw: Any, count: Any) -> list[tuple[str, float]] | None:
    """``{upper bound in seconds: cumulative count}`` as prometheus_client's bucket list, sorted
    and ending at +Inf (whose count is ``count`` when the mapping lacks it)."""
    pairs: list[tuple[float, float]] = []
    if isinstance(raw, Mapping):
        for bound, n in raw.items():
            try:
                le = float(bound)
            except (TypeError, ValueError):
                continue
            v = _number(n)
            if v is not None and not math.isnan(le):
                pairs.append((le, v))
    pairs.sort()
    if not pairs or not math.isinf(pairs[-1][0]):
        total = _number(count)
        if total is None:
            if not pairs:
                return None
            total = pairs[-1][1]
        pairs.append((math.inf, total))
    return [("+Inf" if math.isinf(le) else repr(le), n) for le, n in pairs]


class PoolCollector(Collector):
    """A collector over one or more :class:`~pgregistry.metrics.StatsSource` objects. Register
    it with a ``CollectorRegistry`` (see :func:`register_registry`, :func:`register_pools`);
    each scrape reads ``stats()`` once per pool.

    One collector per ``CollectorRegistry``: two collectors would each yield the same families
    (prometheus_client does not merge them). To expose two registries, or a registry and
    standalone pools, give all their sources to one collector:
    ``PoolCollector(StatsSource.of_registry(a), StatsSource.of_pools(p))`` (their pool names
    must differ; only the first source's registry figures are exposed)."""

    def __init__(self, *sources: StatsSource) -> None:
        if not sources:
            raise TypeError("PoolCollector needs at least one StatsSource")
        self.sources = sources

    def describe(self) -> list[Metric]:
        # Nothing is read at registration (no name check: the families depend on the stats).
        return []

    def collect(self) -> Iterator[Metric]:
        out = _Families()
        seen: set[str] = set()
        registry_done = False
        for source in self.sources:
            pools, registry = source.snapshot()
            for name, s in pools.items():
                if name in seen:
                    logger.warning("metrics: two pools labelled %r; exposing only the first",
                                   name)
                    continue
                seen.add(name)
                _pool_series(out, name, s)
            if registry is not None and not registry_done:
                _registry_series(out, registry)
                registry_done = True
        yield from out


def _pool_series(out: _Families, pool: str, s: Mapping[str, Any]) -> None:
    lb = ("pool",)

    def gauge(name: str, help_: str, value: Any) -> None:
        v = _number(value)
        if v is not None:
            out.gauge(name, help_, lb).add_metric([pool], v)

    def counter(name: str, help_: str, value: Any) -> None:
        v = _number(value)
        if v is not None:
            out.counter(name, help_, lb).add_metric([pool], v)

    role, placement = s.get("role"), s.get("placement")
    if isinstance(role, str) and isinstance(placement, str):
        out.info("pool", "The pool's role and placement policy.", lb).add_metric(
            [pool], {"role": role, "placement": placement})
    for state in CONNECTION_STATES:
        v = _number(s.get(state))
        if v is not None:
            out.gauge("pool_connections",
                      "Connections of the pool by state: idle, in_use (checked out) or opening.",
                      ("pool", "state")).add_metric([pool, state], v)
    gauge("pool_size", "Connections of the pool, open or opening (what max_size bounds).",
          s.get("size"))
    gauge("pool_min_size", "Connections the pool keeps open (minconn).", s.get("minconn"))
    gauge("pool_max_size", "Most connections the pool may have (maxconn).", s.get("maxconn"))
    gauge("pool_waiting", "Callers waiting for a connection.", s.get("waiting"))
    gauge("pool_closed", "1 when the pool is closed.", s.get("closed"))

    counter("pool_checkouts", "Connections handed out.", s.get("checkouts"))
    counter("pool_checkout_timeouts",
            "Checkouts that failed: timed out, or too many callers were waiting.",
            s.get("checkout_timeouts"))
    waits = _buckets(s.get("wait_histogram"), s.get("checkouts"))
    if waits is not None:
        out.histogram("pool_checkout_wait_seconds",
                      "Time to obtain a connection (a checkout that did not wait counts as 0 s).",
                      lb).add_metric([pool], waits, _number(s.get("wait_total_s")) or 0.0)
    gauge("pool_checkout_wait_seconds_max",
          "Longest wait for a connection since the pool was created.", s.get("wait_max_s"))
    creates = _buckets(s.get("create_histogram"), s.get("connections_opened"))
    if creates is not None and isinstance(s.get("create_histogram"), Mapping):
        out.histogram("pool_connection_create_seconds",
                      "Time to open a connection (resolve, connect, configure).",
                      lb).add_metric([pool], creates, _number(s.get("create_total_s")) or 0.0)

    counter("pool_connections_opened", "Connections opened.", s.get("connections_opened"))
    by_reason = s.get("closed_by_reason")
    by_reason = by_reason if isinstance(by_reason, Mapping) else {}
    closed = out.counter("pool_connections_closed", "Connections closed, by reason.",
                         ("pool", "reason"))
    for reason in (*CLOSE_REASONS, *sorted(str(r) for r in by_reason if r not in CLOSE_REASONS)):
        closed.add_metric([pool, reason], _number(by_reason.get(reason, 0)) or 0.0)
    counter("pool_connect_errors", "Failed attempts to open a connection.",
            s.get("connect_errors"))
    counter("pool_rollbacks", "Returned connections that had to be rolled back.",
            s.get("rollbacks"))
    counter("pool_role_changes", "Times a server of the pool was seen changing role.",
            s.get("role_changes"))
    counter("pool_leaks_detected",
            "Checkouts held longer than leak_detection_threshold (each warned once).",
            s.get("leaks_detected"))

    addresses = s.get("addresses")
    if isinstance(addresses, Mapping):
        for label, a in addresses.items():
            if isinstance(a, Mapping):
                _address_series(out, pool, str(label), a)
    dns = s.get("dns")
    if isinstance(dns, Mapping):
        for name, d in dns.items():
            if isinstance(d, Mapping):
                _dns_series(out, pool, str(name), d)
    topology = s.get("topology")
    if isinstance(topology, Mapping):
        _topology_series(out, pool, topology)
    fallback = s.get("fallback")
    if isinstance(fallback, Mapping):
        to = fallback.get("to")
        active = _number(fallback.get("active"))
        if active is not None:
            out.gauge("pool_fallback_active",
                      "1 while the pool cannot connect and is served from its fallback pool.",
                      ("pool", "fallback")).add_metric([pool, str(to)], active)
        counter("pool_fallback_checkouts", "Checkouts served from the fallback pool.",
                fallback.get("checkouts"))


def _address_series(out: _Families, pool: str, address: str, a: Mapping[str, Any]) -> None:
    lb = ("pool", "address")
    for state in CONNECTION_STATES:
        v = _number(a.get(state))
        if v is not None:
            out.gauge("address_connections",
                      "Connections of the pool to the address by state: idle, in_use or opening.",
                      ("pool", "address", "state")).add_metric([pool, address, state], v)
    rows: tuple[tuple[str, str, str, Any], ...] = (
        ("gauge", "address_open_connections",
         "Open connections of the pool to the address (what placement balances).",
         a.get("connections")),
        ("gauge", "address_active",
         "1 while the address is in the latest DNS answer (or configured) for its host.",
         a.get("active")),
        ("gauge", "address_banned",
         "1 while the address is banned after failures (tried only after healthy ones).",
         a.get("banned")),
        ("gauge", "address_ban_remaining_seconds",
         "Seconds until the address's ban ends (0 when not banned).", a.get("banned_for_s")),
        ("counter", "address_connects", "Connections opened to the address.", a.get("connects")),
        ("counter", "address_connect_failures", "Failed connects to the address.",
         a.get("connect_failures")),
    )
    _add_rows(out, lb, [pool, address], rows)


def _dns_series(out: _Families, pool: str, name: str, d: Mapping[str, Any]) -> None:
    addresses = d.get("addresses")
    members = d.get("members")
    rows: tuple[tuple[str, str, str, Any], ...] = (
        ("gauge", "dns_addresses", "Addresses in the current answer for the name.",
         len(addresses) if isinstance(addresses, (list, tuple)) else None),
        ("gauge", "dns_ttl_seconds", "TTL of the current answer for the name.", d.get("ttl_s")),
        ("gauge", "dns_expires_in_seconds",
         "Seconds until the current answer expires (negative: past its TTL).",
         d.get("expires_in_s")),
        ("gauge", "dns_stale", "1 while the answer in use is past its TTL (refresh failing).",
         d.get("stale")),
        ("counter", "dns_queries", "DNS queries (lookups and refreshes) for the name.",
         d.get("queries")),
        ("counter", "dns_refresh_failures", "Failed DNS queries for the name.",
         d.get("refresh_failures")),
        ("counter", "dns_stale_served", "Times an expired answer was used for the name.",
         d.get("stale_served")),
        ("gauge", "dns_members",
         "Addresses the pool uses for the name: those its answers named within the membership "
         "window (a rotating name's union).", len(members) if isinstance(members, list) else None),
        ("counter", "dns_answer_changes", "Refreshes whose addresses differed from the last.",
         d.get("answer_changes")),
    )
    _add_rows(out, ("pool", "name"), [pool, name], rows)
    families = d.get("family_failures")
    for family, n in (families.items() if isinstance(families, Mapping) else ()):
        _add_rows(out, ("pool", "name", "rdtype"), [pool, name, str(family)], (
            ("counter", "dns_family_failures",
             "Queries of one address family (A or AAAA) that failed while the other answered.",
             n),))


def _topology_series(out: _Families, pool: str, t: Mapping[str, Any]) -> None:
    """The Aurora topology a pool with ``discovery: aurora`` uses (``cluster``: its instance
    host pattern)."""
    cluster = str(t.get("instance_host_pattern"))
    instances = t.get("instances")
    if isinstance(instances, Mapping):
        roles = [i.get("role") for i in instances.values() if isinstance(i, Mapping)]
        for role in ("writer", "reader"):
            out.gauge("topology_instances",
                      "Instances of the cluster's topology (aurora_replica_status()) by role.",
                      ("pool", "cluster", "role")).add_metric(
                          [pool, cluster, role], float(roles.count(role)))
    state = t.get("state")
    rows: tuple[tuple[str, str, str, Any], ...] = (
        ("gauge", "topology_available",
         "1 while the topology can be read (else the pool uses DNS discovery).",
         None if state is None else state != "unavailable"),
        ("gauge", "topology_hunting_writer",
         "1 while a writer pool lost its writer and the topology is refreshed every second.",
         None if state is None else state == "hunting_writer"),
        ("gauge", "topology_refresh_age_seconds", "Seconds since the last topology refresh.",
         t.get("last_refresh_s_ago")),
        ("counter", "topology_refreshes", "Topology refreshes.", t.get("refreshes")),
        ("counter", "topology_refresh_failures", "Topology refreshes that failed.",
         t.get("refresh_failures")),
    )
    _add_rows(out, ("pool", "cluster"), [pool, cluster], rows)


def _registry_series(out: _Families, r: Mapping[str, Any]) -> None:
    last = _timestamp(r.get("last_reload_at"))
    result = r.get("last_reload_result")
    draining = r.get("draining")
    rows: list[tuple[str, str, str, Any]] = [
        ("gauge", "registry_generation",
         "The configuration generation in use (1 at start, +1 per reload that changed it).",
         r.get("generation")),
        ("counter", "registry_reloads", "Reloads that succeeded (changes or not).",
         r.get("reloads")),
        ("counter", "registry_reload_errors", "Reloads rejected (the running config stays).",
         r.get("reload_errors")),
    ]
    if last is not None:
        rows += [
            ("gauge", "registry_last_reload_timestamp_seconds",
             "Unix time of the last reload attempt.", last),
            ("gauge", "registry_last_reload_success", "1 when the last reload succeeded.",
             r.get("last_reload_error") is None),
        ]
    if isinstance(result, Mapping):
        rows.append(("gauge", "registry_last_reload_duration_seconds",
                     "How long the last applied reload took.", result.get("duration_s")))
    if isinstance(draining, (list, tuple)):
        rows.append(("gauge", "registry_draining_pools",
                     "Replaced or removed pools still waiting for checked-out connections.",
                     len(draining)))
    _add_rows(out, (), [], rows)


def _add_rows(out: _Families, labels: tuple[str, ...], values: list[str],
              rows: tuple[tuple[str, str, str, Any], ...] | list[tuple[str, str, str, Any]],
              ) -> None:
    for kind, name, help_, value in rows:
        v = _number(value)
        if v is None:
            continue
        fam = (out.gauge if kind == "gauge" else out.counter)(name, help_, labels)
        fam.add_metric(values, v)


def _register(source: StatsSource, collector_registry: CollectorRegistry | None,
              ) -> PoolCollector:
    collector = PoolCollector(source)
    (REGISTRY if collector_registry is None else collector_registry).register(collector)
    return collector


def register_registry(registry: Any, collector_registry: CollectorRegistry | None = None,
                      ) -> PoolCollector:
    """Register a collector of ``registry``'s pools (by their names; reloads are followed) and
    of its reload figures with ``collector_registry`` (default: prometheus_client's global
    ``REGISTRY``). Returns the collector: ``collector_registry.unregister(collector)`` stops
    it. Same as ``registry.register_prometheus()``."""
    return _register(StatsSource.of_registry(registry), collector_registry)


def register_pools(*pools: Any, collector_registry: CollectorRegistry | None = None,
                   ) -> PoolCollector:
    """Register a collector of standalone ``ConnectionPool`` objects (labelled
    ``pool=stats()["name"]``) with ``collector_registry`` (default: the global ``REGISTRY``).
    Returns the collector, which can be unregistered. Raises ``TypeError`` when given no pool
    or something without ``stats()``."""
    return _register(StatsSource.of_pools(*pools), collector_registry)
