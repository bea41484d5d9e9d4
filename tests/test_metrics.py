"""Metrics through the ecosystem's libraries: a prometheus_client collector scraped through
prometheus_client's own WSGI app and parsed by its own parsers, OpenTelemetry instruments read
by the SDK's in-memory reader, both on the session cluster under traffic; and the base install,
which needs neither library."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
import uuid
import wsgiref.util
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from helpers import SENTINEL_PASSWORD, hold, wait_until
from pgregistry import Registry
from pgregistry.metrics import CLOSE_REASONS, StatsSource
from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

# -- scraping through prometheus_client -------------------------------------------------------


def scrape(app: Any, accept: str | None = None) -> tuple[str, str]:
    """GET /metrics from a WSGI app, in process: (content type, body)."""
    environ: dict[str, Any] = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ["PATH_INFO"] = "/metrics"
    if accept:
        environ["HTTP_ACCEPT"] = accept
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        got["status"], got["headers"] = status, dict(headers)
        return lambda data: None

    body = b"".join(app(environ, start_response))
    assert got["status"].startswith("200"), got
    return got["headers"]["Content-Type"], body.decode("utf-8")


class Parsed:
    """prometheus_client's parse of one exposition: families by name, samples by name."""

    def __init__(self, text: str, openmetrics: bool = False) -> None:
        parse = parse_openmetrics if openmetrics else text_string_to_metric_families
        self.families = {f.name: f for f in parse(text)}
        self.text = text

    def values(self, sample: str, /, **labels: str) -> list[float]:
        return [s.value for f in self.families.values() for s in f.samples
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, sample: str, /, **labels: str) -> float:
        found = self.values(sample, **labels)
        assert len(found) == 1, f"{sample}{labels}: {len(found)} samples"
        return found[0]

    def label_values(self, sample: str, label: str) -> set[str]:
        return {s.labels[label] for f in self.families.values() for s in f.samples
                if s.name == sample and label in s.labels}

    def buckets(self, family: str, **labels: str) -> list[tuple[float, float]]:
        return [(float(s.labels["le"]), s.value) for s in self.families[family].samples
                if s.name == family + "_bucket"
                and all(s.labels.get(k) == v for k, v in labels.items())]


# Every family a registry with a DNS-named pool exposes (names as prometheus_client parses
# them: counters without _total), with its type.
FAMILIES = {
    "pgregistry_pool_info": "gauge",
    "pgregistry_pool_connections": "gauge",
    "pgregistry_pool_size": "gauge",
    "pgregistry_pool_min_size": "gauge",
    "pgregistry_pool_max_size": "gauge",
    "pgregistry_pool_waiting": "gauge",
    "pgregistry_pool_closed": "gauge",
    "pgregistry_pool_checkouts": "counter",
    "pgregistry_pool_checkout_timeouts": "counter",
    "pgregistry_pool_checkout_wait_seconds": "histogram",
    "pgregistry_pool_checkout_wait_seconds_max": "gauge",
    "pgregistry_pool_connections_opened": "counter",
    "pgregistry_pool_connections_closed": "counter",
    "pgregistry_pool_connect_errors": "counter",
    "pgregistry_pool_rollbacks": "counter",
    "pgregistry_pool_role_changes": "counter",
    "pgregistry_pool_leaks_detected": "counter",
    "pgregistry_pool_connection_create_seconds": "histogram",
    "pgregistry_address_connections": "gauge",
    "pgregistry_address_open_connections": "gauge",
    "pgregistry_address_active": "gauge",
    "pgregistry_address_banned": "gauge",
    "pgregistry_address_ban_remaining_seconds": "gauge",
    "pgregistry_address_connects": "counter",
    "pgregistry_address_connect_failures": "counter",
    "pgregistry_dns_addresses": "gauge",
    "pgregistry_dns_ttl_seconds": "gauge",
    "pgregistry_dns_expires_in_seconds": "gauge",
    "pgregistry_dns_stale": "gauge",
    "pgregistry_dns_queries": "counter",
    "pgregistry_dns_refresh_failures": "counter",
    "pgregistry_dns_stale_served": "counter",
    "pgregistry_registry_generation": "gauge",
    "pgregistry_registry_reloads": "counter",
    "pgregistry_registry_reload_errors": "counter",
    "pgregistry_registry_last_reload_timestamp_seconds": "gauge",
    "pgregistry_registry_last_reload_success": "gauge",
    "pgregistry_registry_last_reload_duration_seconds": "gauge",
    "pgregistry_registry_draining_pools": "gauge",
}


