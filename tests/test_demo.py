"""The demo (`python -m pgregistry demo`, what `make demo` runs): the whole timeline on its own
local cluster, Ctrl-C, and `--config` against the session cluster."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import run_load_for, wait_until

ROOT = Path(__file__).resolve().parents[1]
TABLE_ROW = re.compile(r"^\s*(?:\d+\.\ds\s+\S+)?\s+(writer|readers)\s+(\d+)/(\d+)\s+(\d+)\s+(\d+)"
                       r"\s+(.*)$")


def run_demo(*args: str, timeout: float = 120,
             keep_log: bool = False) -> subprocess.CompletedProcess[str]:
    """The demo with ``args``; its pools' log is discarded unless ``keep_log``."""
    log = () if keep_log or "--help" in args else ("--log", os.devnull)
    return subprocess.run(
        [sys.executable, "-m", "pgregistry", "demo", *args, *log],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def assert_nothing_left(out: str) -> None:
    """No server of the demo runs any more, and its data and YAML are gone."""
    data = re.search(r"data in (\S+?)\)", out)
    config = re.search(r"^\s+config\s+(\S+)", out, re.M)
    assert data and config, out
    base = Path(data.group(1)).parent  # /dev/shm/pgregistry-<pid>-<random>
    assert base.name.startswith("pgregistry-"), base
    assert wait_until(lambda: processes_mentioning(str(base)) == [], 5)
    assert not Path(data.group(1)).exists() and not base.exists()
    assert not Path(config.group(1)).parent.exists()


def rows(lines: list[str], pool: str) -> list[re.Match[str]]:
    return [m for line in lines if (m := TABLE_ROW.match(line)) and m.group(1) == pool]


@pytest.mark.timeout(180)
def test_demo_runs_the_whole_timeline() -> None:
    done = run_demo("--duration", "15", "--interval", "1", keep_log=True)
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    lines = out.splitlines()

    # the live table: a header, then lines for both pools with their spread
    assert any(re.match(r"^\s+time\s+phase\s+pool\s+conns\s+chk/s\s+err\s+spread", ln)
               for ln in lines), out
    writer_rows, reader_rows = rows(lines, "writer"), rows(lines, "readers")
    assert len(writer_rows) >= 10 and len(reader_rows) >= 10, out
    assert all(re.search(r"127\.0\.0\.\d+:\d+=\d+", m.group(6)) for m in reader_rows), out

    # SIGHUP: the YAML is rewritten, the registry reloads and retunes the readers
    sighup = next(i for i, ln in enumerate(lines) if ">> SIGHUP: readers grows" in ln)
    assert any("reload done: generation 2" in ln and "retuned readers" in ln
               for ln in lines[sighup:]), out
    after_sighup = rows(lines[sighup:], "readers")
    assert any(m.group(3) == "9" for m in after_sighup), out  # maxconn 6 -> 9

    # the new replica: its address shows up in the readers' spread after it was added
    added = next(i for i, ln in enumerate(lines) if re.search(r">> new replica \S+ on ", ln))
    new_ip = re.search(r"new replica \S+ on (\S+) ready", lines[added])
    assert new_ip, lines[added]
    assert any(re.search(rf"{re.escape(new_ip.group(1))}:\d+=[1-9]", m.group(6))
               for m in rows(lines[added:], "readers")), out

    # the failover: writes pause, then resume on the promoted replica, with a measured outage
    failover = next(i for i, ln in enumerate(lines) if ">> FAILOVER: stopping the writer" in ln)
    promoted = re.search(r">> FAILOVER: \S+ \((\S+)\) promoted", out)
    assert promoted, out
    resumed = re.search(r">> writes resumed on (\S+): write outage (\d+\.\d+) s.*recovery "
                        r"(\d+\.\d+) s after the failover started", out)
    assert resumed, out
    assert resumed.group(1) == promoted.group(1)
    assert 0 < float(resumed.group(2)) < 6 and 0 < float(resumed.group(3)) < 6
    assert any(promoted.group(1) in m.group(6) for m in rows(lines[failover:], "writer")[-2:])

    # the summary
    summary = out[out.index("== summary: 15 s of workload =="):]
    assert re.search(r"^writer\s+writes\s+[1-9]\d*\s+\d+\s+\d+\s+", summary, re.M), summary
    assert re.search(r"^readers\s+reads\s+[1-9]\d*\s+\d+\s+\d+\s+", summary, re.M), summary
    assert re.search(r"^reloads: 1 done, 0 refused", summary, re.M), summary
    assert re.search(r"^write recovery: failover at .* outage \d+\.\d+ s, recovery \d+\.\d+ s$",
                     summary, re.M), summary
    assert "result: completed" in summary and out.rstrip().endswith("stopped and cleaned up")
    assert_nothing_left(out)

    # Aurora as it is: topology discovery, the writer endpoint's DNS lagging the failover
    assert "discovery: aurora" in out and "aurora_replica_status()" in out, out
    assert re.search(r"cluster endpoint's DNS still names \S+ for 30 s", out), out
    after = re.search(r"^write outage after the promotion: (\d+\.\d+) s", summary, re.M)
    assert after and float(after.group(1)) < 5, summary
    # the table stays a table: the pools' warnings went to the log file, not between rows
    table = lines[next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("time ")):
                  next(i for i, ln in enumerate(lines) if ln.startswith("== summary"))]
    stray = [ln for ln in table if ln.strip() and not TABLE_ROW.match(ln) and ">>" not in ln
             and not ln.lstrip().startswith("time ")]
    assert stray == [], stray
    assert "WARNING" not in out and "WARNING" not in done.stderr
    logged = re.search(r"^pool warnings: (\d+) \(the pools' log: (\S+)\)$", summary, re.M)
    assert logged and int(logged.group(1)) > 0, summary
    log_file = Path(logged.group(2))
    try:
        assert "new writer" in log_file.read_text()
    finally:
        log_file.unlink(missing_ok=True)


