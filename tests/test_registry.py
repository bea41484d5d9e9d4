"""The YAML registry against real servers: handles, reloads (method and SIGHUP), broken files,
fork, and the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest
from helpers import SENTINEL_ENV, SENTINEL_PASSWORD, wait_until
from pgregistry import Registry, UnknownPoolError
from pgregistry.pools import PoolError, workers
from pgregistry.schemas import ConfigError

ROOT = Path(__file__).resolve().parents[1]




class Topology:
    """Writes YAML files for the session cluster behind the loopback DNS server."""

    def __init__(self, cluster, dns, tmp_path):
        self.cluster = cluster
        self.dns = dns
        self.path = tmp_path / "pools.yaml"
        self.app = f"pgr-reg-{uuid.uuid4().hex[:8]}"
        primary, r1, r2 = cluster.servers[:3]
        dns.set_a("writer.db.test", [primary.host], ttl=1)
        dns.set_a("readers.db.test", [r1.host, r2.host], ttl=1)
        dns.set_a("readers-b.db.test", [r2.host, r1.host], ttl=1)

    def write(self, pools: str, defaults: str = "") -> Path:
        text = textwrap.dedent(f"""\
            version: 1
            dns:
              nameservers: [127.0.0.1]
              port: {self.dns.port}
            defaults:
              user: postgres
              dbname: postgres
              port: {self.cluster.port}
              connect_timeout: 2
              application_name: {self.app}
              password_env: {SENTINEL_ENV}
            """) + textwrap.indent(textwrap.dedent(defaults), "  ") + "pools:\n" + \
            textwrap.indent(textwrap.dedent(pools), "  ")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)  # atomic, like a deploy tool
        return self.path

    def backends(self) -> int:
        return sum(s.backend_count(self.app) for s in self.cluster.servers[:3])


WRITER = """\
writer:
  host: writer.db.test
  minconn: 1
  maxconn: {w}
  target_session_attrs: read-write
"""
READERS = """\
readers:
  host: {host}
  minconn: 2
  maxconn: {r}
"""
EXTRA = """\
extra:
  host: 127.0.0.11
  minconn: 1
  maxconn: 2
