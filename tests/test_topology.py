"""Aurora topology discovery, piece by piece: the discovery mode of a host name, the instance
host pattern, parsing ``aurora_replica_status()`` rows, the shared topology's schedule (on a
fake clock, refreshed against a real Aurora-like cluster), and the YAML keys."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
import yaml
from pgregistry.pools import FakeClock
from pgregistry.pools.topology import (
    FAILOVER_REFRESH_S,
    MASTER_SESSION_ID,
    STALE_ROW_S,
    ClusterTopology,
    TopologyUnavailable,
    check_instance_host_pattern,
    derive_instance_host_pattern,
    parse_topology,
    resolve_discovery,
    shared_topology,
)
from pgregistry.schemas import ConfigError, load_config

WRITER_EP = "mydb.cluster-c9akciq32.eu-west-1.rds.amazonaws.com"
READER_EP = "mydb.cluster-ro-c9akciq32.eu-west-1.rds.amazonaws.com"
CUSTOM_EP = "mydb.cluster-custom-c9akciq32.eu-west-1.rds.amazonaws.com"
PATTERN = "?.c9akciq32.eu-west-1.rds.amazonaws.com"


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("discovery", "host", "expected"), [
    ("auto", WRITER_EP, "aurora"),
    ("auto", READER_EP, "aurora"),
    ("auto", READER_EP.upper(), "aurora"),
    ("auto", CUSTOM_EP, "dns"),  # the topology does not say which instances it holds
    ("auto", "db.example.com", "dns"),
    ("auto", "instance-1.c9akciq32.eu-west-1.rds.amazonaws.com", "dns"),
    ("auto", "127.0.0.1", "dns"),
    ("dns", WRITER_EP, "dns"),
    ("aurora", "db.example.com", "aurora"),
])
def test_discovery_mode_of_a_host(discovery, host, expected):
    assert resolve_discovery(discovery, host) == expected


def test_unknown_discovery_mode_is_refused():
    with pytest.raises(ValueError, match="discovery must be one of"):
        resolve_discovery("consul", WRITER_EP)


def test_instance_host_pattern_is_derived_as_aws_driver_does():
    assert derive_instance_host_pattern(WRITER_EP) == PATTERN
    assert derive_instance_host_pattern(READER_EP) == PATTERN
    assert derive_instance_host_pattern(CUSTOM_EP) == PATTERN
    assert (derive_instance_host_pattern("a.cluster-x1.cn-north-1.rds.amazonaws.com.cn")
            == "?.x1.cn-north-1.rds.amazonaws.com.cn")
    assert derive_instance_host_pattern("db.example.com") is None


@pytest.mark.parametrize("bad", ["db.example.com", "??.x.com", "db-?.x.com", "?.x_y.com"])
def test_instance_host_pattern_is_checked(bad):
    with pytest.raises(ValueError, match="instance_host_pattern"):
        check_instance_host_pattern(bad)


# -- rows -------------------------------------------------------------------------------------

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)


def rows(*spec):
    return [(sid, MASTER_SESSION_ID if w else f"{sid}-s", 1.0, NOW - dt.timedelta(seconds=age))
            for sid, w, age in spec]


def test_rows_give_the_writer_and_readers_with_their_endpoints():
    snap = parse_topology(rows(("i2", False, 0), ("i1", True, 0), ("i3", False, 1)),
                          PATTERN, "i2", 10.0)
    assert snap.writer is not None and snap.writer.server_id == "i1"
    assert snap.writer.host == "i1.c9akciq32.eu-west-1.rds.amazonaws.com"
    assert [i.server_id for i in snap.readers] == ["i2", "i3"]
    assert [i.server_id for i in snap.for_role("reader")] == ["i2", "i3"]
    assert [i.server_id for i in snap.for_role("writer")] == ["i1"]
    assert len(snap.for_role("any")) == 3
    assert snap.source == "i2"


def test_rows_of_departed_instances_are_ignored_but_the_writer_never():
    old = STALE_ROW_S + 1
    snap = parse_topology(rows(("i1", True, old), ("i2", False, 0), ("gone", False, old)),
                          PATTERN, "i2", 0.0)
    assert [i.server_id for i in snap.instances] == ["i1", "i2"]
    assert snap.ignored == ("gone",)


def test_of_two_writer_rows_the_newest_wins():
    snap = parse_topology(rows(("old", True, 20), ("new", True, 0)), PATTERN, "new", 0.0)
    assert snap.writer is not None and snap.writer.server_id == "new"
    assert [i.server_id for i in snap.readers] == ["old"]


def test_no_reader_means_readers_use_the_writer_as_aurora_reader_endpoint_does():
    snap = parse_topology(rows(("i1", True, 0)), PATTERN, "i1", 0.0)
    assert [i.server_id for i in snap.for_role("reader")] == ["i1"]


def test_empty_topology_and_bad_instance_ids():
    with pytest.raises(TopologyUnavailable) as err:
        parse_topology([], PATTERN, "?", 0.0)
    assert err.value.reason == "empty"
    with pytest.raises(ValueError, match="cannot be a DNS label"):
        parse_topology(rows(("bad.id", True, 0)), PATTERN, "?", 0.0)


# -- the shared topology, on a fake clock against a real cluster -------------------------------


@pytest.fixture
def probe(aurora_cluster):
    by_host = {aurora_cluster.instance_endpoint(s): s for s in aurora_cluster.servers}

    def connect(host):
        server = by_host.get(host)
        if server is None or not server.running:
            raise ConnectionError(f"{host}: nothing there")
        return server.connect()

    return connect


def test_pools_of_one_cluster_share_one_topology():
    clock = FakeClock()
    a = shared_topology(PATTERN, "5432", clock)
    assert shared_topology(PATTERN.upper(), "5432", clock) is a
    assert shared_topology(PATTERN, "5433", clock) is not a
    assert shared_topology(PATTERN, "5432", FakeClock()) is not a


def test_refresh_schedule_and_writer_hunt(aurora_cluster, probe, caplog):
    caplog.set_level(logging.INFO, logger="pgregistry")
    clock = FakeClock()
    topo = ClusterTopology(aurora_cluster.instance_host_pattern, str(aurora_cluster.port),
                           clock=clock)
    woken = []
    topo.subscribe(lambda: woken.append(clock.monotonic()), 30.0)
    seeds = [aurora_cluster.instance_endpoint(aurora_cluster.primary)]
    assert topo.due() == float("-inf")  # nothing known: at once
    topo.refresh_now(probe, seeds)
    snap = topo.snapshot
    assert snap is not None and snap.writer is not None
    assert snap.writer.server_id == aurora_cluster.primary.name
    assert {i.server_id for i in snap.readers} == {r.name for r in aurora_cluster.replicas}
    assert topo.due() == clock.monotonic() + 30.0 and woken
    assert topo.stats()["state"] == "ok"

    # the writer goes: hunt, refreshing every second until the topology names another one
    old = aurora_cluster.primary.name
    aurora_cluster.primary.stop("immediate")
    topo.writer_gone()
    assert topo.hunting and topo.due() == clock.monotonic()
    assert topo.stats()["state"] == "hunting_writer"
    topo.refresh_now(probe, seeds)  # the table still names the old writer
    assert topo.hunting and topo.due() == clock.monotonic() + FAILOVER_REFRESH_S
    clock.advance(FAILOVER_REFRESH_S)
    aurora_cluster.primary.start()
    new = aurora_cluster.failover()
    topo.refresh_now(probe, seeds)
    assert not topo.hunting
    assert topo.snapshot is not None and topo.snapshot.writer is not None
    assert topo.snapshot.writer.server_id == new.name != old
    assert topo.due() == clock.monotonic() + 30.0
    assert "new writer" in caplog.text


def test_a_refresh_that_hangs_is_abandoned_and_its_late_answer_dropped(aurora_cluster, probe):
    clock = FakeClock()
    topo = ClusterTopology(aurora_cluster.instance_host_pattern, str(aurora_cluster.port),
                           clock=clock)
    seeds = [aurora_cluster.instance_endpoint(aurora_cluster.primary)]
    started = []

    def never(host):
        started.append(host)
        raise ConnectionError("not now")

    topo._running_since = clock.monotonic()  # a refresh in flight (its worker hangs)
    topo._generation = 1
    assert not topo.maybe_refresh(clock.monotonic(), never, seeds)
    clock.advance(topo.refresh_budget_s)
    topo._finish(0, None, None, ["late"])  # an older refresh's answer: dropped
    assert topo.refreshes == 0
    topo.refresh_now(probe, seeds)
    assert topo.snapshot is not None and topo.refreshes == 1


def test_topology_unavailable_reasons(aurora_cluster, probe, caplog):
    caplog.set_level(logging.WARNING, logger="pgregistry")
    clock = FakeClock()
    topo = ClusterTopology(aurora_cluster.instance_host_pattern, str(aurora_cluster.port),
                           clock=clock)
    seeds = [aurora_cluster.instance_endpoint(aurora_cluster.primary)]
    aurora_cluster.drop_topology_function()
    aurora_cluster.wait_replicated()
    topo.refresh_now(probe, seeds)
    topo.refresh_now(probe, seeds)
    assert topo.unavailable is not None and topo.unavailable.reason == "function_missing"
    assert topo.stats()["state"] == "unavailable"
    assert caplog.text.count("does not exist here") == 1  # warned once


# -- the YAML keys ----------------------------------------------------------------------------


def load(tmp_path, pool):
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "pools": {"p": pool}}))
    return load_config(path)


def test_yaml_discovery_keys(tmp_path):
    cfg = load(tmp_path, {"host": READER_EP, "discovery": "aurora", "topology_refresh_interval": 5})
    pool = cfg.pools["p"]
    assert pool.discovery == "aurora" and pool.topology_refresh_interval == 5
    assert pool.pool_kwargs()["discovery"] == "aurora"
    default = load(tmp_path, {"host": READER_EP}).pools["p"]
    assert default.discovery == "auto" and default.instance_host_pattern is None
    assert default.topology_refresh_interval == 30


@pytest.mark.parametrize(("pool", "message"), [
    ({"host": READER_EP, "discovery": "consul"}, "discovery"),
    ({"host": READER_EP, "topology_refresh_interval": 0}, "topology_refresh_interval"),
    ({"host": READER_EP, "instance_host_pattern": "db.example.com"}, "instance_host_pattern"),
    ({"host": "db.example.com", "discovery": "aurora"}, "needs instance_host_pattern"),
    ({"dsn": "host=db.example.com", "discovery": "aurora"}, "needs instance_host_pattern"),
])
def test_yaml_discovery_keys_are_checked(tmp_path, pool, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, pool)


def test_yaml_aurora_with_a_pattern_on_any_name(tmp_path):
    cfg = load(tmp_path, {"host": "db.example.com", "discovery": "aurora",
                          "instance_host_pattern": "?.db.example.com"})
    assert cfg.pools["p"].instance_host_pattern == "?.db.example.com"


def test_json_schema_knows_the_discovery_keys():
    from pgregistry.schemas.jsonschema import json_schema
    text = str(json_schema())
    for key in ("discovery", "instance_host_pattern", "topology_refresh_interval"):
        assert key in text
