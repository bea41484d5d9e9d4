"""Prometheus metrics: the text format (checked by a strict parser written here), a registry and
standalone pools on the session cluster scraped over HTTP, and the endpoint's edges."""

from __future__ import annotations

import logging
import math
import re
import textwrap
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pgregistry import (
    MetricsServer,
    Registry,
    metrics_text,
    pool_metrics,
    registry_metrics,
    start_metrics_server,
)
from pgregistry.metrics import CLOSE_REASONS, CONTENT_TYPE

# the servers trust loopback: this password is sent but never checked
SENTINEL = f"MetricsSentinel-{uuid.uuid4().hex[:12]}"

# -- a strict parser of the text exposition format 0.0.4 --------------------------------------

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_VALUE = re.compile(r"[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|Inf)|NaN")
_TYPES = {"counter", "gauge", "summary", "histogram", "untyped"}
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


@dataclass
class Family:
    name: str
    type: str | None = None
    help: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


@dataclass
class Exposition:
    families: dict[str, Family]

    def values(self, metric: str, /, **labels: str) -> list[float]:
        """Values of the samples called ``metric`` whose labels include ``labels``."""
        fam = self.families[_family_of(metric, self.families)]
        return [v for n, lb, v in fam.samples
                if n == metric and all(lb.get(k) == x for k, x in labels.items())]

    def value(self, metric: str, /, **labels: str) -> float:
        found = self.values(metric, **labels)
        assert len(found) == 1, f"{metric}{labels}: {len(found)} samples"
        return found[0]

    def label_values(self, name: str, label: str) -> set[str]:
        fam = self.families[_family_of(name, self.families)]
        return {lb[label] for n, lb, _ in fam.samples if n == name and label in lb}


def _family_of(sample: str, families: dict[str, Family]) -> str:
    """The declared family a sample name belongs to (with the suffixes its type allows)."""
    if sample in families and families[sample].type in ("counter", "gauge", "untyped",
                                                        "summary"):
        return sample
    for suffix, types in (("_bucket", {"histogram"}), ("_sum", {"histogram", "summary"}),
                          ("_count", {"histogram", "summary"})):
        base = sample[: -len(suffix)]
        if sample.endswith(suffix) and base in families and families[base].type in types:
            return base
    raise AssertionError(f"sample {sample} belongs to no declared family")


def _parse_labels(text: str, line: str) -> tuple[dict[str, str], str]:
    """Parse ``{a="x",b="y"}`` at the start of ``text``; return the labels and the rest."""
    assert text.startswith("{")
    labels: dict[str, str] = {}
    i = 1
    while True:
        if text[i] == "}":
            return labels, text[i + 1:]
        m = _LABEL_NAME.match(text, i)
        assert m, f"bad label name in {line!r}"
        name = m.group()
        assert name not in labels, f"label {name} twice in {line!r}"
        i = m.end()
        assert text[i:i + 2] == '="', f"expected =\" after {name} in {line!r}"
        i += 2
        value = []
        while text[i] != '"':
            if text[i] == "\\":
                assert text[i + 1] in _ESCAPES, f"bad escape in {line!r}"
                value.append(_ESCAPES[text[i + 1]])
                i += 2
            else:
                assert text[i] != "\n"
                value.append(text[i])
                i += 1
        labels[name] = "".join(value)
        i += 1
        if text[i] == ",":
            i += 1
        else:
            assert text[i] == "}", f"expected , or }} in {line!r}"


