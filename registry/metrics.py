"""Prometheus metrics for pools and registries, and an optional tiny HTTP endpoint for them.

``metrics_text`` renders the dicts that ``ConnectionPool.stats()`` and ``Registry.stats()``
return in the Prometheus text exposition format (version 0.0.4). It is a pure function: no I/O,
no client library, nothing registered globally; the application decides how to serve it.

    from pgregistry import Registry, registry_metrics, start_metrics_server
    reg = Registry.from_yaml("pools.yaml")
    text = registry_metrics(reg)                   # serve it from your own web framework
    server = start_metrics_server(reg, port=9187)  # or let pgregistry serve GET /metrics

Every name starts with ``pgregistry_``. Series carry a ``pool`` label (the registry's name for
the pool, or ``stats()["name"]`` of a standalone one), per-address series an ``address`` label
(``ip:port``), per-DNS-name series a ``name`` label. Free text is never exposed: no error
message, no connection string, no password.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

__all__ = [
    "CONTENT_TYPE",
    "CLOSE_REASONS",
    "MetricsServer",
    "metrics_text",
    "pool_metrics",
    "registry_metrics",
    "start_metrics_server",
]

logger = logging.getLogger(__name__)

#: The Content-Type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Why pools close connections. Each is exposed (at 0 until it happens) so that ``rate()`` and
#: ``increase()`` see the first one; a reason not listed here is exposed once it occurs.
CLOSE_REASONS = (
    "idle", "lifetime", "broken", "validation", "garbage_collected", "requested", "resize",
    "pool_closed", "dns_change", "rebalance", "role_change", "demoted_writer", "cleared",
    "reset_failed",
)

PREFIX = "pgregistry_"
CONNECTION_STATES = ("idle", "in_use", "opening")

Labels = tuple[tuple[str, str], ...]


class _HasStats(Protocol):
    def stats(self) -> Mapping[str, Any]: ...


# -- the exposition ----------------------------------------------------------------------------


@dataclass
class _Family:
    name: str
    type: str
    help: str
    samples: list[tuple[str, Labels, str]] = field(default_factory=list)


class _Exposition:
    """Samples grouped by family (the format wants each family's samples together)."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def family(self, name: str, type_: str, help_: str) -> _Family:
        full = PREFIX + name
        fam = self._families.get(full)
        if fam is None:
            fam = self._families[full] = _Family(full, type_, help_)
        elif fam.type != type_:  # a programming error here, not a data problem
            raise ValueError(f"metric {full} declared as {fam.type} and {type_}")
        return fam

    def add(self, name: str, type_: str, help_: str, labels: Labels, value: Any,
            suffix: str = "") -> None:
        """Add one sample; a value that is missing or not a number is left out."""
        text = _format_value(value)
        if text is None:
            return
        fam = self.family(name, type_, help_)
        fam.samples.append((fam.name + suffix, labels, text))

    def render(self) -> str:
        lines: list[str] = []
        for fam in self._families.values():
            if not fam.samples:
                continue
            lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
            lines.append(f"# TYPE {fam.name} {fam.type}")
            for name, labels, value in fam.samples:
                lines.append(f"{name}{_format_labels(labels)} {value}")
        return "\n".join(lines) + "\n" if lines else ""


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in labels) + "}"


def _format_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _format_float(value)
    return None


