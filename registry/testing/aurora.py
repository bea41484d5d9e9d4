"""An Aurora-like cluster for tests: the topology in SQL, and DNS endpoints as Aurora serves them.

What Aurora does (see TESTING.md, "Aurora as it really is") and what this reproduces locally:

- Every instance answers ``aurora_replica_status()`` (a row per instance: ``server_id``,
  ``session_id`` = ``'MASTER_SESSION_ID'`` for the writer, ``replica_lag_in_msec``,
  ``last_update_timestamp``, ``cpu``) and ``aurora_db_instance_identifier()`` (its own id). Here
  both are SQL functions over a table on the primary, replicated to every standby like any other
  object; every server runs with its instance id as ``cluster_name``. Start, failover, adding and
  removing a replica update the table. The row of an instance that left stays, its
  ``last_update_timestamp`` frozen at its departure (live rows read ``now()``).
- DNS (on a :class:`~.dns.DnsServer`): an instance endpoint ``<id>.<cluster-id>.<region>.
  rds.amazonaws.com`` per instance (one A record, TTL 5); the reader endpoint
  ``<name>.cluster-ro-<cluster-id>...`` a CNAME (TTL 1) to ONE reader's instance endpoint, picked
  at random per query (the writer when there is no reader); the cluster (writer) endpoint
  ``<name>.cluster-<cluster-id>...`` a CNAME to the writer's instance endpoint that follows a
  failover only ``writer_dns_lag_s`` seconds later.

Faults for tests: :meth:`AuroraCluster.drop_topology_function` (not Aurora, or an old engine),
:meth:`AuroraCluster.revoke_topology` (permission denied for a non-superuser role),
:meth:`AuroraCluster.remove_instance_dns` (an instance id with no DNS record).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg2.extensions

from .cluster import LocalCluster
from .dns import DnsServer
from .processes import HarnessError
from .servers import PgServer

__all__ = ["APP_ROLE", "AuroraCluster", "MASTER_SESSION_ID"]

log = logging.getLogger(__name__)

MASTER_SESSION_ID = "MASTER_SESSION_ID"
#: A non-superuser login role every AuroraCluster has (trust auth), for permission tests.
APP_ROLE = "pgr_app"
INSTANCE_TTL_S = 5  # Aurora's instance endpoints
READER_TTL_S = 1  # Aurora's reader endpoint
WRITER_TTL_S = 5

_TOPOLOGY_SQL = f"""
CREATE TABLE IF NOT EXISTS pgr_aurora_topology (
    server_id text PRIMARY KEY,
    session_id text NOT NULL,
    replica_lag_in_msec double precision NOT NULL DEFAULT 0,
    departed_at timestamptz,
    cpu double precision NOT NULL DEFAULT 1.5
);
CREATE OR REPLACE FUNCTION aurora_replica_status()
RETURNS TABLE (server_id text, session_id text, replica_lag_in_msec double precision,
               last_update_timestamp timestamptz, cpu double precision)
LANGUAGE sql STABLE AS $$
    SELECT server_id, session_id, replica_lag_in_msec, coalesce(departed_at, now()), cpu
    FROM pgr_aurora_topology ORDER BY server_id
$$;
CREATE OR REPLACE FUNCTION aurora_db_instance_identifier() RETURNS text
LANGUAGE sql STABLE AS $$ SELECT current_setting('cluster_name') $$;
GRANT SELECT ON pgr_aurora_topology TO PUBLIC;
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
        CREATE ROLE {APP_ROLE} LOGIN;
    END IF;
