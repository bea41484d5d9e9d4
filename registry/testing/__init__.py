"""Real-server test harness: local PostgreSQL clusters and a loopback DNS server.

``pgregistry.testing.cluster``  LocalCluster (a primary and replicas on loopback addresses)
``pgregistry.testing.servers``  PgServer, SqlServer (one server)
``pgregistry.testing.processes`` find_pg_bindir, free_port, base_dir, the initdb template
``pgregistry.testing.aurora``   AuroraCluster: topology functions and Aurora's DNS endpoints
``pgregistry.testing.dns``      DnsServer (needs dnslib, a test extra; its records: ``dnszone``)
``pgregistry.testing.docker``   docker_available, ContainerServer (needs testcontainers)
``pgregistry.testing.pgbouncer`` PgBouncer, find_pgbouncer (needs the pgbouncer binary)
``pgregistry.testing.plugin``   pytest fixtures: ``pytest_plugins = ["pgregistry.testing.plugin"]``

Names are imported lazily, so ``import pgregistry.testing`` pulls in neither dnslib nor docker.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AuroraCluster",
    "ContainerServer",
    "DnsServer",
    "HarnessError",
    "LocalCluster",
    "PgBouncer",
    "PgServer",
    "ServerStartError",
    "docker_available",
    "find_pg_bindir",
    "find_pgbouncer",
    "free_port",
]

_WHERE = {
    "AuroraCluster": "aurora",
    "ContainerServer": "docker",
    "DnsServer": "dns",
    "HarnessError": "processes",
    "LocalCluster": "cluster",
    "PgBouncer": "pgbouncer",
    "PgServer": "servers",
    "ServerStartError": "processes",
    "docker_available": "docker",
    "find_pg_bindir": "processes",
    "find_pgbouncer": "pgbouncer",
    "free_port": "processes",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