def parse(text: str) -> Exposition:
    """Parse and validate: HELP and TYPE at most once per family and before its samples, valid
    types, each sample in a declared family, families contiguous, no series twice, float values,
    counters named ``*_total`` and >= 0, histograms with cumulative buckets ending at +Inf."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    families: dict[str, Family] = {}
    finished: set[str] = set()
    current: str | None = None
    series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for line in text.splitlines():
        assert line.strip(), "no blank lines"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[1] in ("HELP", "TYPE"), f"comment {line!r}"
            assert len(parts) == 4 and _NAME.fullmatch(parts[2]), f"bad {line!r}"
            name = parts[2]
            assert name not in finished, f"{name} declared after its samples ended"
            fam = families.setdefault(name, Family(name))
            assert not fam.samples, f"{parts[1]} of {name} after its samples"
            if parts[1] == "HELP":
                assert fam.help is None, f"HELP {name} twice"
                assert "\n" not in parts[3]
                fam.help = parts[3]
            else:
                assert fam.type is None, f"TYPE {name} twice"
                assert parts[3] in _TYPES, f"type {parts[3]!r}"
                fam.type = parts[3]
            continue
        m = _NAME.match(line)
        assert m, f"bad sample {line!r}"
        name, rest = m.group(), line[m.end():]
        labels: dict[str, str] = {}
        if rest.startswith("{"):
            labels, rest = _parse_labels(rest, line)
        assert rest.startswith(" ") and _VALUE.fullmatch(rest[1:]), f"bad value in {line!r}"
        value = float(rest[1:])
        base = _family_of(name, families)
        if current != base:
            if current is not None:
                finished.add(current)
            assert base not in finished, f"samples of {base} are not together"
            current = base
        key = (name, tuple(sorted(labels.items())))
        assert key not in series, f"series twice: {line!r}"
        series.add(key)
        families[base].samples.append((name, labels, value))
    for fam in families.values():
        assert fam.help and fam.type, f"{fam.name}: HELP and TYPE"
        assert fam.name.startswith("pgregistry_"), fam.name
        if fam.type == "counter":
            assert fam.name.endswith("_total"), fam.name
            assert all(v >= 0 for _, _, v in fam.samples), fam.name
        if fam.type == "histogram":
            _check_histogram(fam)
        if fam.type in ("summary", "histogram"):
            assert all(v >= 0 for n, _, v in fam.samples if n.endswith(("_sum", "_count")))
    return Exposition(families)


def _check_histogram(fam: Family) -> None:
    groups: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for name, labels, value in fam.samples:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        if name.endswith("_bucket"):
            groups.setdefault(rest, []).append((float(labels["le"]), value))
        elif name.endswith("_count"):
            counts[rest] = value
    assert groups.keys() == counts.keys()
    for key, buckets in groups.items():
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and math.isinf(bounds[-1]), bounds
        cumulative = [n for _, n in buckets]
        assert cumulative == sorted(cumulative), cumulative
        assert cumulative[-1] == counts[key]


def scrape(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return resp.headers["Content-Type"], resp.read().decode("utf-8")


# -- the text format, from hand-made stats ------------------------------------------------------


def pool_stats(name: str = "p", **over: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "name": name, "minconn": 1, "maxconn": 4, "size": 3, "idle": 1, "in_use": 1,
        "opening": 1, "waiting": 2, "closed": False, "connections_opened": 7,
        "connections_closed": 4, "closed_by_reason": {"idle": 3, "brand_new_reason": 1},
        "checkouts": 42, "checkout_timeouts": 1, "connect_errors": 2,
        "last_connect_error": f"FATAL: password authentication failed ({SENTINEL})",
        "waits": 5, "wait_total_s": 1.25, "wait_max_s": 0.75, "rollbacks": 3,
        "placement": "least_connections", "role": "any", "role_changes": 0,
        "addresses": {
            "127.0.0.12:5432": {
                "host": "readers.db.test", "active": True, "connections": 2, "opening": 0,
                "connects": 3, "connect_failures": 0, "banned": False, "banned_until": None,
                "banned_for_s": 0.0, "ban_reason": None, "last_error": None, "in_use": 1,
                "idle": 1,
            },
            "127.0.0.13:5432": {
                "host": "readers.db.test", "active": False, "connections": 0, "opening": 1,
                "connects": 1, "connect_failures": 4, "banned": True, "banned_until": 12.5,
                "banned_for_s": 2.5, "ban_reason": "refused",
                "last_error": f"connection refused {SENTINEL}", "in_use": 0, "idle": 0,
            },
        },
        "dns": {
            "readers.db.test": {
                "addresses": ["127.0.0.12", "127.0.0.13"], "ttl_s": 30, "expires_in_s": -1.5,
                "stale": True, "queries": 9, "refresh_failures": 2, "stale_served": 4,
                "last_error": f"SERVFAIL {SENTINEL}",
            },
        },
    }
    s.update(over)
    return s


def test_text_format_from_hand_made_stats():
    weird = 'we"ird\\pool\nname'
    stats = {
        "plain": pool_stats("plain", fallback={"to": weird, "active": True,
                                               "since": "2024-05-01T00:00:00+00:00",
                                               "reason": f"down {SENTINEL}", "checkouts": 6}),
        weird: pool_stats(weird, maxconn=math.inf),
    }
    registry = {
        "path": "/etc/pools.yaml", "generation": 3, "reloads": 2, "reload_errors": 1,
        "last_reload_at": "2024-05-01T12:00:00+00:00",
        "last_reload_result": {"added": [], "generation": 3, "duration_s": 0.02},
        "last_reload_error": None, "draining": ["old"],
    }
    text = metrics_text(stats, registry)
    exp = parse(text)
    fams = exp.families

    # label values escaped, and read back intact
    assert 'pool="we\\"ird\\\\pool\\nname"' in text
    assert exp.value("pgregistry_pool_size", pool=weird) == 3
    assert exp.value("pgregistry_pool_max_size", pool=weird) == math.inf
    assert exp.label_values("pgregistry_pool_size", "pool") == {"plain", weird}

    # a counter per close reason: every known one (0 until it happens) and new ones
    closed = "pgregistry_pool_connections_closed_total"
    assert fams[closed].type == "counter"
    assert exp.label_values(closed, "reason") == set(CLOSE_REASONS) | {"brand_new_reason"}
    assert exp.value(closed, pool="plain", reason="idle") == 3
    assert exp.value(closed, pool="plain", reason="brand_new_reason") == 1
    assert exp.value(closed, pool="plain", reason="lifetime") == 0

    # pool gauges and counters
    for state, n in (("idle", 1), ("in_use", 1), ("opening", 1)):
        assert exp.value("pgregistry_pool_connections", pool="plain", state=state) == n
    assert exp.value("pgregistry_pool_waiting", pool="plain") == 2
    assert exp.value("pgregistry_pool_checkouts_total", pool="plain") == 42
    assert fams["pgregistry_pool_checkout_wait_seconds"].type == "summary"
    assert exp.value("pgregistry_pool_checkout_wait_seconds_sum", pool="plain") == 1.25
    assert exp.value("pgregistry_pool_checkout_wait_seconds_count", pool="plain") == 5
    assert exp.value("pgregistry_pool_checkout_wait_seconds_max", pool="plain") == 0.75
    assert not exp.values("pgregistry_pool_checkout_wait_seconds", pool="plain")  # no quantiles

    # fallback: only where configured
    assert exp.value("pgregistry_pool_fallback_active", pool="plain", fallback=weird) == 1
    assert exp.value("pgregistry_pool_fallback_checkouts_total", pool="plain") == 6
    assert exp.label_values("pgregistry_pool_fallback_active", "pool") == {"plain"}

    # addresses and DNS
    banned = {"pool": "plain", "address": "127.0.0.13:5432"}
    assert exp.value("pgregistry_address_banned", **banned) == 1
    assert exp.value("pgregistry_address_ban_remaining_seconds", **banned) == 2.5
    assert exp.value("pgregistry_address_active", **banned) == 0
    assert exp.value("pgregistry_address_connect_failures_total", **banned) == 4
    assert exp.value("pgregistry_address_connections", state="opening", **banned) == 1
    dns = {"pool": "plain", "name": "readers.db.test"}
    assert exp.value("pgregistry_dns_stale", **dns) == 1
    assert exp.value("pgregistry_dns_ttl_seconds", **dns) == 30
    assert exp.value("pgregistry_dns_stale_served_total", **dns) == 4
    assert exp.value("pgregistry_dns_refresh_failures_total", **dns) == 2
    assert exp.value("pgregistry_dns_addresses", **dns) == 2

    # the registry
    assert exp.value("pgregistry_registry_generation") == 3
    assert exp.value("pgregistry_registry_reload_errors_total") == 1
    assert exp.value("pgregistry_registry_last_reload_timestamp_seconds") == 1714564800.0
    assert exp.value("pgregistry_registry_last_reload_success") == 1
    assert exp.value("pgregistry_registry_draining_pools") == 1

    # free text stays out: errors, ban reasons, the registry's path
    for secret in (SENTINEL, "SERVFAIL", "refused", "/etc/pools.yaml", "FATAL"):
        assert secret not in text
    # the same stats give the same text; "_registry" left in the mapping is the registry's
    assert metrics_text({**stats, "_registry": registry}) == text


def test_wait_histogram_when_the_stats_carry_buckets():
    with_buckets = pool_stats("h", waits=5, wait_histogram={0.01: 1, "0.1": 3, 1: 4})
    text = metrics_text({"h": with_buckets, "plain": pool_stats("plain")})
    exp = parse(text)
    name = "pgregistry_pool_checkout_wait_seconds"
    assert exp.families[name].type == "histogram"
    assert [(lb["le"], v) for n, lb, v in exp.families[name].samples
            if n == name + "_bucket" and lb["pool"] == "h"] == \
        [("0.01", 1), ("0.1", 3), ("1.0", 4), ("+Inf", 5)]
    assert exp.value(name + "_count", pool="h") == 5
    assert exp.value(name + "_sum", pool="h") == 1.25
    # a pool without buckets still makes a valid histogram: everything in +Inf
    assert exp.value(name + "_bucket", pool="plain", le="+Inf") == 5


def test_missing_keys_are_left_out():
    text = metrics_text({"bare": {"name": "bare", "size": 1}})
    exp = parse(text)
    assert exp.value("pgregistry_pool_size", pool="bare") == 1
    assert "pgregistry_pool_checkouts_total" not in exp.families
    assert metrics_text({}) == ""


# -- against the session cluster ----------------------------------------------------------------


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
        pools:
          writer:
            host: {primary.host}
            minconn: 1
            maxconn: 2
          readers:
            host: readers.metrics.test
            minconn: 2
            maxconn: 4
            password: {SENTINEL}
        """))
    return path


