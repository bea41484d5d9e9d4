"""The benchmark (bench/bench.py, `make bench`) runs end to end in its --quick smoke mode.

Only that it runs and reports every workload: timings are never asserted (a smoke run has too
few samples, and a test machine is no benchmark machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "bench.py"
PEERS = ("psycopg_pool", "psycopg2_pool", "sqlalchemy", "psycopg")


def missing_peers(python: str) -> list[str]:
    """The bench extra's modules that ``python`` (the interpreter the bench runs with) lacks."""
    code = (
        "import importlib.util, sys\n"
        f"print(' '.join(m for m in {PEERS!r} if importlib.util.find_spec(m) is None))"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60,
                          check=True)
    return done.stdout.split()


@pytest.mark.timeout(240)
def test_quick_bench_runs_every_workload(tmp_path: Path) -> None:
    missing = missing_peers(sys.executable)
    if missing:
        pytest.skip(f"the `bench` extra is not installed (no {', '.join(missing)}): "
                    "make bench, or pip install -e '.[bench]'")
    out_json = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=200, check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    lines = out.splitlines()
    for start in ("machine ", "W1 ", "W2 ", "W3 ", "W4 ", "W5 ", "H ", "SUMMARY ",
                  "OURS VS PEERS ", "TARGETS "):
        assert any(line.startswith(start) for line in lines), f"no {start!r} line:\n{out}"
    # every subject is in the tables, and every target has a verdict
    for subject in ("floor: Lock+deque FIFO", "ours: ConnectionPool", "registry.get(name).conn()",
                    "psycopg2.pool", "psycopg2_pool", "psycopg_pool", "SQLAlchemy QueuePool"):
        assert subject in out, f"{subject!r} missing:\n{out}"
    verdicts = [line.split()[0] for line in lines if line.strip().startswith(("PASS", "MISS"))]
    assert len(verdicts) >= 10, out
    assert out_json.is_file()
