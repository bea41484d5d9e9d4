"""``pgregistry demo`` (``python -m pgregistry demo``): pgregistry live, against a local
cluster that behaves like Aurora.

With no arguments (``make demo``) it starts a writer and two streaming replicas on
127.0.0.11-13 (one port) with the project's test harness. The cluster publishes its topology as
Aurora does (``aurora_replica_status()``) and a loopback DNS server answers Aurora's endpoints as
Aurora's DNS does: an instance endpoint per instance (TTL 5 s), the reader endpoint a CNAME to
ONE reader per query (TTL 1 s), the cluster (writer) endpoint a CNAME that follows a failover
only 30 s late. The demo writes a YAML file for them (``discovery: aurora``) and builds the
registry from it. Writer and reader threads run a mixed workload while a plain-text table
shows, every ``--interval`` seconds, each pool's connections per address, checkouts per second
and errors. A scripted timeline (scaled to ``--duration``) then:

- rewrites the YAML (readers grow) and sends SIGHUP to the demo itself: the registry reloads;
- adds a replica: it joins the topology, the readers' connections spread onto it;
- fails the writer over (stop it, promote a replica): writes pause, then resume on the new
  writer as soon as the topology names it, while the writer endpoint's DNS still names the old
  one; the write outage after the promotion is measured.

The pools' warnings go to a log file (named in the summary), not between the table's rows. A
summary follows and everything is stopped (also on Ctrl-C, exit 130).

With ``--config FILE`` it runs the workload and the table against your own pools instead
(``--writer`` / ``--reader`` name them; writes there are ``SELECT txid_current()``, which needs
a read-write server and changes no data). ``kill -HUP`` the demo to watch a reload of your file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .demo_live import (
    LOOP_TICK,
    READER_THREADS,
    WRITER_THREADS,
    FailoverWatch,
    Interrupted,
    Output,
    Table,
    WarningCounter,
    Workload,
    format_spread,
    logs_to_file,
    no_interruptions,
    stop_signals,
)
from .registry import Registry
from .schemas import ConfigError

if TYPE_CHECKING:
    from .testing.aurora import AuroraCluster
    from .testing.dns import DnsServer

__all__ = ["main"]

# This module: the timeline, the summary, the command line (its docstring is the --help text).
# The workload, the live table and the process plumbing are in demo_live.

logger = logging.getLogger(__name__)

WRITER_DNS_LAG_S = 30.0  # the cluster endpoint follows a failover this late (Aurora: 40-60 s)
TOPOLOGY_REFRESH_S = 2.0  # the demo's topology_refresh_interval (default 30 s)
MIN_TIMELINE_DURATION = 10.0

DEMO_TABLE = "pgregistry_demo_events"
DEMO_WRITE = f"INSERT INTO {DEMO_TABLE} (worker) VALUES (%s) RETURNING host(inet_server_addr())"
DEMO_READ = f"SELECT max(id) FROM {DEMO_TABLE}"
# --config: nothing is created on the user's database; txid_current() needs a read-write server
CONFIG_WRITE = "SELECT txid_current(), host(inet_server_addr())"
CONFIG_READ = "SELECT 1"


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------


@dataclass
class Event:
    at: float  # seconds after the workload started
    phase: str
    action: Callable[[], None]


def demo_yaml(dns_port: int, pg_port: int, writer_host: str, reader_host: str,
              readers_min: int = 2, readers_max: int = 6) -> str:
    return textwrap.dedent(f"""\
        # Written by `{command_name()} demo` for its local Aurora-like cluster.
        version: 1
        dns:                          # the demo's loopback DNS server, answering as Aurora's does
          nameservers: [127.0.0.1]
          port: {dns_port}
          timeout: 0.5
          lifetime: 1.0
          families: [ipv4]
        defaults:
          user: postgres
          dbname: postgres
          port: {pg_port}
          connect_timeout: 1          # per address tried
          timeout: 5                  # a checkout waits at most this long
          application_name: pgregistry-demo
          discovery: aurora           # members from aurora_replica_status(), not from DNS
          topology_refresh_interval: {TOPOLOGY_REFRESH_S:g}  # default 30 s; short for the demo
        pools:
          writer:
            # the cluster endpoint: a CNAME to the writer that follows a failover
            # {WRITER_DNS_LAG_S:.0f} s late; the pool connects to the writer the topology names
            host: {writer_host}
            role: writer
            minconn: 2
            maxconn: 8
          readers:
            # the reader endpoint: a CNAME to ONE reader per query (TTL 1 s); the pool spreads
            # over every reader of the topology at once
            host: {reader_host}
            role: reader
            minconn: {readers_min}
            maxconn: {readers_max}
        """)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # like a deploy tool: a reload never sees half a file


def _instances(servers: Sequence[Any]) -> str:
    return ", ".join(f"{s.name} on {s.host}" for s in servers)


def from_checkout() -> bool:
    """Whether this package runs from the project's checkout (``registry/`` beside
    ``pyproject.toml``), not from an installed wheel."""
    return (Path(__file__).resolve().parent.parent / "pyproject.toml").is_file()


def command_name() -> str:
    """How a user runs the CLI here: ``python -m pgregistry`` in a checkout, else the
    installed console script ``pgregistry``."""
    return "python -m pgregistry" if from_checkout() else "pgregistry"


def install_hint(extra: str) -> str:
    if from_checkout():
        return f"pip install -e '.[{extra}]' (make demo does it)"
    return f"pip install 'pgregistry[{extra}]'"


class Demo:
    """One run: setup, the workload with the table and the timeline, the summary, cleanup."""

    def __init__(self, args: argparse.Namespace, out: Output) -> None:
        self.args = args
        self.out = out
        self.duration: float = args.duration
        self.interval: float = args.interval
        self.cluster: AuroraCluster | None = None
        self.dns: DnsServer | None = None
        self.tmpdir: Path | None = None
        self.yaml_path: Path | None = None
        self.registry: Registry | None = None
        self.workload: Workload | None = None
        self.table: Table | None = None
        self.phase = "setup"
        self.t0 = 0.0
        self.elapsed = 0.0
        self.events: list[Event] = []
        self.watch: FailoverWatch | None = None
        self.new_replica_label: str | None = None
        self.new_replica_added_at: float | None = None
        self.reloads_seen = 0
        self.reload_errors_seen = 0
        self.completed = False
        self.log_path: Path | None = None
        self.warnings: WarningCounter | None = None

    # -- setup ------------------------------------------------------------------------------

    def setup_local(self, stack: contextlib.ExitStack) -> None:
        try:
            from .testing.aurora import AuroraCluster
            from .testing.dns import DnsServer
        except ImportError as exc:
            raise SystemExit(
                f"the demo needs the project's test extra ({exc}): {install_hint('test')}"
            ) from exc

        started = time.monotonic()
        self.out.line(f"pgregistry demo: {self.duration:.0f} s of workload against a local "
                      "Aurora-like cluster (Ctrl-C stops it early)")
        dns = DnsServer()
        stack.callback(dns.stop)
        dns.start()
        self.dns = dns
        cluster = AuroraCluster(n_replicas=2, dns=dns, writer_dns_lag_s=WRITER_DNS_LAG_S)
        stack.callback(cluster.stop)  # stops every server, deletes the data
        cluster.start()
        self.cluster = cluster
        primary = cluster.primary
        primary.execute(
            f"CREATE TABLE {DEMO_TABLE} (id bigserial PRIMARY KEY, worker int NOT NULL,"
            " at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        cluster.wait_replicated()
        version = primary.execute("SELECT split_part(current_setting('server_version'), ' ', 1)")
        self.out.line(
            f"  cluster   writer {primary.name} on {primary.host}, readers "
            f"{_instances(cluster.replicas)}, port {cluster.port} (PostgreSQL "
            f"{version[0][0] if version else '?'}, data in {cluster.dir})"
        )
        self.out.line(f"  topology  aurora_replica_status() on every instance; instance "
                      f"endpoints {cluster.instance_host_pattern} (TTL 5 s)")
        self.out.line(f"  dns       {dns.host}:{dns.port}: reader endpoint "
                      f"{cluster.reader_endpoint} -> one reader per query (TTL 1 s); cluster "
                      f"endpoint {cluster.writer_endpoint} -> the writer, "
                      f"{WRITER_DNS_LAG_S:.0f} s late after a failover")

        tmpdir = Path(tempfile.mkdtemp(prefix="pgregistry-demo-"))
        stack.callback(shutil.rmtree, tmpdir, ignore_errors=True)
        self.tmpdir = tmpdir
        self.yaml_path = tmpdir / "pools.yaml"
        _write_atomically(self.yaml_path, self._yaml())
        self.out.line(f"  config    {self.yaml_path} (discovery: aurora; writer: minconn 2, "
                      "maxconn 8; readers: minconn 2, maxconn 6)")
        self._build(stack, writer="writer", reader="readers",
                    write_sql=DEMO_WRITE, read_sql=DEMO_READ)

        d = self.duration
        self.events = [
            Event(d / 6, "sighup", self.event_sighup),
            Event(d / 3, "new-replica", self.event_add_replica),
            Event(d / 2, "failover", self.event_failover),
        ]
        self.out.line(
            f"  workload  {WRITER_THREADS} writer threads (INSERT + COMMIT), "
            f"{READER_THREADS} reader threads (SELECT)"
        )
        self.out.line(
            "  timeline  " + ", ".join(f"{e.at:.0f} s {e.phase}" for e in self.events)
            + f", {d:.0f} s end (setup took {time.monotonic() - started:.1f} s)"
        )

    def setup_config(self, stack: contextlib.ExitStack) -> None:
        path = Path(self.args.config)
        self.out.line(f"pgregistry demo: {self.duration:.0f} s of workload on the pools of "
                      f"{path} (Ctrl-C stops it early; kill -HUP {os.getpid()} reloads the file)")
        self.yaml_path = path
        writer: str | None = self.args.writer
        reader: str | None = self.args.reader
        known = self._peek_pools(path)
        if writer not in known:
            self.out.line(f"  no pool {writer!r} in {path} (pools: {', '.join(known)}): "
                          "no writes")
            writer = None
        if reader not in known:
            self.out.line(f"  no pool {reader!r} in {path} (pools: {', '.join(known)}): "
                          "no reads")
            reader = None
        if writer is None and reader is None:
            raise SystemExit(f"nothing to run: name a writer and/or a reader pool of {path} "
                             "with --writer / --reader")
        self._build(stack, writer=writer, reader=reader,
                    write_sql=CONFIG_WRITE, read_sql=CONFIG_READ)
        threads = []
        if writer:
            threads.append(f"{WRITER_THREADS} writer threads on {writer!r} "
                           "(SELECT txid_current() + COMMIT)")
        if reader:
            threads.append(f"{READER_THREADS} reader threads on {reader!r} (SELECT 1)")
        self.out.line("  workload  " + ", ".join(threads))

    def _yaml(self, readers_min: int = 2, readers_max: int = 6) -> str:
        assert self.cluster is not None and self.dns is not None
        return demo_yaml(self.dns.port, self.cluster.port, self.cluster.writer_endpoint,
                         self.cluster.reader_endpoint, readers_min, readers_max)

    @staticmethod
    def _peek_pools(path: Path) -> list[str]:
        from .schemas import load_config

        return list(load_config(path).pools)

    def _build(self, stack: contextlib.ExitStack, *, writer: str | None, reader: str | None,
               write_sql: str, read_sql: str) -> None:
        assert self.yaml_path is not None
        main_thread = threading.current_thread() is threading.main_thread()
        registry = Registry.from_yaml(self.yaml_path, install_sighup=main_thread)
        stack.callback(registry.close)
        self.registry = registry
        self.workload = Workload(registry, writer=writer, reader=reader,
                                 write_sql=write_sql, read_sql=read_sql)
        stack.callback(self.workload.stop)
        self.table = Table(self.out, registry, self.workload)
        self._wait_prewarmed(5.0)

    def _wait_prewarmed(self, limit: float) -> None:
        assert self.registry is not None and self.workload is not None
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            stats = self.registry.stats()
            if all(stats[side.pool]["size"] >= stats[side.pool]["minconn"]
                   or stats[side.pool]["connect_errors"] for side in self.workload.sides()):
                return
            time.sleep(0.02)

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> None:
        """The workload, the table and the timeline until the duration is over."""
        assert self.workload is not None and self.table is not None
        assert self.registry is not None
        self.out.line()
        self.table.header()
        self.phase = "steady" if self.events else "workload"
        self.t0 = time.monotonic()
        self.out.t0 = self.t0
        self.table.prime()
        self.workload.start()
        end = self.t0 + self.duration
        next_tick = self.t0 + self.interval
        while True:
            now = time.monotonic()
            self.elapsed = now - self.t0
            if now >= end:
                break
            while self.events and self.events[0].at <= self.elapsed:
                event = self.events.pop(0)
                self.phase = event.phase
                event.action()
            self._watch()
            now = time.monotonic()
            if now >= next_tick:
                self.table.tick(now - self.t0, self.phase)
                # after a long event: no burst of lines to catch up, none half an interval apart
                next_tick = max(next_tick + self.interval, now + self.interval / 2)
            time.sleep(max(0.0, min(LOOP_TICK, next_tick - now, end - now)))
        self.elapsed = self.duration
        self.table.tick(self.duration, self.phase)
        self.completed = True

    def _watch(self) -> None:
        """Things the timeline waits for: reloads, the new replica's first connection, writes
        resuming after the failover."""
        assert self.registry is not None
        reg = self.registry.stats()["_registry"]
        if reg["reloads"] > self.reloads_seen:
            self.reloads_seen = reg["reloads"]
            result = reg["last_reload_result"] or {}
            changed = "; ".join(f"{k} {', '.join(result[k])}"
                                for k in ("added", "removed", "replaced", "retuned")
                                if result.get(k)) or "nothing changed"
            self.out.event(f"reload done: generation {result.get('generation')}, {changed} "
                           f"(unchanged: {', '.join(result.get('unchanged', [])) or '-'}; "
                           f"took {1000 * float(result.get('duration_s', 0.0)):.1f} ms)")
        if reg["reload_errors"] > self.reload_errors_seen:
            self.reload_errors_seen = reg["reload_errors"]
            self.out.event(f"reload REFUSED, the running pools stay as they are: "
                           f"{reg['last_reload_error']}")
        if self.new_replica_label is not None and self.workload and self.workload.reads:
            stats = self.registry.stats().get(self.workload.reads.pool, {})
            row = stats.get("addresses", {}).get(self.new_replica_label)
            if row and row["connections"]:
                assert self.new_replica_added_at is not None
                self.out.event(
                    f"{self.workload.reads.pool}: first connections on "
                    f"{self.new_replica_label} ({row['connections']}), "
                    f"{time.monotonic() - self.new_replica_added_at:.1f} s after it joined"
                )
                self.new_replica_label = None
        watch = self.watch
        if watch is not None and not watch.announced and watch.first_after is not None:
            watch.announced = True
            self.phase = "recovered"
            last = (f"last write on {watch.old_host} at {watch.last_before - self.t0:.2f} s"
                    if watch.last_before is not None else "no write on the old writer")
            self.out.event(
                f"writes resumed on {watch.first_after_host}: write outage "
                f"{watch.outage or 0.0:.2f} s ({last}, first on the new writer at "
                f"{watch.first_after - self.t0:.2f} s); recovery {watch.recovery or 0.0:.2f} s "
                f"after the failover started, {watch.after_promotion or 0.0:.2f} s after the "
                "promotion"
            )

    # -- the timeline -----------------------------------------------------------------------

    def event_sighup(self) -> None:
        assert self.yaml_path is not None and self.cluster and self.dns and self.registry
        _write_atomically(self.yaml_path, self._yaml(readers_min=6, readers_max=9))
        if signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, signal.SIG_IGN, None):
            # no handler (the demo is not on the main thread): SIGHUP would end the process
            self.out.event("readers grows (minconn 2 -> 6, maxconn 6 -> 9): YAML rewritten, "
                           "reload requested (no SIGHUP handler off the main thread)")
            self.registry.request_reload()
            return
        self.out.event("SIGHUP: readers grows (minconn 2 -> 6, maxconn 6 -> 9): YAML rewritten, "
                       f"kill -HUP {os.getpid()}")
        os.kill(os.getpid(), signal.SIGHUP)

    def event_add_replica(self) -> None:
        assert self.cluster is not None
        self.out.event("new replica: pg_basebackup from the writer, then start it")
        started = time.monotonic()
        server = self.cluster.add_replica()
        took = time.monotonic() - started
        self.new_replica_label = f"{server.host}:{server.port}"
        self.new_replica_added_at = time.monotonic()
        self.out.event(f"new replica {server.name} on {server.host} ready in {took:.1f} s; "
                       f"it is in the topology and the reader endpoint's rotation")

    def event_failover(self) -> None:
        assert self.cluster is not None and self.workload is not None
        old = self.cluster.primary
        self.out.event(f"FAILOVER: stopping the writer {old.name} ({old.host}), "
                       "promoting a replica")
        self.watch = self.workload.watch_failover(old.host)
        new = self.cluster.failover()
        self.watch.promoted_at = time.monotonic()
        self.watch.promoted_in = self.watch.promoted_at - self.watch.started
        self.watch.new_host = new.host
        self.out.event(
            f"FAILOVER: {new.name} ({new.host}) promoted in {self.watch.promoted_in:.2f} s, "
            f"other replicas follow it; the topology names it now, the cluster endpoint's "
            f"DNS still names {old.name} for {WRITER_DNS_LAG_S:.0f} s"
        )

    # -- the end ----------------------------------------------------------------------------

    def summary(self, interrupted: str | None) -> None:
        out = self.out
        out.line()
        if self.workload is None or self.registry is None or self.out.t0 is None:
            out.line(f"== summary: {interrupted or 'stopped'} during setup; nothing ran ==")
            return
        ran = max(self.elapsed, 1e-6)
        how = f"interrupted ({interrupted}) after {ran:.1f} s" if interrupted else \
            f"{ran:.0f} s of workload"
        out.line(f"== summary: {how} ==")
        stats = self.registry.stats()
        sides = self.workload.sides()
        width = max([len("pool"), *(len(s.pool) for s in sides)])
        out.line(f"{'pool':<{width}}  {'side':<6}  {'operations':>10}  {'ops/s':>6}  "
                 f"{'errors':>6}  final spread")
        for side in sides:
            kind = "writes" if side is self.workload.writes else "reads"
            spread = format_spread(stats[side.pool]) if side.pool in stats else "-"
            out.line(f"{side.pool:<{width}}  {kind:<6}  {side.ops:>10}  {side.ops / ran:6.0f}  "
                     f"{side.errors:>6}  {spread}")
        for side in sides:
            for kind, n in side.error_kinds.most_common():
                out.line(f"  {side.pool} errors: {n} x {kind}: {side.error_samples[kind]}")
        reg = stats["_registry"]
        last = reg["last_reload_result"]
        reload_text = f"reloads: {reg['reloads']} done, {reg['reload_errors']} refused"
        if last:
            changed = "; ".join(f"{k} {', '.join(last[k])}"
                                for k in ("added", "removed", "replaced", "retuned") if last[k])
            reload_text += f" (last: generation {last['generation']}, {changed or 'no change'})"
        out.line(reload_text)
        for name, s in stats.items():
            if name.startswith("_"):
                continue
            out.line(f"pool {name}: {s['connections_opened']} connections opened, "
                     f"{s['connect_errors']} connect errors, closed by reason "
                     f"{dict(sorted(s['closed_by_reason'].items())) or '{}'}")
        watch = self.watch
        if watch is not None:
            if watch.first_after is not None:
                before = (f"{watch.last_before - self.t0:.2f} s"
                          if watch.last_before is not None else "-")
                out.line(
                    f"write recovery: failover at {watch.started - self.t0:.2f} s "
                    f"({watch.old_host} -> {watch.new_host}, promoted in "
                    f"{watch.promoted_in or 0.0:.2f} s); last write before {before}, first "
                    f"after {watch.first_after - self.t0:.2f} s on {watch.first_after_host}: "
                    f"outage {watch.outage or 0.0:.2f} s, recovery {watch.recovery or 0.0:.2f} s"
                )
                out.line(
                    f"write outage after the promotion: {watch.after_promotion or 0.0:.2f} s "
                    f"(the writer endpoint's DNS followed only {WRITER_DNS_LAG_S:.0f} s later: "
                    "the pool found the new writer in the topology)"
                )
            elif interrupted:
                out.line(f"write recovery: writes had not resumed yet (failover at "
                         f"{watch.started - self.t0:.2f} s)")
            else:
                out.line(f"write recovery: FAILED: no write succeeded after the failover at "
                         f"{watch.started - self.t0:.2f} s")
        elif self.cluster is not None and not interrupted:
            out.line("write recovery: the failover did not run")
        if self.log_path is not None and self.warnings is not None:
            out.line(f"pool warnings: {self.warnings.count} (the pools' log: {self.log_path})")
        if interrupted:
            out.line("result: interrupted")
        elif watch is not None and watch.first_after is None:
            out.line("result: FAILED (writes did not resume after the failover)")
        else:
            out.line("result: completed")

    @property
    def succeeded(self) -> bool:
        if not self.completed:
            return False
        return self.watch is None or self.watch.first_after is not None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"{command_name()} demo", description=(__doc__ or "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=_positive, default=60.0, metavar="SECONDS",
                        help="seconds of workload; the timeline scales with it "
                             f"(default 60, at least {MIN_TIMELINE_DURATION:.0f} "
                             "without --config)")
    parser.add_argument("--interval", type=_positive, default=2.0, metavar="SECONDS",
                        help="seconds between two blocks of the table (default 2)")
    parser.add_argument("--config", metavar="FILE",
                        help="run the workload on the pools of this YAML file instead of a "
                             "local cluster (no timeline)")
    parser.add_argument("--writer", default="writer", metavar="NAME",
                        help="with --config: the pool to write to (default writer)")
    parser.add_argument("--reader", default="readers", metavar="NAME",
                        help="with --config: the pool to read from (default readers)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="the pools' INFO logs on stderr too (they always go to the log "
                             "file named in the summary)")
    parser.add_argument("--log", metavar="FILE",
                        help="where the pools' logs go (default: pgregistry-demo-<pid>.log in "
                             "the temporary directory)")
    args = parser.parse_args(argv)
    if args.config is None and args.duration < MIN_TIMELINE_DURATION:
        parser.error(f"--duration must be at least {MIN_TIMELINE_DURATION:.0f} s for the "
                     "timeline (or use --config)")
    return args



def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Output()
    log_path = Path(args.log) if args.log else (
        Path(tempfile.gettempdir()) / f"pgregistry-demo-{os.getpid()}.log")
    with logs_to_file(args.verbose, log_path) as warnings, stop_signals():
        demo = Demo(args, out)
        demo.log_path = log_path
        demo.warnings = warnings
        interrupted: str | None = None
        exit_code = 0
        try:
            with contextlib.ExitStack() as stack:
                try:
                    if args.config:
                        demo.setup_config(stack)
                    else:
                        demo.setup_local(stack)
                    demo.run()
                except (Interrupted, KeyboardInterrupt) as exc:
                    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
                    interrupted = signal.Signals(signum).name
                    exit_code = 128 + signum  # 130 for Ctrl-C, like a shell
                finally:
                    with no_interruptions():
                        if demo.workload is not None:
                            demo.workload.stop()
                        if interrupted or demo.completed:
                            demo.summary(interrupted)
                        stack.close()  # registry, DNS, cluster, temp files: in that order
        except ConfigError as exc:
            out.error(str(exc))
            return 1
        except SystemExit as exc:
            if isinstance(exc.code, str):
                out.error(f"demo: {exc.code}")
                return 1
            raise
        except Exception as exc:
            logger.debug("demo failed", exc_info=True)
            out.error(f"demo failed: {type(exc).__name__}: {exc}")
            return 1
    out.line("stopped and cleaned up")
    if interrupted:
        return exit_code
    return 0 if demo.succeeded else 1