@pytest.fixture
def reg(pg_cluster, dns_server, stepped, tmp_path):
    path = write_yaml(tmp_path / "pools.yaml", pg_cluster, dns_server,
                      f"pgr-metrics-{uuid.uuid4().hex[:8]}")
    registry = Registry.from_yaml(path, supervisor=stepped, install_sighup=False)
    stepped.run_until_idle()  # prewarm: one reader connection on each replica
    yield registry
    registry.close()


def test_registry_scraped_over_http(reg, pg_cluster):
    _, r1, r2 = pg_cluster.servers[:3]
    readers = reg.get("readers")
    with readers.conn() as a, readers.conn() as b:  # both prewarmed connections
        for conn in (a, b):
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
    with reg.get("writer").conn() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")

    with readers.conn(), MetricsServer(lambda: registry_metrics(reg)) as server:
        assert server.port != 0 and server.url.endswith(f":{server.port}/metrics")
        content_type, text = scrape(server.url)
        stats = reg.stats()  # nothing runs in the background: the same state as scraped

    assert content_type == CONTENT_TYPE
    assert SENTINEL not in text
    exp = parse(text)
    assert {"pgregistry_pool_connections", "pgregistry_address_connections",
            "pgregistry_dns_queries_total", "pgregistry_registry_generation"} <= exp.families.keys()

    # one reader connection on each replica, one of them checked out
    labels = {f"{r.host}:{pg_cluster.port}" for r in (r1, r2)}
    assert exp.label_values("pgregistry_address_open_connections", "address") >= labels
    in_use = 0.0
    for address in labels:
        where = {"pool": "readers", "address": address}
        assert exp.value("pgregistry_address_open_connections", **where) == 1
        assert sum(exp.values("pgregistry_address_connections", **where)) == 1
        assert exp.value("pgregistry_address_connects_total", **where) == 1
        assert exp.value("pgregistry_address_active", **where) == 1
        assert exp.value("pgregistry_address_banned", **where) == 0
        in_use += exp.value("pgregistry_address_connections", state="in_use", **where)
    assert in_use == 1

    # pool-level series match stats()
    for pool in ("readers", "writer"):
        s = stats[pool]
        for state in ("idle", "in_use", "opening"):
            assert exp.value("pgregistry_pool_connections", pool=pool, state=state) == s[state]
        assert exp.value("pgregistry_pool_size", pool=pool) == s["size"]
        assert exp.value("pgregistry_pool_min_size", pool=pool) == s["minconn"]
        assert exp.value("pgregistry_pool_max_size", pool=pool) == s["maxconn"]
        assert exp.value("pgregistry_pool_waiting", pool=pool) == s["waiting"]
        assert exp.value("pgregistry_pool_checkouts_total", pool=pool) == s["checkouts"]
        assert exp.value("pgregistry_pool_connections_opened_total", pool=pool) == \
            s["connections_opened"]
        # a histogram over every checkout (one that did not wait counts as 0 s)
        assert exp.value("pgregistry_pool_checkout_wait_seconds_count", pool=pool) == \
            s["checkouts"]
        assert exp.families["pgregistry_pool_checkout_wait_seconds"].type == "histogram"
    assert stats["readers"]["checkouts"] == 3 and stats["writer"]["checkouts"] == 1
    assert exp.value("pgregistry_pool_connections", pool="readers", state="in_use") == 1

    # every counter is a *_total and non-negative (parse checked); their families are counters
    for fam in exp.families.values():
        assert (fam.type == "counter") == fam.name.endswith("_total"), fam.name

    dns = {"pool": "readers", "name": "readers.metrics.test"}
    assert exp.value("pgregistry_dns_addresses", **dns) == 2
    assert exp.value("pgregistry_dns_queries_total", **dns) >= 1
    assert exp.value("pgregistry_dns_stale", **dns) == 0
    assert exp.value("pgregistry_registry_generation") == 1
    assert exp.value("pgregistry_registry_reloads_total") == 0