END $$;
"""


class AuroraCluster(LocalCluster):
    """A :class:`LocalCluster` that publishes an Aurora topology and, given a DNS server,
    Aurora's endpoints.

    :param cluster_id: the cluster's DNS id (the ``<cluster-id>`` of every endpoint).
    :param name: the cluster's name (the first label of its cluster and reader endpoints).
    :param region: the region label of the endpoints.
    :param dns: where the endpoints are published (optional: without it only the topology is).
    :param writer_dns_lag_s: how long the cluster endpoint keeps naming the old writer after a
        failover (Aurora: up to 40-60 s per AWS's driver documentation), on the DNS server's
        clock (:meth:`DnsServer.delay_updates`).
    Other arguments as :class:`LocalCluster`.
    """

    def __init__(
        self,
        n_replicas: int = 2,
        base_ip: str = "127.0.0.11",
        port: int | None = None,
        *,
        cluster_id: str = "cpgr0test0id",
        name: str = "demo",
        region: str = "local-1",
        dns: DnsServer | None = None,
        writer_dns_lag_s: float = 0.0,
        **kw: Any,
    ) -> None:
        super().__init__(n_replicas, base_ip, port, **kw)
        self.cluster_id = cluster_id
        self.cluster_name = name
        self.region = region
        self.dns = dns
        self.writer_dns_lag_s = writer_dns_lag_s
        self._instance_counter = 0

    # -- names ------------------------------------------------------------------------------------

    @property
    def domain(self) -> str:
        return f"{self.cluster_id}.{self.region}.rds.amazonaws.com"

    @property
    def writer_endpoint(self) -> str:
        """The cluster (writer) endpoint."""
        return f"{self.cluster_name}.cluster-{self.domain}"

    @property
    def reader_endpoint(self) -> str:
        return f"{self.cluster_name}.cluster-ro-{self.domain}"

    @property
    def instance_host_pattern(self) -> str:
        """``?.<cluster-id>.<region>.rds.amazonaws.com``, as AWS's driver derives it."""
        return f"?.{self.domain}"

    def instance_endpoint(self, server: PgServer | str) -> str:
        server_id = server if isinstance(server, str) else server.name
        return f"{server_id}.{self.domain}"

    def _new_server(self, role: str, host: str) -> PgServer:
        # instance ids as Aurora names them: stable per instance, whatever its role
        assert self.dir is not None and self.bindir is not None
        if role == "primary":  # a first start (again, when its port got taken)
            self._instance_counter = 0
        self._instance_counter += 1
        name = f"{self.cluster_name}-instance-{self._instance_counter}"
        return PgServer(name, host, self.port, self.dir / name, bindir=self.bindir,
                        log_path=self.dir / f"{name}.log")

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> AuroraCluster:
        with self._lock:
            if self.started:
                return self
            super().start()
            self.primary.execute(_TOPOLOGY_SQL)
            self._publish()
            self.wait_replicated()
            return self

    def add_replica(self, ip: str | None = None) -> PgServer:
        with self._lock:
            server = super().add_replica(ip)
            self._publish()
            return server

    def remove_replica(self, server: PgServer) -> None:
        with self._lock:
            super().remove_replica(server)
            self._publish(departed=[server.name])

    def failover(self, new_primary: PgServer | None = None) -> PgServer:
        """Stop the writer, promote a replica, then (at once) the topology names the new writer
        and the reader endpoint drops the promoted instance; the cluster endpoint follows only
        ``writer_dns_lag_s`` later."""
        with self._lock:
            old = self.primary
            new = super().failover(new_primary)
            self._publish(departed=[old.name])
            return new

    # -- the topology -----------------------------------------------------------------------------

    def _publish(self, departed: Sequence[str] = ()) -> None:
        """Write the topology on the primary (replicated to every standby) and the DNS."""
        primary = self.primary
        conn = primary.connect()
        try:
            with conn.cursor() as cur:
                for server in self.servers:
                    session = (MASTER_SESSION_ID if server is primary
                               else f"{server.name}-session")
                    cur.execute(
                        "INSERT INTO pgr_aurora_topology (server_id, session_id, departed_at)"
                        " VALUES (%s, %s, NULL) ON CONFLICT (server_id) DO UPDATE"
                        " SET session_id = EXCLUDED.session_id, departed_at = NULL",
                        (server.name, session),
                    )
                if departed:
                    cur.execute(
                        "UPDATE pgr_aurora_topology SET departed_at = now(),"
                        " session_id = server_id || '-session'"
                        " WHERE server_id = ANY(%s) AND departed_at IS NULL",
                        (list(departed),),
                    )
        finally:
            conn.close()
        self._publish_dns()

    def topology(self, server: PgServer | None = None) -> list[tuple[Any, ...]]:
        """The rows of ``aurora_replica_status()`` as ``server`` (default: the primary) sees
        them."""
        rows = (server or self.primary).execute(
            "SELECT server_id, session_id, replica_lag_in_msec, last_update_timestamp, cpu"
            " FROM aurora_replica_status()"
        )
        return rows or []

    def age_departed(self, seconds: float) -> None:
        """Move the departure time of every departed instance ``seconds`` further back."""
        self.primary.execute(
            "UPDATE pgr_aurora_topology SET departed_at = departed_at - make_interval(secs => %s)"
            " WHERE departed_at IS NOT NULL",
            (seconds,),
        )

    def add_topology_row(self, server_id: str, *, writer: bool = False) -> None:
        """A row for an instance this harness does not run (a ghost, or an instance whose DNS
        record does not exist)."""
        self.primary.execute(
            "INSERT INTO pgr_aurora_topology (server_id, session_id) VALUES (%s, %s)"
            " ON CONFLICT (server_id) DO NOTHING",
            (server_id, MASTER_SESSION_ID if writer else f"{server_id}-session"),
        )

    def drop_topology_function(self) -> None:
        """``aurora_replica_status()`` no longer exists (a plain PostgreSQL, an old engine)."""
        self.primary.execute("DROP FUNCTION IF EXISTS aurora_replica_status()")

    def revoke_topology(self) -> None:
        """Only superusers may call ``aurora_replica_status()``: :data:`APP_ROLE` gets
        ``permission denied``."""
        self.primary.execute("REVOKE EXECUTE ON FUNCTION aurora_replica_status() FROM PUBLIC")

    # -- DNS --------------------------------------------------------------------------------------

    def _publish_dns(self) -> None:
        dns = self.dns
        if dns is None:
            return
        for server in self.servers:
            dns.set_a(self.instance_endpoint(server), [server.host], ttl=INSTANCE_TTL_S)
        readers = [self.instance_endpoint(r) for r in self.replicas if r.running]
        dns.set_rotating(self.reader_endpoint, readers or [self.instance_endpoint(self.primary)],
                         ttl=READER_TTL_S)
        # the first answer is there at once; every later change of the writer comes late
        dns.set_cname(self.writer_endpoint, self.instance_endpoint(self.primary),
                      ttl=WRITER_TTL_S)
        if self.writer_dns_lag_s > 0:
            dns.delay_updates(self.writer_endpoint, self.writer_dns_lag_s)

    def remove_instance_dns(self, server: PgServer | str) -> None:
        """The instance endpoint of ``server`` stops resolving (NXDOMAIN)."""
        if self.dns is None:
            raise HarnessError("this AuroraCluster publishes no DNS")
        self.dns.remove(self.instance_endpoint(server))

    def dsn(self, endpoint: str, **extra: Any) -> str:
        """A libpq DSN for one of the endpoints (``host=<endpoint> port=<port> ...``)."""
        params = {"host": endpoint, "port": str(self.port), "user": "postgres",
                  "dbname": "postgres", **{k: str(v) for k, v in extra.items()}}
        return str(psycopg2.extensions.make_dsn(**params))