@pytest.mark.timeout(120)
def test_demo_ctrl_c_prints_the_summary_and_cleans_up() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgregistry", "demo", "--duration", "60", "--interval", "0.5",
         "--log", os.devnull],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        head = []
        for line in proc.stdout:  # until the table has started
            head.append(line)
            if TABLE_ROW.match(line):
                break
        run_load_for(1.0)  # a moment of workload, then Ctrl-C
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(head) + rest
    assert proc.returncode == 130, f"{out}\n{err}"
    assert re.search(r"== summary: interrupted \(SIGINT\) after \d+\.\d s ==", out), out
    assert "result: interrupted" in out and out.rstrip().endswith("stopped and cleaned up")
    assert_nothing_left(out)


def write_config(path: Path, cluster, dns) -> Path:
    primary, r1, r2 = cluster.servers[:3]
    dns.set_a("writer.demo-config.test", [primary.host], ttl=1)
    dns.set_a("readers.demo-config.test", [r1.host, r2.host], ttl=1)
    path.write_text(textwrap.dedent(f"""\
        version: 1
        dns:
          nameservers: [127.0.0.1]
          port: {dns.port}
          families: [ipv4]
        defaults:
          user: postgres
          dbname: postgres
          port: {cluster.port}
          connect_timeout: 2
          application_name: pgr-demo-test
        pools:
          primary:
            host: writer.demo-config.test
            target_session_attrs: read-write
            minconn: 1
            maxconn: 4
          replicas:
            host: readers.demo-config.test
            minconn: 2
            maxconn: 4
        """))
    return path


@pytest.mark.timeout(120)
def test_demo_config_runs_on_your_own_pools(pg_cluster, dns_server, tmp_path) -> None:
    path = write_config(tmp_path / "pools.yaml", pg_cluster, dns_server)
    done = run_demo("--config", str(path), "--writer", "primary", "--reader", "replicas",
                    "--duration", "3", "--interval", "1")
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    lines = out.splitlines()
    assert f"on the pools of {path}" in out
    assert "timeline" not in out and ">>" not in out  # no events on your own servers
    table = [ln for ln in lines if re.match(r"^\s+\d+\.\ds\s+workload\s+primary\s", ln)]
    assert len(table) >= 3, out
    replicas = [ln for ln in lines if re.match(r"^\s+replicas\s+\d+/4\s", ln)]
    assert replicas and all(f"{pg_cluster.servers[1].host}:{pg_cluster.port}=" in ln
                            and f"{pg_cluster.servers[2].host}:{pg_cluster.port}=" in ln
                            for ln in replicas[1:]), out
    assert re.search(r"^primary\s+writes\s+[1-9]\d*\s+\d+\s+0\s+", out, re.M), out
    assert re.search(r"^replicas\s+reads\s+[1-9]\d*\s+\d+\s+0\s+", out, re.M), out
    assert "result: completed" in out
    # nothing made on your database, no server started
    assert not re.search(r"^\s+cluster\s", out, re.M)
    rows_ = pg_cluster.primary.execute(
        "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'pgregistry_demo%'")
    assert rows_ == [(0,)]


@pytest.mark.timeout(60)
def test_demo_config_skips_a_missing_pool(pg_cluster, dns_server, tmp_path) -> None:
    path = write_config(tmp_path / "pools.yaml", pg_cluster, dns_server)
    done = run_demo("--config", str(path), "--reader", "replicas", "--duration", "1",
                    "--interval", "0.5")  # --writer defaults to "writer": not in this file
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "no pool 'writer' in" in done.stdout and "(pools: primary, replicas): no writes" \
        in done.stdout
    assert re.search(r"^replicas\s+reads\s+[1-9]", done.stdout, re.M), done.stdout
    assert not re.search(r"^\S+\s+writes\s", done.stdout, re.M), done.stdout


def test_demo_refuses_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npools:\n  writer:\n    host: h\n    maxconnn: 3\n")
    done = run_demo("--config", str(bad), "--duration", "1")
    assert done.returncode == 1
    assert "maxconnn" in done.stderr and "did you mean 'maxconn'" in done.stderr
    done = run_demo("--duration", "5")  # too short for the timeline
    assert done.returncode == 2 and "--duration must be at least" in done.stderr
    done = run_demo("--help")
    assert done.returncode == 0 and "--config FILE" in done.stdout and "SIGHUP" in done.stdout


def test_python_m_registry_passes_options_to_the_demo() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pgregistry", "demo", "--interval", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2 and "--interval" in done.stderr and "must be more than 0" \
        in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "pgregistry", "check", "x.yaml", "--duration", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2 and "unrecognized arguments: --duration 1" in done.stderr
