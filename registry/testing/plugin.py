"""pytest fixtures for real-server tests: ``pytest_plugins = ["pgregistry.testing.plugin"]``.

Session fixtures share one cluster (``pg_cluster``, ``pg_primary``, ``pg_server``) and one
PgBouncer in front of its primary (``pgbouncer``); tests that break servers (failover, kill,
freeze) take ``fresh_cluster`` instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import pytest

from .aurora import AuroraCluster
from .cluster import LocalCluster, PgServer, SqlServer
from .dns import DnsServer
from .docker import ContainerServer, docker_available
from .pgbouncer import PgBouncer

log = logging.getLogger(__name__)

__all__ = [
    "aurora_cluster",
    "backend_counter",
    "clean_db",
    "dns_server",
    "fresh_cluster",
    "pg_cluster",
    "pg_primary",
    "pg_server",
    "pgbouncer",
]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalCluster]:
    """A primary and two replicas on 127.0.0.11-13, one port, shared by the whole session."""
    yield from _running_cluster()


@pytest.fixture(scope="session")
def pg_primary(pg_cluster: LocalCluster) -> PgServer:
    return pg_cluster.primary


@pytest.fixture(scope="session")
def pgbouncer(pg_cluster: LocalCluster) -> Iterator[PgBouncer]:
    """PgBouncer (transaction mode, pool size 20) in front of the session cluster's primary."""
    bouncer = PgBouncer([pg_cluster.primary]).start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Iterator[SqlServer]:
    """One server: a container when Docker answers, else the session cluster's primary."""
    if docker_available():
        server = ContainerServer().start()
        try:
            yield server
        finally:
            server.stop()
        return
    cluster: LocalCluster = request.getfixturevalue("pg_cluster")
    yield cluster.primary


@pytest.fixture
def fresh_cluster() -> Iterator[LocalCluster]:
    """A cluster of this test's own (primary + 2 replicas), for destructive tests."""
    yield from _running_cluster()


def _running_cluster() -> Iterator[LocalCluster]:
    """A started primary + 2 replicas, stopped afterwards (thawed first: a test may have
    frozen one)."""
    cluster = LocalCluster(n_replicas=2).start()
    try:
        yield cluster
    finally:
        for server in cluster.servers:
            server.thaw()
        cluster.stop()


@pytest.fixture
def aurora_cluster(dns_server: DnsServer) -> Iterator[AuroraCluster]:
    """An Aurora-faithful cluster of this test's own: a writer and 3 readers publishing
    ``aurora_replica_status()``, Aurora's endpoints on ``dns_server`` (reader endpoint: a
    rotating CNAME, TTL 1; cluster endpoint: a CNAME that follows a failover 30 s late)."""
    cluster = AuroraCluster(n_replicas=3, dns=dns_server, writer_dns_lag_s=30.0).start()
    try:
        yield cluster
    finally:
        for server in cluster.servers:
            server.thaw()
        cluster.stop()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clean_db(request: pytest.FixtureRequest, pg_server: SqlServer) -> SqlServer:
    """The single-server backend (``pg_server``) with no other client backends and an empty
    ``pgr_scratch`` table (replicated, when it is the session cluster's primary)."""
    primary = pg_server
    rows = primary.execute(
        "SELECT pid FROM pg_stat_activity"
        " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    victims = [int(row[0]) for row in rows or []]
    if victims:  # a separate statement: a filter's order of evaluation is not guaranteed
        primary.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (victims,)
        )
    deadline = time.monotonic() + 10
    while victims:
        left = primary.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (victims,)
        )
        if not left or not left[0][0]:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{left[0][0]} client backends survived pg_terminate_backend")
        time.sleep(0.005)
    if victims:
        log.debug("clean_db terminated %d backends", len(victims))
    primary.execute("DROP TABLE IF EXISTS pgr_scratch")
    primary.execute("CREATE TABLE pgr_scratch (id serial PRIMARY KEY, v text)")
    if isinstance(primary, PgServer):
        cluster: LocalCluster = request.getfixturevalue("pg_cluster")
        if cluster.primary is primary:
            cluster.wait_replicated()
    return primary


@pytest.fixture
def backend_counter(pg_primary: PgServer) -> Callable[..., int]:
    """``count(application_name=None) -> int``: client backends on the primary."""

    def count(application_name: str | None = None) -> int:
        return pg_primary.backend_count(application_name)

    return count