def test_start_metrics_server_and_standalone_pools(reg, make_pool):
    server = start_metrics_server(reg, port=0)
    try:
        _, text = scrape(server.url)
        assert SENTINEL not in text
        assert parse(text).label_values("pgregistry_pool_size", "pool") == {"writer", "readers"}
    finally:
        server.stop()
    server.stop()  # idempotent
    assert not server.running

    a = make_pool(minconn=1, maxconn=2, name="standalone-a", background_prewarm=False)
    b = make_pool(minconn=0, maxconn=3, name="standalone-b")
    with a.conn():
        exp = parse(pool_metrics(a, b))
        assert exp.value("pgregistry_pool_connections", pool="standalone-a", state="in_use") == 1
    assert exp.value("pgregistry_pool_max_size", pool="standalone-b") == 3
    assert "pgregistry_registry_generation" not in exp.families


# -- the endpoint -------------------------------------------------------------------------------


def test_endpoint_404_head_errors_and_quiet_logging(caplog):
    calls = []

    def source() -> str:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return metrics_text({"p": pool_stats("p")})

    with MetricsServer(source, port=0) as server:
        base = server.url.rsplit("/", 1)[0]
        for path in ("/", "/metrics/x", "/other"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path, timeout=10)
            assert err.value.code == 404
        assert not calls  # 404s never collect

        with caplog.at_level(logging.DEBUG, logger="registry.metrics"):
            _, text = scrape(server.url + "?x=1")  # a query string is fine
        parse(text)
        assert any("GET /metrics" in r.getMessage() and r.levelno == logging.DEBUG
                   for r in caplog.records)

        head = urllib.request.Request(server.url, method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as resp:
            assert resp.status == 200 and resp.read() == b""

        caplog.clear()
        with caplog.at_level(logging.INFO, logger="registry.metrics"), \
                pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url, timeout=10)
        assert err.value.code == 500
        assert any(r.levelno == logging.ERROR for r in caplog.records)
        assert not any("GET" in r.getMessage() for r in caplog.records)  # requests: DEBUG only
    assert not server.running