# -- a registry of two pools on the session cluster, and traffic on both -----------------------


def write_yaml(path: Path, cluster: Any, dns: Any, app: str) -> Path:
    primary, r1, r2 = cluster.servers[:3]
    dns.set_a("readers.metrics.test", [r1.host, r2.host], ttl=30)
    path.write_text(textwrap.dedent(f"""\
        version: 1
        dns:
          nameservers: [127.0.0.1]
          port: {dns.port}
        defaults:
          user: postgres
          dbname: postgres
          port: {cluster.port}
          connect_timeout: 2
          application_name: {app}
          password_env: PGR_TEST_PASSWORD
        pools:
          writer:
            host: {primary.host}
            minconn: 1
            maxconn: 2
          readers:
            host: readers.metrics.test
            minconn: 2
            maxconn: 4
        """))
    return path


@pytest.fixture
def reg(pg_cluster, dns_server, stepped, tmp_path) -> Iterator[Registry]:
    path = write_yaml(tmp_path / "pools.yaml", pg_cluster, dns_server,
                      f"pgr-metrics-{uuid.uuid4().hex[:8]}")
    registry = Registry.from_yaml(path, supervisor=stepped, install_sighup=False)
    stepped.run_until_idle()  # prewarm: one reader connection on each replica
    yield registry
    registry.close()


class Traffic:
    """Threads checking out from both pools through handles, more threads than connections
    (so some wait), each query a SELECT 1 held a moment."""

    def __init__(self, registry: Registry, threads: dict[str, int]) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(registry, name), daemon=True)
                        for name, n in threads.items() for _ in range(n)]

    def _run(self, registry: Registry, name: str) -> None:
        handle = registry.get(name)
        try:
            while not self.stop.is_set():
                with handle.conn(timeout=10) as conn, conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    hold(0.002)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads)
        assert not self.errors, self.errors