def _format_float(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _timestamp(value: Any) -> float | None:
    """Unix seconds from a number or an ISO 8601 string (naive ones are taken as UTC)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, _dt.datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = _dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


# -- pools --------------------------------------------------------------------------------------


def _pool_series(out: _Exposition, pool: str, s: Mapping[str, Any], histogram: bool) -> None:
    lb: Labels = (("pool", pool),)

    def gauge(name: str, help_: str, value: Any, labels: Labels = lb) -> None:
        out.add(name, "gauge", help_, labels, value)

    def counter(name: str, help_: str, value: Any, labels: Labels = lb) -> None:
        out.add(name + "_total", "counter", help_, labels, value)

    role, placement = s.get("role"), s.get("placement")
    if isinstance(role, str) and isinstance(placement, str):
        gauge("pool_info", "The pool's role and placement policy (always 1).", 1,
              (*lb, ("role", role), ("placement", placement)))
    for state in CONNECTION_STATES:
        gauge("pool_connections",
              "Connections of the pool by state: idle, in_use (checked out) or opening.",
              s.get(state), (*lb, ("state", state)))
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
    _wait_series(out, lb, s, histogram)
    gauge("pool_checkout_wait_seconds_max",
          "Longest wait for a connection since the pool was created.", s.get("wait_max_s"))

    counter("pool_connections_opened", "Connections opened.", s.get("connections_opened"))
    by_reason = s.get("closed_by_reason")
    by_reason = by_reason if isinstance(by_reason, Mapping) else {}
    reasons = list(CLOSE_REASONS) + sorted(str(r) for r in by_reason if r not in CLOSE_REASONS)
    for reason in reasons:
        counter("pool_connections_closed", "Connections closed, by reason.",
                by_reason.get(reason, 0), (*lb, ("reason", reason)))
    counter("pool_connect_errors", "Failed attempts to open a connection.",
            s.get("connect_errors"))
    counter("pool_rollbacks", "Returned connections that had to be rolled back.",
            s.get("rollbacks"))
    counter("pool_role_changes", "Times a server of the pool was seen changing role.",
            s.get("role_changes"))

    addresses = s.get("addresses")
    if isinstance(addresses, Mapping):
        for label, a in addresses.items():
            if isinstance(a, Mapping):
                _address_series(out, (*lb, ("address", str(label))), a)
    dns = s.get("dns")
    if isinstance(dns, Mapping):
        for name, d in dns.items():
            if isinstance(d, Mapping):
                _dns_series(out, (*lb, ("name", str(name))), d)
    fallback = s.get("fallback")
    if isinstance(fallback, Mapping):
        to = fallback.get("to")
        active_lb = (*lb, ("fallback", to)) if isinstance(to, str) else lb
        gauge("pool_fallback_active",
              "1 while the pool cannot connect and is served from its fallback pool.",
              fallback.get("active"), active_lb)
        counter("pool_fallback_checkouts", "Checkouts served from the fallback pool.",
                fallback.get("checkouts"))


def _wait_series(out: _Exposition, lb: Labels, s: Mapping[str, Any], histogram: bool) -> None:
    name = "pool_checkout_wait_seconds"
    waits, total = s.get("waits"), s.get("wait_total_s")
    if not histogram:
        help_ = "Waits for a connection when none was free (no quantiles: sum and count)."
        out.add(name, "summary", help_, lb, total, "_sum")
        out.add(name, "summary", help_, lb, waits, "_count")
        return
    help_ = "Waits for a connection when none was free."
    buckets: list[tuple[float, float]] = []
    raw = s.get("wait_histogram")
    if isinstance(raw, Mapping):
        for bound, count in raw.items():
            try:
                le = float(bound)
            except (TypeError, ValueError):
                continue
            n = _number(count)
            if n is not None and not math.isnan(le):
                buckets.append((le, n))
    buckets.sort()
    count_all = _number(waits)
    if not buckets or not math.isinf(buckets[-1][0]):
        inf_count = count_all if count_all is not None else (buckets[-1][1] if buckets else None)
        if inf_count is None:
            return
        buckets.append((math.inf, inf_count))
    for le, n in buckets:
        value: float | int = int(n) if n.is_integer() else n
        out.add(name, "histogram", help_, (*lb, ("le", _format_float(le))), value, "_bucket")
    out.add(name, "histogram", help_, lb, total if total is not None else 0.0, "_sum")
    last = buckets[-1][1]  # the +Inf bucket: every wait
    out.add(name, "histogram", help_, lb, int(last) if last.is_integer() else last, "_count")


def _address_series(out: _Exposition, lb: Labels, a: Mapping[str, Any]) -> None:
    for state in CONNECTION_STATES:
        out.add("address_connections", "gauge",
                "Connections of the pool to the address by state: idle, in_use or opening.",
                (*lb, ("state", state)), a.get(state))
    out.add("address_open_connections", "gauge",
            "Open connections of the pool to the address (what placement balances).",
            lb, a.get("connections"))
    out.add("address_active", "gauge",
            "1 while the address is in the latest DNS answer (or configured) for its host.",
            lb, a.get("active"))
    out.add("address_banned", "gauge",
            "1 while the address is banned after failures (tried only after healthy ones).",
            lb, a.get("banned"))
    out.add("address_ban_remaining_seconds", "gauge",
            "Seconds until the address's ban ends (0 when not banned).", lb, a.get("banned_for_s"))
    out.add("address_connects_total", "counter", "Connections opened to the address.",
            lb, a.get("connects"))
    out.add("address_connect_failures_total", "counter", "Failed connects to the address.",
            lb, a.get("connect_failures"))


def _dns_series(out: _Exposition, lb: Labels, d: Mapping[str, Any]) -> None:
    addresses = d.get("addresses")
    if isinstance(addresses, (list, tuple)):
        out.add("dns_addresses", "gauge", "Addresses in the current answer for the name.",
                lb, len(addresses))
    out.add("dns_ttl_seconds", "gauge", "TTL of the current answer for the name.",
            lb, d.get("ttl_s"))
    out.add("dns_expires_in_seconds", "gauge",
            "Seconds until the current answer expires (negative: past its TTL).",
            lb, d.get("expires_in_s"))
    out.add("dns_stale", "gauge", "1 while the answer in use is past its TTL (refresh failing).",
            lb, d.get("stale"))
    out.add("dns_queries_total", "counter", "DNS queries (lookups and refreshes) for the name.",
            lb, d.get("queries"))
    out.add("dns_refresh_failures_total", "counter", "Failed DNS queries for the name.",
            lb, d.get("refresh_failures"))
    out.add("dns_stale_served_total", "counter", "Times an expired answer was used for the name.",
            lb, d.get("stale_served"))


# -- the registry -------------------------------------------------------------------------------


def _registry_series(out: _Exposition, r: Mapping[str, Any]) -> None:
    none: Labels = ()
    out.add("registry_generation", "gauge",
            "The configuration generation in use (1 at start, +1 per reload that changed it).",
            none, r.get("generation"))
    out.add("registry_reloads_total", "counter", "Reloads that succeeded (changes or not).",
            none, r.get("reloads"))
    out.add("registry_reload_errors_total", "counter",
            "Reloads rejected (the running config stays).", none, r.get("reload_errors"))
    last = _timestamp(r.get("last_reload_at"))
    if last is not None:
        out.add("registry_last_reload_timestamp_seconds", "gauge",
                "Unix time of the last reload attempt.", none, last)
        out.add("registry_last_reload_success", "gauge", "1 when the last reload succeeded.",
                none, r.get("last_reload_error") is None)
    result = r.get("last_reload_result")
    if isinstance(result, Mapping):
        out.add("registry_last_reload_duration_seconds", "gauge",
                "How long the last applied reload took.", none, result.get("duration_s"))
    draining = r.get("draining")
    if isinstance(draining, (list, tuple)):
        out.add("registry_draining_pools", "gauge",
                "Replaced or removed pools still waiting for checked-out connections.",
                none, len(draining))


# -- public functions ---------------------------------------------------------------------------


def metrics_text(stats_by_pool: Mapping[str, Mapping[str, Any]],
                 registry: Mapping[str, Any] | None = None) -> str:
    """The Prometheus text exposition (0.0.4) of ``{pool label: pool.stats()}`` and, when
    given, of a registry's ``stats()["_registry"]``. A ``"_registry"`` key left in
    ``stats_by_pool`` is taken as ``registry``. Missing keys are left out, never guessed.

    ``pgregistry_pool_checkout_wait_seconds`` is a histogram when any pool's stats carry a
    ``"wait_histogram"`` (``{upper bound in seconds: cumulative count}``), else a summary
    without quantiles (``_sum`` and ``_count`` only)."""
    pools: dict[str, Mapping[str, Any]] = {}
    for name, s in stats_by_pool.items():
        if name == "_registry" and registry is None:
            registry = s
        elif name != "_registry" and isinstance(s, Mapping):
            pools[str(name)] = s
    histogram = any(isinstance(s.get("wait_histogram"), Mapping) for s in pools.values())
    out = _Exposition()
    for name, s in pools.items():
        _pool_series(out, name, s, histogram)
    if registry is not None:
        _registry_series(out, registry)
    return out.render()


def registry_metrics(registry: _HasStats) -> str:
    """The metrics of a :class:`~registry.Registry`: its pools (by registry name) and its own
    counters (``"_registry"``)."""
    stats = dict(registry.stats())
    own = stats.pop("_registry", None)
    return metrics_text(stats, own if isinstance(own, Mapping) else None)


def pool_metrics(*pools: _HasStats) -> str:
    """The metrics of standalone ``ConnectionPool`` objects, labelled ``pool=stats()["name"]``.
    Of two pools with the same name only the first is exposed (a warning is logged)."""
    by_name: dict[str, Mapping[str, Any]] = {}
    for pool in pools:
        s = pool.stats()
        name = str(s.get("name"))
        if name in by_name:
            logger.warning("metrics: two pools named %r; exposing only the first", name)
            continue
        by_name[name] = s
    return metrics_text(by_name)


# -- HTTP endpoint ------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    source: Callable[[], str]


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_version = "pgregistry-metrics"
    sys_version = ""

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def _respond(self, body: bool) -> None:
        if urlsplit(self.path).path != "/metrics":
            self._send(404, b"not found: metrics are at /metrics\n", "text/plain; charset=utf-8",
                       body)
            return
        try:
            text = cast(_Server, self.server).source()
        except Exception:
            logger.exception("metrics: collecting metrics failed")
            self._send(500, b"collecting metrics failed\n", "text/plain; charset=utf-8", body)
            return
        self._send(200, text.encode("utf-8"), CONTENT_TYPE, body)

    def _send(self, code: int, payload: bytes, content_type: str, body: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics: %s %s", self.address_string(), format % args)


class MetricsServer:
    """A tiny HTTP endpoint serving ``GET /metrics`` (404 elsewhere) from ``source()``.

    Optional and started only on request (:meth:`start`, ``with``, or
    :func:`start_metrics_server`): it is then the one extra thread of pgregistry besides the
    supervisor, a daemon ``ThreadingHTTPServer`` loop (each request is answered on a short-lived
    daemon thread of its own). ``port=0`` takes a free port, known from :attr:`port` after
    :meth:`start`. It binds to ``127.0.0.1`` unless told otherwise; requests are logged at DEBUG.
    """

    def __init__(self, source: Callable[[], str], host: str = "127.0.0.1", port: int = 0) -> None:
        self.source = source
        self.host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The port (the one bound, once started)."""
        return self._port

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}/metrics"

    def start(self) -> MetricsServer:
        """Bind and serve on a daemon thread. Idempotent; returns ``self``."""
        with self._lock:
            if self._server is not None:
                return self
            cls = _Server6 if ":" in self.host else _Server
            server = cls((self.host, self._port), _Handler)
            server.source = self.source
            self._port = int(server.server_address[1])
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.25},
                                      name="pgregistry-metrics", daemon=True)
            thread.start()
            self._server, self._thread = server, thread
        logger.info("metrics: serving %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        logger.info("metrics: stopped %s", self.url)

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url} {'running' if self.running else 'stopped'}>"


def start_metrics_server(registry: _HasStats, port: int = 0,
                         host: str = "127.0.0.1") -> MetricsServer:
    """Serve :func:`registry_metrics` of ``registry`` at ``http://host:port/metrics`` (started;
    call ``.stop()`` when done). Pass the port Prometheus scrapes; 0 picks a free one."""
    return MetricsServer(lambda: registry_metrics(registry), host=host, port=port).start()