@pytest.mark.parametrize("bad", [
    "pgregistry_x 1\n",  # no TYPE/HELP
    "# HELP pgregistry_x h\n# TYPE pgregistry_x gauge\npgregistry_x one\n",  # not a number
    "# HELP pgregistry_x h\n# TYPE pgregistry_x gauge\n# TYPE pgregistry_x gauge\npgregistry_x 1\n",
    "# HELP pgregistry_x h\n# TYPE pgregistry_x gauges\npgregistry_x 1\n",  # no such type
    '# HELP pgregistry_x h\n# TYPE pgregistry_x gauge\npgregistry_x{a="\\q"} 1\n',  # escape
    '# HELP pgregistry_x h\n# TYPE pgregistry_x gauge\npgregistry_x{a="1",a="2"} 1\n',
    '# HELP pgregistry_x h\n# TYPE pgregistry_x gauge\npgregistry_x{1a="1"} 1\n',
    "# HELP pgregistry_x h\n# TYPE pgregistry_x gauge\npgregistry_x 1\npgregistry_x 2\n",
    "# HELP pgregistry_x h\n# TYPE pgregistry_x counter\npgregistry_x 1\n",  # not *_total
    "# HELP pgregistry_x_total h\n# TYPE pgregistry_x_total counter\npgregistry_x_total -1\n",
    "# HELP pgregistry_x h\n# TYPE pgregistry_x gauge\npgregistry_x_sum 1\n",  # not a summary
    "# HELP pgregistry_x h\n# TYPE pgregistry_x gauge\npgregistry_x 1",  # no final newline
    "# HELP pgregistry_a h\n# TYPE pgregistry_a gauge\npgregistry_a 1\n"  # not together
    "# HELP pgregistry_b h\n# TYPE pgregistry_b gauge\npgregistry_b 1\npgregistry_a{x=\"1\"} 2\n",
])
def test_the_parser_is_strict(bad):
    with pytest.raises(AssertionError):
        parse(bad)


def test_registry_metrics_text_method(tmp_path, pg_cluster) -> None:
    from pgregistry import Registry

    path = tmp_path / "pools.yaml"
    path.write_text(f"version: 1\npools:\n  w:\n    host: {pg_cluster.primary.host}\n"
                    f"    port: {pg_cluster.port}\n    user: postgres\n    minconn: 0\n")
    with Registry.from_yaml(path, install_sighup=False) as reg:
        with reg.get("w").conn():
            pass
        text = reg.metrics_text()
        assert 'pgregistry_pool_checkouts_total{pool="w"} 1' in text
        server = reg.start_metrics_server()
        try:
            import urllib.request

            with urllib.request.urlopen(server.url, timeout=5) as resp:
                assert b"pgregistry_pool_size" in resp.read()
        finally:
            server.stop()
