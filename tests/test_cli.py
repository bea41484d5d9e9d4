"""The ``pgregistry`` command: check (several files, stdin, -v anywhere, plain help) and stats
(a state per pool and address, an exit status usable as a health check), on real servers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from helpers import SENTINEL_PASSWORD
from pgregistry.health import pool_health

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, stdin: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgregistry", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


GOOD = "version: 1\npools:\n  a: {host: db}\n"
BAD = "version: 1\npools:\n  a: {host: db, maxconn: 0}\n"


def test_check_takes_several_files_and_stdin(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(BAD)
    out = cli("check", str(good), "-", str(bad), stdin=GOOD)
    assert out.returncode == 1
    assert f"{good}: ok (1 pool(s): a)" in out.stdout and "<stdin>: ok" in out.stdout
    assert f"{bad}:3:17: pools.a.maxconn" in out.stderr
    out = cli("check", "-", stdin=BAD)
    assert out.returncode == 1 and out.stderr.startswith("<stdin>:3:17: pools.a.maxconn")
    assert cli("check", str(good), "-v").returncode == 0  # -v after the subcommand
    assert cli("-v", "check", str(good)).returncode == 0


def test_help_is_plain_text() -> None:
    for args in ((), ("check",), ("stats",)):
        out = cli(*args, "--help")
        assert out.returncode == 0
        assert "``" not in out.stdout and ":func:" not in out.stdout and ":data:" not in out.stdout
    assert "exit 0 ok, 1 refused" in cli("--help").stdout


def test_stats_healthy_refused_and_unresolvable(pg_server: Any, dns_server: Any, dead_port: int,
                                                tmp_path: Path) -> None:
    dns_server.set_a("db.cli.test", ["127.0.0.1"])  # another name of the zone exists
    path = tmp_path / "pools.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        dns: {{nameservers: [127.0.0.1], port: {dns_server.port}, lifetime: 1}}
        defaults: {{connect_timeout: 2, minconn: 1}}
        pools:
          healthy:
            dsn: "{pg_server.dsn(password=SENTINEL_PASSWORD)}"
          refused:
            host: 127.0.0.1
            port: {dead_port}
            password: {SENTINEL_PASSWORD}
          unresolvable:
            host: nowhere.cli.test
            minconn: 0
        """))
    t0 = time.monotonic()
    out = cli("stats", str(path), "--wait", "3")
    took = time.monotonic() - t0
    assert out.returncode == 3, out.stderr  # some pool is failing
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if line and not line.startswith(" ")}
    assert rows["healthy"][1] == "ok" and rows["healthy"][2] == "1"  # open
    assert rows["refused"][1] == "failing" and rows["unresolvable"][1] == "failing"
    assert "refused" in out.stdout.split("unresolvable")[0].split("refused", 1)[1]
    assert "cannot resolve 'nowhere.cli.test'" in out.stdout
    assert any(line.split()[:2] == [f"127.0.0.1:{dead_port}", "failing"]
               for line in out.stdout.splitlines() if line.startswith(" " * 10))
    assert SENTINEL_PASSWORD not in out.stdout + out.stderr
    assert took < 20
    out = cli("stats", str(path), "--wait", "3", "--json")
    data = json.loads(out.stdout)
    assert out.returncode == 3
    assert {n: data[n]["health"]["state"] for n in ("healthy", "refused", "unresolvable")} == {
        "healthy": "ok", "refused": "failing", "unresolvable": "failing"}
    assert SENTINEL_PASSWORD not in out.stdout
    # every pool healthy: exit 0
    path.write_text(f'version: 1\npools:\n  healthy: {{dsn: "{pg_server.dsn()}"}}\n')
    assert cli("stats", str(path)).returncode == 0


def test_stats_does_not_count_an_opening_connection_as_open(hanging_port: int,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text(f"version: 1\npools:\n  slow: {{host: 127.0.0.1, port: {hanging_port}, "
                    "connect_timeout: 30, minconn: 1}\n")
    t0 = time.monotonic()
    out = cli("stats", str(path), "--wait", "1")
    assert out.returncode == 3 and time.monotonic() - t0 < 15
    row = next(line.split() for line in out.stdout.splitlines() if line.startswith("slow"))
    assert row[1] == "failing" and row[2] == "0"  # nothing open


def test_pool_health_states() -> None:
    base = {"size": 2, "opening": 0, "minconn": 1, "in_use": 0, "idle": 2, "connect_errors": 0,
            "last_connect_error": None, "closed": False, "dns": {},
            "addresses": {"a:1": {"connections": 2, "opening": 0, "active": True,
                                  "banned": False, "connect_failures": 0, "last_error": None}}}
    assert pool_health("p", base).state == "ok"
    opening = {**base, "size": 1, "opening": 1}
    assert pool_health("p", opening).state == "failing"
    assert pool_health("p", opening).error == "still connecting"
    degraded = {**base, "addresses": {**base["addresses"], "b:1": {
        "connections": 0, "opening": 0, "active": True, "banned": True, "ban_reason": "refused",
        "connect_failures": 3, "last_error": "Connection refused"}}}
    health = pool_health("p", degraded)
    assert health.state == "degraded" and health.error == "Connection refused"
    assert [a.state for a in health.addresses] == ["ok", "failing"]
