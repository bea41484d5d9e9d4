"""The shipped examples: the annotated YAML validates, and the app runs on it against the local
Aurora-like cluster (the file's ${VAR} defaults name Aurora; the environment points it here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pools.yaml"


def run(args, env, timeout=60):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def test_example_yaml_checks_ok():
    env = {**os.environ, "PGPASSWORD": "from-the-environment"}
    out = run(["-m", "pgregistry", "check", str(EXAMPLE)], env)
    assert out.returncode == 0, out.stderr
    assert "3 pool(s): writer, readers, analytics" in out.stdout


def test_example_yaml_names_a_missing_password_variable():
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    out = run(["-m", "pgregistry", "check", str(EXAMPLE)], env)
    assert out.returncode == 1
    assert "PGPASSWORD" in out.stderr and "Traceback" not in out.stderr


def test_example_app_runs_on_the_local_cluster(aurora_cluster, dns_server):
    """On the Aurora-faithful cluster: the example's discovery: aurora reads its topology."""
    env = {
        **os.environ,
        "PGREGISTRY_DNS_SERVER": "127.0.0.1",
        "PGREGISTRY_DNS_PORT": str(dns_server.port),
        "WRITER_HOST": aurora_cluster.writer_endpoint,
        "READER_HOST": aurora_cluster.reader_endpoint,
        "PGPORT": str(aurora_cluster.port),
        "PGDATABASE": "postgres",
        "PGUSER": "postgres",
        "PGPASSWORD": "unused-with-trust-auth",
        "PGSSLMODE": "disable",
    }
    out = run([str(ROOT / "examples" / "app.py")], env)
    assert out.returncode == 0, out.stderr
    assert "wrote visit" in out.stdout and "read from a replica" in out.stdout
    assert "statement_timeout=5min" in out.stdout
