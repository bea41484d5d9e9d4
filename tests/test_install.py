"""``pip install .`` into a fresh virtualenv: the installed ``pgregistry`` (not this checkout)
ships its JSON Schema, and ``pgregistry check examples/pools.yaml`` works as the example's
header says (its password variable set first).

The source is copied to a temporary directory first (setuptools writes build/ and *.egg-info
beside it), and installed without build isolation or dependencies: the build backend and the
dependencies come from the test environment (its site-packages is put on the fresh venv's path
behind the venv's own), so the test needs no package index."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_pip_install_into_a_fresh_venv(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("registry", "pools", "schemas"):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (psycopg2, pydantic, ...) from the test environment, after the venv's own
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "zz_test_dependencies.pth").write_text("\n".join(ours) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-build-isolation", "--no-index", str(source)],
        capture_output=True, text=True, timeout=300)
    if "setuptools>=" in out.stderr and out.returncode:  # pragma: no cover - an old venv
        pytest.fail(f"the test environment's setuptools is too old: {out.stderr[-500:]}")
    assert out.returncode == 0, out.stderr[-2000:]

    workdir = tmp_path / "elsewhere"  # not the checkout: its folders must not be importable
    workdir.mkdir()
    probe = subprocess.run(
        [str(python), "-c", "import pgregistry, importlib.resources as r; "
         "print(pgregistry.__file__); "
         "print(r.files('pgregistry.schemas').joinpath('pgregistry.schema.json').is_file())"],
        capture_output=True, text=True, cwd=workdir, check=True)
    installed, has_schema = probe.stdout.split()
    assert installed.startswith(purelib) and has_schema == "True"

    env = {**os.environ, "PGPASSWORD": "set-first-as-the-header-says"}
    check = subprocess.run([str(env_dir / "bin" / "pgregistry"), "check",
                            str(ROOT / "examples" / "pools.yaml")],
                           capture_output=True, text=True, cwd=workdir, env=env, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "ok (3 pool(s): writer, readers, analytics)" in check.stdout
    header = (ROOT / "examples" / "pools.yaml").read_text().split("version:", 1)[0]
    assert "pgregistry check examples/pools.yaml" in header and "PGPASSWORD" in header
