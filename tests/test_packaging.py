"""What an installed pgregistry promises: one distinctive package (``pgregistry``) whose parts
import and ship py.typed, that an application's own ``registry.py``, ``schemas.py`` or
``pools.py`` cannot shadow, and whose folders depend on each other one way only:
YAML -> schemas -> registry -> pools (pools never imports registry; schemas imports nothing of
ours)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_packages_import_and_are_typed():
    for name in ("pgregistry", "pgregistry.pools", "pgregistry.schemas"):
        assert resources.files(name).joinpath("py.typed").is_file()
    assert resources.files("pgregistry.schemas").joinpath("pgregistry.schema.json").is_file()
    out = subprocess.run(
        [sys.executable, "-c",
         "import pgregistry, pgregistry.pools, pgregistry.schemas, pgregistry.compat; "
         "print(pgregistry.__version__)"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip()[:1].isdigit()


def _imports(folder: str) -> set[str]:
    """Every module a folder's files import, as absolute dotted names in the installed layout."""
    base = {"pools": "pgregistry.pools", "schemas": "pgregistry.schemas",
            "registry": "pgregistry"}[folder]
    found: set[str] = set()
    for path in (ROOT / folder).rglob("*.py"):
        rel = path.relative_to(ROOT / folder).with_suffix("")
        package = ".".join([base, *rel.parts[:-1]])
        if rel.name == "__init__":
            package = ".".join([base, *rel.parts[:-1]])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    parent = ".".join(parts[: len(parts) - node.level + 1])
                    found.add(f"{parent}.{node.module}" if node.module else parent)
                else:
                    found.add(node.module or "")
    return found


def test_folders_depend_one_way():
    ours = ("pgregistry", "registry", "schemas", "pools")
    pools = {m for m in _imports("pools") if m.split(".")[0] in ours}
    assert all(m.startswith("pgregistry.pools") for m in pools), sorted(pools)
    schemas = {m for m in _imports("schemas") if m.split(".")[0] in ours}
    assert all(m.startswith("pgregistry.schemas") for m in schemas), sorted(schemas)


def test_pools_need_no_test_dependencies():
    code = (
        "import sys, pgregistry.pools, pgregistry.compat; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('dnslib', 'testcontainers', 'docker', 'pytest', 'hypothesis')]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_app_with_its_own_registry_schemas_and_pools_modules(tmp_path):
    """The usual FastAPI layout: the app's own schemas.py, registry.py and pools.py beside its
    main.py, which is run from its own folder (so they come first on sys.path)."""
    for name in ("schemas", "registry", "pools"):
        (tmp_path / f"{name}.py").write_text(f"WHO = 'the app's own {name}'\n".replace("'s", "s"))
    (tmp_path / "main.py").write_text(textwrap.dedent("""\
        import pools, registry, schemas
        from pgregistry import ConfigError, ConnectionPool, Registry, RegistryConfig
        from pgregistry.compat import ThreadedConnectionPool
        assert pools.WHO and registry.WHO and schemas.WHO
        print("ok", Registry.__module__, ConnectionPool.__module__)
    """))
    out = subprocess.run([sys.executable, "main.py"], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("ok pgregistry.registry pgregistry.pools")


def test_public_names():
    import pgregistry
    import pgregistry.pools
    import psycopg2
    from pgregistry.compat import SimpleConnectionPool, ThreadedConnectionPool  # noqa: F401
    from pgregistry.pools import ConnectionPool, PoolError

    assert issubclass(PoolError, psycopg2.Error)
    assert issubclass(pgregistry.UnknownPoolError, KeyError)
    assert set(pgregistry.pools.__all__) >= {"ConnectionPool", "PoolError"}
    assert set(pgregistry.__all__) >= {"Registry", "UnknownPoolError", "ConnectionPool",
                                       "PoolError", "RegistryConfig", "PoolConfig",
                                       "ConfigError"}
    assert ConnectionPool.__init__.__code__.co_varnames[1:8] == (
        "minconn", "maxconn", "idle_timeout", "reap_idle_interval", "lifetime_timeout",
        "test_on_borrow", "background_prewarm",
    )