"""


@pytest.fixture
def topo(pg_cluster, dns_server, tmp_path):
    return Topology(pg_cluster, dns_server, tmp_path)


@pytest.fixture
def stepped_registry(topo, stepped):
    made = []

    def make(pools: str, **kw):
        topo.write(pools)
        reg = Registry.from_yaml(topo.path, supervisor=stepped, install_sighup=False, **kw)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.close()


def base_pools(w=4, r=4, host="readers.db.test", extra=False):
    return WRITER.format(w=w) + READERS.format(r=r, host=host) + (EXTRA if extra else "")


# -- get and handles ---------------------------------------------------------------------------


def test_get_conn_on_named_pools(stepped_registry, topo, stepped):
    reg = stepped_registry(base_pools())
    stepped.run_until_idle()
    with reg.get("writer").conn() as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery()")
        assert cur.fetchone() == (False,)
    with reg.get("readers").conn() as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery()")
        assert cur.fetchone() == (True,)
    assert reg.names() == ["writer", "readers"]
    s = reg.stats()
    assert s["writer"]["size"] == 1 and s["readers"]["size"] == 2
    assert s["_registry"]["generation"] == 1


def test_unknown_pool_names_the_pools_and_a_close_match(stepped_registry):
    reg = stepped_registry(base_pools())
    with pytest.raises(UnknownPoolError) as info:
        reg.get("reader")
    assert isinstance(info.value, KeyError)
    msg = str(info.value)
    assert "'reader'" in msg and "writer, readers" in msg and "did you mean 'readers'" in msg


def test_handle_getconn_putconn(stepped_registry):
    reg = stepped_registry(base_pools())
    h = reg.get("writer")
    conn = h.getconn()
    assert h.stats()["in_use"] == 1
    h.putconn(conn)
    assert h.status()["available"] == 1
    with pytest.raises(PoolError):
        h.putconn(conn)  # twice


def test_a_handle_taken_before_a_reload_serves_the_new_pool(stepped_registry, topo, pg_cluster):
    reg = stepped_registry(base_pools())
    readers = reg.get("readers")
    old_pool = readers.pool
    held = readers.getconn()  # checked out across the reload
    topo.write(base_pools(host="readers-b.db.test"))
    result = reg.reload()
    assert result.replaced == ("readers",)
    assert readers.pool is not old_pool and old_pool.closed
    with readers.conn() as c:
        assert c.info.host == "readers-b.db.test"
    assert not held.closed
    readers.putconn(held)  # goes back to the pool that gave it (which closes it: drained)
    assert held.closed
    assert reg.stats()["_registry"]["draining"] == []


def test_unchanged_pool_keeps_its_connections_across_a_reload(stepped_registry, topo, stepped):
    reg = stepped_registry(base_pools())
    stepped.run_until_idle()
    writer_pool = reg.get("writer").pool
    pids = sorted(e.backend_pid for e in writer_pool._bag.entries.values())
    topo.write(base_pools(r=6))  # readers retuned, writer untouched
    result = reg.reload()
    assert result.unchanged == ("writer",) and result.retuned == ("readers",)
    assert reg.get("writer").pool is writer_pool
    assert sorted(e.backend_pid for e in writer_pool._bag.entries.values()) == pids
    assert reg.get("readers").pool.maxconn == 6


def test_reload_outcomes(stepped_registry, topo):
    reg = stepped_registry(base_pools())
    topo.write(base_pools())
    assert reg.reload().changes_nothing  # nothing changed: nothing done
    topo.write(base_pools(extra=True))
    assert reg.reload().added == ("extra",)
    topo.write(base_pools(w=6, extra=True))
    r = reg.reload()
    assert r.retuned == ("writer",) and r.unchanged == ("readers", "extra")
    topo.write(base_pools(w=6))
    assert reg.reload().removed == ("extra",)
    topo.write(base_pools(w=6, host="readers-b.db.test"))
    assert reg.reload().replaced == ("readers",)
    assert reg.stats()["_registry"]["generation"] == 5  # the no-op did not make one


# -- broken files ------------------------------------------------------------------------------


@pytest.mark.parametrize("broken,expect", [
    ("version: 1\npools: {writer: {host: [unclosed\n", "invalid YAML"),
    (None, "maxconnn"),
    (None, "minconn"),
    (None, "NOPE_NOT_SET"),
])
def test_a_broken_file_keeps_the_old_pools_serving(stepped_registry, topo, broken, expect):
    reg = stepped_registry(base_pools())
    pools_before = {n: reg.get(n).pool for n in reg.names()}
    if expect == "maxconnn":
        topo.write(base_pools().replace("maxconn: 4", "maxconnn: 4", 1))
    elif expect == "minconn":
        topo.write(base_pools(w=0).replace("maxconn: 0", "maxconn: 1").replace(
            "minconn: 1", "minconn: 3", 1))
    elif expect == "NOPE_NOT_SET":
        topo.write(base_pools(host="${NOPE_NOT_SET}"))
    else:
        topo.path.write_text(broken)
    with pytest.raises(ConfigError) as info:
        reg.reload()
    assert expect in str(info.value) and str(topo.path) in str(info.value)
    assert {n: reg.get(n).pool for n in reg.names()} == pools_before
    with reg.get("writer").conn() as c, c.cursor() as cur:
        cur.execute("SELECT 1")
    s = reg.stats()["_registry"]
    assert s["generation"] == 1 and s["reload_errors"] == 1
    assert expect in s["last_reload_error"]


def test_cli_check_prints_every_problem(topo):
    path = topo.write("""\
        writer:
          host: writer.db.test
          maxconnn: 4
        readers:
          host: ${NOPE_NOT_SET}
          minconn: 5
          maxconn: 2
        """)
    out = subprocess.run([sys.executable, "-m", "pgregistry", "check", str(path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1
    err = out.stderr
    assert str(path) in err
    assert "pools.writer.maxconnn" in err and "did you mean 'maxconn'" in err
    assert "NOPE_NOT_SET" in err and "pools.readers" in err
    assert "minconn" in err
    assert ":16:" in err or "line 16" in err or ":17:" in err  # lines are given
    assert "Traceback" not in err and SENTINEL_PASSWORD not in out.stdout + err
    ok = topo.write(base_pools())
    out = subprocess.run([sys.executable, "-m", "pgregistry", "check", str(ok)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "ok (2 pool(s): writer, readers)" in out.stdout


def test_cli_schema_and_stats(topo):
    out = subprocess.run([sys.executable, "-m", "pgregistry", "schema"], capture_output=True,
                         text=True, cwd=ROOT, check=True)
    assert '"pools"' in out.stdout
    path = topo.write(base_pools())
    out = subprocess.run([sys.executable, "-m", "pgregistry", "stats", str(path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert SENTINEL_PASSWORD not in out.stdout + out.stderr
    assert "writer" in out.stdout and "readers" in out.stdout
    assert f"127.0.0.11:{topo.cluster.port}" in out.stdout


# -- SIGHUP under load -------------------------------------------------------------------------


def test_sighup_reloads_under_16_threads_without_a_failed_checkout(topo):
    variants = []  # (pools yaml, expected outcome)
    state = {"w": 4, "r": 4, "host": "readers.db.test", "extra": False}
    expected = []
    for i in range(50):
        kind = ("sizes", "add", "remove", "host", "same")[i % 5]
        if kind == "sizes":
            state["w"] = 4 + (i // 5) % 4
            state["r"] = 6 - (i // 5) % 3
            outcome = "retuned"
        elif kind == "add":
            state["extra"] = True
            outcome = "added"
        elif kind == "remove":
            state["extra"] = False
            outcome = "removed"
        elif kind == "host":
            state["host"] = ("readers-b.db.test" if state["host"] == "readers.db.test"
                             else "readers.db.test")
            outcome = "replaced"
        else:
            outcome = "nothing"
        variants.append(base_pools(**state))
        expected.append(outcome)

    topo.write(base_pools())
    reg = Registry.from_yaml(topo.path)  # main thread: installs the SIGHUP handler
    failures = []
    done = threading.Event()
    counts = [0] * 16

    def worker(i):
        name = "writer" if i % 2 else "readers"
        handle = reg.get(name)
        while not done.is_set():
            try:
                with handle.conn(timeout=10) as conn, conn.cursor() as cur:
                    cur.execute("SELECT 1")
                counts[i] += 1
            except Exception as exc:  # pragma: no cover - the assertion below reports it
                failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    outcomes = []
    try:
        for text, _ in zip(variants, expected, strict=True):
            before = reg.stats()["_registry"]["reloads"]
            topo.write(text)
            os.kill(os.getpid(), signal.SIGHUP)
            assert wait_until(lambda b=before: reg.stats()["_registry"]["reloads"] > b), \
                reg.stats()["_registry"]
            res = reg.stats()["_registry"]["last_reload_result"]
            got = [k for k in ("added", "removed", "replaced", "retuned") if res[k]]
            outcomes.append(got[0] if got else "nothing")
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    assert min(counts) > 0
    assert outcomes == expected
    assert reg.stats()["_registry"]["reload_errors"] == 0
    # nothing leaked: once drained, the servers hold exactly what the pools say
    assert wait_until(lambda: reg.stats()["_registry"]["draining"] == [], 15)
    sizes = sum(reg.stats()[n]["size"] for n in reg.names())
    assert wait_until(lambda: topo.backends() == sum(reg.stats()[n]["size"]
                                                     for n in reg.names()), 15), (
        topo.backends(), sizes)
    reg.close()
    assert wait_until(lambda: topo.backends() == 0, 15)


def test_sighup_with_a_broken_file_keeps_serving(topo):
    topo.write(base_pools())
    reg = Registry.from_yaml(topo.path)
    try:
        topo.path.write_text("version: 1\npools:\n  writer: {maxconn: -1}\n")
        os.kill(os.getpid(), signal.SIGHUP)
        assert wait_until(lambda: reg.stats()["_registry"]["reload_errors"] == 1)
        assert "maxconn" in reg.stats()["_registry"]["last_reload_error"]
        with reg.get("writer").conn() as c, c.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        reg.close()


def test_close_restores_the_previous_sighup_handler(topo):
    seen = []
    previous = signal.signal(signal.SIGHUP, lambda s, f: seen.append(s))
    try:
        topo.write(base_pools())
        reg = Registry.from_yaml(topo.path)
        os.kill(os.getpid(), signal.SIGHUP)
        assert seen == [signal.SIGHUP]  # chained
        reg.close()
        os.kill(os.getpid(), signal.SIGHUP)
        assert seen == [signal.SIGHUP] * 2
    finally:
        signal.signal(signal.SIGHUP, previous)


# -- fork --------------------------------------------------------------------------------------


def test_a_forked_child_gets_working_pools_and_leaves_the_parents_alone(topo, pg_cluster):
    topo.write(base_pools())
    reg = Registry.from_yaml(topo.path, install_sighup=False)
    try:
        assert wait_until(lambda: reg.stats()["writer"]["idle"] == 1)
        parent = reg.get("writer").pool
        parent_pids = sorted(e.backend_pid for e in parent._bag.entries.values())
        marker = f"child-{uuid.uuid4().hex[:8]}"
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.close(r)
                with reg.get("writer").conn(timeout=10) as c, c.cursor() as cur:
                    cur.execute(f"SELECT pg_backend_pid() /* {marker} */")
                    os.write(w, str(cur.fetchone()[0]).encode())
                reg.close()
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        _, status = os.waitpid(child, 0)
        child_pid = int(os.read(r, 50).decode())
        os.close(r)
        assert os.waitstatus_to_exitcode(status) == 0
        assert child_pid not in parent_pids
        rows = pg_cluster.primary.execute(
            "SELECT pid, query FROM pg_stat_activity WHERE pid = ANY(%s)", (parent_pids,))
        assert sorted(p for p, _ in rows) == parent_pids  # all alive
        assert not any(marker in (q or "") for _, q in rows)  # none used by the child
        with reg.get("writer").conn() as c, c.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            assert cur.fetchone()[0] in parent_pids
    finally:
        reg.close()


# -- registry without a file ------------------------------------------------------------------


def test_registry_from_a_model_and_context_manager(topo, stepped):
    from pgregistry.schemas import load_config

    config = load_config(topo.write(base_pools()))
    with Registry(config, supervisor=stepped) as reg:
        assert reg.names() == ["writer", "readers"]
        with pytest.raises(PoolError, match="not built from a file"):
            reg.reload()
    assert reg.closed
    with pytest.raises(PoolError):
        reg.get("writer").getconn()


def test_one_supervisor_thread_for_a_registry_of_pools(topo):
    before = {t.ident for t in threading.enumerate()}
    topo.write(base_pools(extra=True))
    with Registry.from_yaml(topo.path, install_sighup=False) as reg:
        assert wait_until(lambda: all(reg.stats()[n]["size"] >= 1 for n in reg.names()))
        new = [t.name for t in threading.enumerate() if t.ident not in before
               and "process_request_thread" not in t.name]  # (the test DNS server's)
        # at most the one supervisor, and the short-lived I/O workers it hands connects to
        assert new.count("pgregistry-supervisor") <= 1
        assert set(new) <= {"pgregistry-supervisor", "pgregistry-io"}
        assert new.count("pgregistry-io") <= workers.MAX_THREADS
