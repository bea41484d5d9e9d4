"""What an installed pgregistry promises: its three packages import, ship py.typed, and
depend on each other only one way (pools never imports registry)."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources


def test_packages_import_and_are_typed():
    for name in ("pools", "registry", "schemas"):
        assert resources.files(name).joinpath("py.typed").is_file()
    out = subprocess.run(
        [sys.executable, "-c", "import pools, registry, schemas; print('ok')"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "ok"


def test_pools_never_imports_registry_nor_test_dependencies():
    code = (
        "import sys, pools, pools.compat; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('registry', 'schemas', 'dnslib', 'testcontainers', 'docker', 'pytest')]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names():
    import psycopg2

    import pools
    from pools import ConnectionPool, PoolError
    from pools.compat import SimpleConnectionPool, ThreadedConnectionPool  # noqa: F401

    assert issubclass(PoolError, psycopg2.Error)
    assert set(pools.__all__) >= {"ConnectionPool", "PoolError"}
    assert ConnectionPool.__init__.__code__.co_varnames[1:8] == (
        "minconn", "maxconn", "idle_timeout", "reap_idle_interval", "lifetime_timeout",
        "test_on_borrow", "background_prewarm",
    )