def test_wsgi_scrape_under_traffic_matches_stats(reg, pg_cluster):
    collector_registry = CollectorRegistry()
    collector = reg.register_prometheus(collector_registry)
    app = make_wsgi_app(collector_registry)
    reg.reload()  # nothing changed: the reload figures appear

    # scrapes while 8 threads use the two pools (6 readers on 4 connections: some wait)
    seen: list[float] = []
    with Traffic(reg, {"readers": 6, "writer": 2}):
        for _ in range(5):
            hold(0.05)
            content_type, text = scrape(app)
            assert content_type.startswith("text/plain; version=0.0.4")
            exp = Parsed(text)
            seen.append(sum(exp.values("pgregistry_pool_checkouts_total")))
    assert seen == sorted(seen) and seen[-1] > 0  # counters only grow

    # at rest: one scrape and stats() see the same state (no supervisor thread runs)
    with reg.get("readers").conn():
        _, text = scrape(app)
        stats = reg.stats()
    assert SENTINEL_PASSWORD not in text
    exp = Parsed(text)
    for name, kind in FAMILIES.items():
        assert name in exp.families, f"{name} missing"
        assert exp.families[name].type == kind, name
    assert exp.label_values("pgregistry_pool_size", "pool") == {"writer", "readers"}

    for pool in ("writer", "readers"):
        s = stats[pool]
        for state in ("idle", "in_use", "opening"):
            assert exp.value("pgregistry_pool_connections", pool=pool, state=state) == s[state]
        for sample, key in (("pgregistry_pool_size", "size"),
                            ("pgregistry_pool_min_size", "minconn"),
                            ("pgregistry_pool_max_size", "maxconn"),
                            ("pgregistry_pool_waiting", "waiting"),
                            ("pgregistry_pool_checkouts_total", "checkouts"),
                            ("pgregistry_pool_checkout_timeouts_total", "checkout_timeouts"),
                            ("pgregistry_pool_connections_opened_total", "connections_opened"),
                            ("pgregistry_pool_checkout_wait_seconds_max", "wait_max_s")):
            assert exp.value(sample, pool=pool) == pytest.approx(s[key]), (pool, sample)
        # the wait histogram: every bucket as stats() counts it, every checkout in +Inf
        wait = "pgregistry_pool_checkout_wait_seconds"
        expected = sorted((float(le), float(n)) for le, n in s["wait_histogram"].items())
        assert exp.buckets(wait, pool=pool) == expected
        assert exp.value(wait + "_count", pool=pool) == s["checkouts"]
        assert exp.value(wait + "_sum", pool=pool) == pytest.approx(s["wait_total_s"])
        for reason in CLOSE_REASONS:
            assert exp.value("pgregistry_pool_connections_closed_total", pool=pool,
                             reason=reason) == s["closed_by_reason"].get(reason, 0)
        # connect times: one per connection opened
        create = "pgregistry_pool_connection_create_seconds"
        assert exp.value(create + "_count", pool=pool) == s["connections_opened"] > 0
        assert exp.value(create + "_sum", pool=pool) == pytest.approx(s["create_total_s"])
        assert exp.value(create + "_sum", pool=pool) > 0
    assert stats["readers"]["waits"] > 0  # the traffic made some callers wait
    assert exp.buckets("pgregistry_pool_checkout_wait_seconds", pool="readers")[0][1] < \
        stats["readers"]["checkouts"]
    assert exp.value("pgregistry_pool_connections", pool="readers", state="in_use") == 1

    # per address: the readers' replicas, as stats() has them
    labels = {f"{r.host}:{pg_cluster.port}" for r in pg_cluster.servers[1:3]}
    assert exp.label_values("pgregistry_address_open_connections", "address") >= labels
    for address, a in stats["readers"]["addresses"].items():
        where = {"pool": "readers", "address": address}
        assert exp.value("pgregistry_address_open_connections", **where) == a["connections"]
        assert exp.value("pgregistry_address_connects_total", **where) == a["connects"]
        assert exp.value("pgregistry_address_active", **where) == a["active"]
        for state in ("idle", "in_use", "opening"):
            assert exp.value("pgregistry_address_connections", state=state, **where) == a[state]
    dns = {"pool": "readers", "name": "readers.metrics.test"}
    assert exp.value("pgregistry_dns_addresses", **dns) == 2
    assert exp.value("pgregistry_dns_queries_total", **dns) >= 1
    assert exp.value("pgregistry_registry_generation") == 1
    assert exp.value("pgregistry_registry_reloads_total") == 1
    assert exp.value("pgregistry_registry_last_reload_success") == 1

    # OpenMetrics, negotiated by prometheus_client, parsed by its strict OpenMetrics parser
    content_type, text = scrape(app, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    om = Parsed(text, openmetrics=True)
    assert om.value("pgregistry_pool_checkouts_total", pool="writer") == \
        reg.stats()["writer"]["checkouts"]

    # unregistered: nothing of ours is exposed any more
    collector_registry.unregister(collector)
    _, text = scrape(app)
    assert "pgregistry_" not in text


def test_default_registry_and_standalone_pools(reg, make_pool):
    collector = reg.register_prometheus()  # prometheus_client's global REGISTRY
    try:
        exp = Parsed(scrape(make_wsgi_app())[1])
        assert exp.label_values("pgregistry_pool_size", "pool") == {"writer", "readers"}
    finally:
        REGISTRY.unregister(collector)
    assert "pgregistry_" not in scrape(make_wsgi_app())[1]

    from pgregistry.prometheus import register_pools

    a = make_pool(minconn=1, maxconn=2, name="standalone-a", background_prewarm=False)
    b = make_pool(minconn=0, maxconn=3, name="standalone-b")
    collector_registry = CollectorRegistry()
    register_pools(a, b, collector_registry=collector_registry)
    with a.conn():
        exp = Parsed(scrape(make_wsgi_app(collector_registry))[1])
    assert exp.value("pgregistry_pool_connections", pool="standalone-a", state="in_use") == 1
    assert exp.value("pgregistry_pool_max_size", pool="standalone-b") == 3
    assert "pgregistry_registry_generation" not in exp.families
    with pytest.raises(TypeError):
        register_pools(collector_registry=collector_registry)
    with pytest.raises(TypeError):
        register_pools(object(), collector_registry=collector_registry)


# -- edge cases of the stats -> families mapping ------------------------------------------------


class StatsOf:
    """An object with stats(): hand-made figures for the edge cases of the mapping."""

    def __init__(self, stats: dict[str, Any]) -> None:
        self._stats = stats

    def stats(self) -> dict[str, Any]:
        return self._stats


def hand_made(name: str, **over: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "name": name, "minconn": 1, "maxconn": 4, "size": 3, "idle": 1, "in_use": 1,
        "opening": 1, "waiting": 2, "closed": False, "connections_opened": 7,
        "closed_by_reason": {"idle": 3, "brand_new_reason": 1}, "checkouts": 42,
        "last_connect_error": f"FATAL: password authentication failed ({SENTINEL_PASSWORD})",
        "waits": 5, "wait_total_s": 1.25, "wait_histogram": {0.01: 1, "0.1": 3, 1: 4},
        "addresses": {"127.0.0.13:5432": {
            "connections": 0, "banned": True, "banned_for_s": 2.5, "ban_reason": "refused",
            "last_error": f"connection refused {SENTINEL_PASSWORD}"}},
        "dns": {"readers.db.test": {"addresses": ["127.0.0.13"], "stale": True,
                                    "last_error": f"SERVFAIL {SENTINEL_PASSWORD}"}},
    }
    s.update(over)
    return s


def test_edge_cases_of_the_mapping():
    from pgregistry.prometheus import PoolCollector

    weird = 'we"ird\\pool\nname'
    a = StatsOf(hand_made("plain", fallback={"to": weird, "active": True, "checkouts": 6,
                                             "reason": f"down {SENTINEL_PASSWORD}"}))
    b = StatsOf(hand_made(weird, maxconn=math.inf))
    bare = StatsOf({"name": "bare", "size": 1})
    cr = CollectorRegistry()
    cr.register(PoolCollector(StatsSource.of_pools(a, b, bare), StatsSource.of_pools(a)))
    content_type, text = scrape(make_wsgi_app(cr))
    exp = Parsed(text)
    # label values escaped by prometheus_client and read back intact
    assert exp.label_values("pgregistry_pool_size", "pool") == {"plain", weird, "bare"}
    assert exp.value("pgregistry_pool_max_size", pool=weird) == math.inf
    # a counter per close reason: every known one (0 until it happens) and new ones
    closed = "pgregistry_pool_connections_closed_total"
    assert exp.label_values(closed, "reason") == set(CLOSE_REASONS) | {"brand_new_reason"}
    assert exp.value(closed, pool="plain", reason="lifetime") == 0
    # buckets without +Inf get it from the wait count
    assert exp.buckets("pgregistry_pool_checkout_wait_seconds", pool="plain") == \
        [(0.01, 1), (0.1, 3), (1.0, 4), (math.inf, 42)]
    assert exp.value("pgregistry_pool_fallback_active", pool="plain", fallback=weird) == 1
    assert exp.value("pgregistry_address_banned", pool="plain", address="127.0.0.13:5432") == 1
    assert exp.value("pgregistry_dns_stale", pool="plain", name="readers.db.test") == 1
    # missing keys are left out, never guessed
    assert exp.value("pgregistry_pool_size", pool="bare") == 1
    assert not exp.values("pgregistry_pool_checkouts_total", pool="bare")
    # the same pool from a second source is exposed once
    assert len(exp.values("pgregistry_pool_size", pool="plain")) == 1
    # free text stays out: errors, ban reasons
    for secret in (SENTINEL_PASSWORD, "SERVFAIL", "refused", "FATAL", "down"):
        assert secret not in text


# -- the base install needs neither library -----------------------------------------------------

_BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('prometheus_client', 'opentelemetry'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BLOCK + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_base_install_needs_neither_library(pg_cluster, tmp_path):
    requires = metadata.requires("pgregistry") or []
    base = [r for r in requires if "extra ==" not in r]
    assert base and not any(r.lower().startswith(("prometheus", "opentelemetry")) for r in base)
    extras = metadata.metadata("pgregistry").get_all("Provides-Extra") or []
    assert {"prometheus", "otel"} <= set(extras)

    # everything but the integrations imports and works with both libraries missing
    yaml = tmp_path / "pools.yaml"
    yaml.write_text(f"version: 1\npools:\n  w:\n    host: {pg_cluster.primary.host}\n"
                    f"    port: {pg_cluster.port}\n    user: postgres\n    minconn: 0\n")
    done = run_python(f"""
        import json
        import pgregistry, pgregistry.pools, pgregistry.compat, pgregistry.metrics
        reg = pgregistry.Registry.from_yaml({str(yaml)!r}, install_sighup=False)
        with reg.get("w").conn():
            pass
        out = {{"checkouts": reg.stats()["w"]["checkouts"]}}
        for call in (reg.register_prometheus, reg.instrument_otel):
            try:
                call()
            except ImportError as exc:
                out[call.__name__] = str(exc)
        for module in ("pgregistry.prometheus", "pgregistry.otel"):
            try:
                __import__(module)
            except ImportError as exc:
                out[module] = str(exc)
        out["loaded"] = sorted(m for m in sys.modules
                               if m.split('.')[0] in ('prometheus_client', 'opentelemetry'))
        reg.close()
        print(json.dumps(out))
    """)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["checkouts"] == 1 and out["loaded"] == []
    for key, extra in (("register_prometheus", "prometheus"), ("instrument_otel", "otel"),
                       ("pgregistry.prometheus", "prometheus"), ("pgregistry.otel", "otel")):
        assert f"pip install 'pgregistry[{extra}]'" in out[key], out


# -- OpenTelemetry ------------------------------------------------------------------------------

CONVENTIONS = {  # name: (unit, kind of data)
    "db.client.connection.count": ("{connection}", "Sum"),
    "db.client.connection.idle.max": ("{connection}", "Sum"),
    "db.client.connection.idle.min": ("{connection}", "Sum"),
    "db.client.connection.max": ("{connection}", "Sum"),
    "db.client.connection.pending_requests": ("{request}", "Sum"),
    "db.client.connection.timeouts": ("{timeout}", "Sum"),
    "db.client.connection.create_time": ("s", "Histogram"),
    "db.client.connection.wait_time": ("s", "Histogram"),
    "db.client.connection.use_time": ("s", "Histogram"),
}
POOL_NAME = "db.client.connection.pool.name"


class OtelRead:
    """One collection of the SDK's in-memory reader: metrics by name, points by pool."""

    def __init__(self, reader: Any) -> None:
        data = reader.get_metrics_data()
        self.metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics
                        for m in sm.metrics}

    def points(self, name: str, **attrs: Any) -> list[Any]:
        return [p for p in self.metrics[name].data.data_points
                if all(p.attributes.get(k) == v for k, v in attrs.items())]

    def point(self, name: str, **attrs: Any) -> Any:
        found = self.points(name, **attrs)
        assert len(found) == 1, f"{name} {attrs}: {len(found)} points"
        return found[0]


@pytest.fixture
def otel_reader() -> Iterator[tuple[Any, Any]]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield reader, provider
    provider.shutdown()


def test_otel_conventions_with_the_sdk_reader(pg_cluster, dns_server, tmp_path, otel_reader):
    """On the process's real supervisor and clock (the histograms time real work)."""
    reader, provider = otel_reader
    path = write_yaml(tmp_path / "pools.yaml", pg_cluster, dns_server,
                      f"pgr-otel-{uuid.uuid4().hex[:8]}")
    with Registry.from_yaml(path, install_sighup=False) as reg:
        readers = reg.get("readers")
        with readers.conn():  # the first checkout waits for (or opens) a connection
            pass
        # prewarm done (a connection published while the first listener is added may be
        # handed out once untimed: see pools.timing)
        assert wait_until(lambda: all(s["idle"] >= s["minconn"] for n, s in reg.stats().items()
                                      if n != "_registry"))
        opened_before = {p: reg.stats()[p]["connections_opened"] for p in ("writer", "readers")}
        checkouts_before = {p: reg.stats()[p]["checkouts"] for p in ("writer", "readers")}
        waited_before = {p: reg.stats()[p]["wait_total_s"] for p in ("writer", "readers")}
        inst = reg.instrument_otel(provider)

        with Traffic(reg, {"readers": 6, "writer": 2}):
            hold(0.3)
        with readers.conn(), reg.get("writer").conn():
            read = OtelRead(reader)
            stats = reg.stats()
        for name, (unit, kind) in CONVENTIONS.items():
            assert name in read.metrics, f"{name} missing"
            assert read.metrics[name].unit == unit, name
            assert type(read.metrics[name].data).__name__ == kind, name
        for pool in ("writer", "readers"):
            s = stats[pool]
            for state, key in (("idle", "idle"), ("used", "in_use")):
                p = read.point("db.client.connection.count", **{POOL_NAME: pool,
                               "db.client.connection.state": state})
                assert p.value == s[key], (pool, state)
            assert read.point("db.client.connection.max", **{POOL_NAME: pool}).value == \
                s["maxconn"]
            assert read.point("db.client.connection.idle.max", **{POOL_NAME: pool}).value == \
                s["maxconn"]
            assert read.point("db.client.connection.idle.min", **{POOL_NAME: pool}).value == \
                s["minconn"]
            assert read.point("db.client.connection.pending_requests",
                              **{POOL_NAME: pool}).value == s["waiting"]
            assert read.point("db.client.connection.timeouts", **{POOL_NAME: pool}).value == \
                s["checkout_timeouts"]
            # every checkout since instrumenting has a wait time; every return a use time
            # (the two checked out now are not back yet); every connection opened a create time
            checkouts = s["checkouts"] - checkouts_before[pool]
            wait = read.point("db.client.connection.wait_time", **{POOL_NAME: pool})
            use = read.point("db.client.connection.use_time", **{POOL_NAME: pool})
            assert wait.count == checkouts and use.count == checkouts - 1, pool
            assert use.sum >= use.count * 0.002  # each held 2 ms at least
            # the whole slow-path checkout is timed: at least the queue waits stats() counts
            assert wait.sum >= (s["wait_total_s"] - waited_before[pool]) * 0.99
            opened = s["connections_opened"] - opened_before[pool]
            points = read.points("db.client.connection.create_time", **{POOL_NAME: pool})
            assert sum(p.count for p in points) == opened, pool
            assert list(wait.explicit_bounds)[:2] == [0.0005, 0.001]  # seconds, not ms
        assert stats["readers"]["waits"] > 0
        assert sum(p.count for p in read.points("db.client.connection.create_time")) > 0

        # ours, under pgregistry.
        for address, a in stats["readers"]["addresses"].items():
            ip, port = address.rsplit(":", 1)
            where = {POOL_NAME: "readers", "network.peer.address": ip,
                     "network.peer.port": int(port)}
            assert read.point("pgregistry.address.connects", **where).value == a["connects"]
            assert read.point("pgregistry.address.banned", **where).value == a["banned"]
        name = {POOL_NAME: "readers", "dns.question.name": "readers.metrics.test"}
        assert read.point("pgregistry.dns.addresses", **name).value == 2
        assert read.point("pgregistry.dns.members", **name).value == \
            len(stats["readers"]["dns"]["readers.metrics.test"]["members"]) == 2
        assert read.point("pgregistry.pool.checkouts", **{POOL_NAME: "writer"}).value == \
            stats["writer"]["checkouts"]
        assert read.point("pgregistry.pool.connection.closed", **{
            POOL_NAME: "readers", "pgregistry.close.reason": "idle"}).value == \
            stats["readers"]["closed_by_reason"].get("idle", 0)
        assert read.point("pgregistry.registry.generation").value == 1
        for m in read.metrics.values():
            for p in m.data.data_points:
                assert SENTINEL_PASSWORD not in repr(dict(p.attributes))

        # a reload that replaces the readers: the new pool is instrumented too
        path.write_text(path.read_text().replace("connect_timeout: 2", "connect_timeout: 3"))
        reg.reload()
        new = reg.get("readers").pool
        assert new.timing_listeners
        with readers.conn():
            pass

        # uninstrumented: nothing more is recorded or observed
        inst.uninstrument()
        assert not new.timing_listeners
        before = OtelRead(reader)
        with readers.conn():
            pass
        after = OtelRead(reader)
        assert "db.client.connection.count" not in after.metrics or \
            not after.points("db.client.connection.count")
        assert sum(p.count for p in after.points("db.client.connection.wait_time")) == \
            sum(p.count for p in before.points("db.client.connection.wait_time"))


def test_otel_standalone_pools(make_pool, otel_reader):
    from pgregistry.otel import instrument_pools

    reader, provider = otel_reader
    a = make_pool(minconn=1, maxconn=2, name="otel-a", background_prewarm=False)
    inst = instrument_pools(a, meter_provider=provider)
    for _ in range(3):
        with a.conn():
            pass
    read = OtelRead(reader)
    assert read.point("db.client.connection.max", **{POOL_NAME: "otel-a"}).value == 2
    assert read.point("db.client.connection.wait_time", **{POOL_NAME: "otel-a"}).count == 3
    assert read.point("db.client.connection.use_time", **{POOL_NAME: "otel-a"}).count == 3
    assert "pgregistry.registry.generation" not in read.metrics or \
        not read.points("pgregistry.registry.generation")
    inst.uninstrument()
    assert not a.timing_listeners
    with pytest.raises(TypeError):
        instrument_pools(meter_provider=provider)

    # without the histograms: nothing per checkout, the pool keeps its fast paths
    b = make_pool(minconn=1, maxconn=2, name="otel-b", background_prewarm=False)
    instrument_pools(b, meter_provider=provider, histograms=False)
    assert b.timing_listeners == ()
    with b.conn():
        pass
    read = OtelRead(reader)
    assert read.point("db.client.connection.count", **{
        POOL_NAME: "otel-b", "db.client.connection.state": "idle"}).value == 1
    assert not read.points("db.client.connection.wait_time", **{POOL_NAME: "otel-b"})

    # a second source on the same provider joins the same instruments: both are reported
    c = make_pool(minconn=0, maxconn=5, name="otel-c")
    instrument_pools(c, meter_provider=provider)
    read = OtelRead(reader)
    assert {p.attributes[POOL_NAME] for p in read.points("db.client.connection.max")} == \
        {"otel-b", "otel-c"}


# -- timing listeners: never a cost when absent, never a broken promise when present -------------


class Recorder:
    """A timing listener that records, or raises ``fail`` in the method named ``where``."""

    def __init__(self, where: str = "", fail: BaseException | None = None) -> None:
        self.where, self.fail = where, fail
        self.seen: dict[str, list[float]] = {"created": [], "waited": [], "used": []}

    def _record(self, what: str, seconds: float) -> None:
        if self.where == what and self.fail is not None:
            raise self.fail
        self.seen[what].append(seconds)

    def connection_created(self, seconds: float) -> None:
        self._record("created", seconds)

    def connection_waited(self, seconds: float) -> None:
        self._record("waited", seconds)

    def connection_used(self, seconds: float) -> None:
        self._record("used", seconds)


def books_exact(pool: Any, backends: Any) -> None:
    s = pool.stats()
    assert s["size"] == s["idle"] + s["in_use"] + s["opening"]
    assert s["in_use"] == 0 and s["opening"] == 0
    assert wait_until(lambda: backends(pool.app) == s["idle"])


@pytest.mark.parametrize("where", ["created", "waited", "used"])
def test_a_listener_interrupted_or_failing_leaves_the_books_exact(make_pool, backend_counter,
                                                                  where, caplog):
    pool = make_pool(minconn=0, maxconn=2, name=f"timed-{where}")
    good = Recorder()
    pool.add_timing_listener(good)
    pool.add_timing_listener(good)  # once
    assert pool.timing_listeners == (good,)

    # KeyboardInterrupt from the listener: the call raises it, the books stay exact
    bad = Recorder(where, KeyboardInterrupt())
    pool.add_timing_listener(bad)
    with pytest.raises(KeyboardInterrupt), pool.conn():
        pass
    books_exact(pool, backend_counter)
    pool.remove_timing_listener(bad)

    # an Exception from a listener is logged once and swallowed: checkouts go on
    broken = Recorder(where, RuntimeError("listener bug"))
    pool.add_timing_listener(broken)
    for _ in range(3):
        with pool.conn(), pool.conn():
            pass
    books_exact(pool, backend_counter)
    assert sum("timing listener" in r.getMessage() for r in caplog.records) == 1
    assert len(good.seen["waited"]) >= 6 and len(good.seen["used"]) >= 6
    assert good.seen["created"] and all(x > 0 for x in good.seen["created"])

    # the last listener gone: the fast paths are back, nothing is timed
    pool.remove_timing_listener(broken)
    pool.remove_timing_listener(good)
    pool.remove_timing_listener(good)  # not there: ignored
    assert pool.timing_listeners == ()
    waited = len(good.seen["waited"])
    with pool.conn():
        pass
    assert len(good.seen["waited"]) == waited


def test_a_closed_registry_or_dropped_pool_leaves_the_scrape(pg_cluster, tmp_path, pg_server):
    import gc
    import weakref

    from pgregistry import ConnectionPool
    from pgregistry.prometheus import register_pools

    yaml = tmp_path / "pools.yaml"
    yaml.write_text(f"version: 1\npools:\n  w:\n    host: {pg_cluster.primary.host}\n"
                    f"    port: {pg_cluster.port}\n    user: postgres\n    minconn: 0\n")
    collector_registry = CollectorRegistry()
    app = make_wsgi_app(collector_registry)
    with Registry.from_yaml(yaml, install_sighup=False) as reg:
        reg.register_prometheus(collector_registry)
        assert Parsed(scrape(app)[1]).label_values("pgregistry_pool_size", "pool") == {"w"}
    assert "pgregistry_" not in scrape(app)[1]  # closed: gone from the scrape

    # the collector holds its pools weakly: a registered collector never keeps one alive
    pool = ConnectionPool(0, 2, dsn=pg_server.dsn(), name="dropped")
    register_pools(pool, collector_registry=collector_registry)
    assert Parsed(scrape(app)[1]).label_values("pgregistry_pool_size", "pool") == {"dropped"}
    pool.close()
    ref = weakref.ref(pool)
    del pool
    gc.collect()
    assert ref() is None
    assert "pgregistry_" not in scrape(app)[1]


def test_otel_from_hand_made_stats(otel_reader):
    """The pgregistry.* figures a cluster here does not produce: an Aurora topology, free text."""
    from pgregistry.otel import instrument_pools

    reader, provider = otel_reader
    topo = StatsOf(hand_made("aurora", topology={
        "state": "hunting_writer", "instance_host_pattern": "?.cluster.test",
        "instances": {"a": {"role": "writer"}, "b": {"role": "reader"},
                      "c": {"role": "reader"}},
        "refreshes": 12, "refresh_failures": 3, "last_error": f"boom {SENTINEL_PASSWORD}"}))
    inst = instrument_pools(topo, meter_provider=provider, histograms=False)
    read = OtelRead(reader)
    where = {POOL_NAME: "aurora", "pgregistry.topology.cluster": "?.cluster.test"}
    assert read.point("pgregistry.topology.instances", **where, **{
        "pgregistry.role": "reader"}).value == 2
    assert read.point("pgregistry.topology.available", **where).value == 1
    assert read.point("pgregistry.topology.refresh_failures", **where).value == 3
    assert read.point("pgregistry.address.banned", **{
        POOL_NAME: "aurora", "network.peer.address": "127.0.0.13",
        "network.peer.port": 5432}).value == 1
    assert read.point("pgregistry.pool.connection.closed", **{
        POOL_NAME: "aurora", "pgregistry.close.reason": "brand_new_reason"}).value == 1
    for m in read.metrics.values():
        for p in m.data.data_points:
            assert SENTINEL_PASSWORD not in repr(dict(p.attributes))
    inst.uninstrument()
