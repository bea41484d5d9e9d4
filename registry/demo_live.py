"""The demo's live parts: its output, the workload threads, the live table, and the plumbing
of a program that runs for a while (logs to a file, Ctrl-C and SIGTERM). The timeline and the
command line are in :mod:`.demo`.

Invariants: every line the demo prints goes through :class:`Output` (stdout, flushed, a closed
pipe tolerated); a workload thread never dies (each error is counted by kind, with a sample);
the pools' logs never reach the table's streams (:func:`logs_to_file`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from .registry import Registry

__all__ = [
    "FailoverWatch",
    "Interrupted",
    "Output",
    "SideCounts",
    "Table",
    "WarningCounter",
    "Workload",
    "format_spread",
    "logs_to_file",
    "no_interruptions",
    "stop_signals",
]

logger = logging.getLogger(__name__)

WRITER_THREADS = 4
READER_THREADS = 8
WRITE_PACE = 0.02  # seconds a writer thread rests between two writes
READ_PACE = 0.01
ERROR_PAUSE = 0.1  # ... and after an error, so a dead server is not hammered
LOOP_TICK = 0.05


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop the workload, show what happened so far, clean up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum



# --------------------------------------------------------------------------------------------
# Output: every line the demo shows goes through here
# --------------------------------------------------------------------------------------------


class Output:
    """Plain lines on stdout, flushed at once (readable live and in a captured log)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._closed = False
        self.t0: float | None = None  # the workload's start: event lines show time since then

    def line(self, text: str = "") -> None:
        with self._lock:
            if self._closed:
                return
            stream = self._stream or sys.stdout
            try:
                stream.write(text + "\n")  # the demo's output is the program's, not a log
                stream.flush()
            except BrokenPipeError:  # `... | head`: keep running (and cleaning up) silently
                self._closed = True
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def event(self, text: str) -> None:
        """A timeline line: elapsed time, then ``>>`` and the text."""
        elapsed = time.monotonic() - self.t0 if self.t0 is not None else 0.0
        self.line(f"{elapsed:6.1f}s  >> {text}")

    def error(self, text: str) -> None:
        with self._lock:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# The workload
# --------------------------------------------------------------------------------------------


@dataclass
class SideCounts:
    """Operations and errors of one side (writes or reads) of the workload."""

    pool: str
    ops: int = 0
    errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)


@dataclass
class FailoverWatch:
    """When writes stopped on the old writer and resumed elsewhere."""

    started: float
    old_host: str
    new_host: str | None = None
    promoted_in: float | None = None
    promoted_at: float | None = None
    last_before: float | None = None
    first_after: float | None = None
    first_after_host: str | None = None
    announced: bool = False

    @property
    def outage(self) -> float | None:
        if self.first_after is None:
            return None
        return self.first_after - (self.last_before if self.last_before is not None
                                   else self.started)

    @property
    def recovery(self) -> float | None:
        return None if self.first_after is None else self.first_after - self.started

    @property
    def after_promotion(self) -> float | None:
        """Seconds from the promotion to the first write on the new writer."""
        if self.first_after is None or self.promoted_at is None:
            return None
        return max(0.0, self.first_after - self.promoted_at)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 110 else line[:107] + "..."


class Workload:
    """Writer threads (a write then COMMIT) and reader threads (a SELECT) on two pools."""

    def __init__(
        self,
        registry: Registry,
        *,
        writer: str | None,
        reader: str | None,
        write_sql: str,
        read_sql: str,
        writers: int = WRITER_THREADS,
        readers: int = READER_THREADS,
    ) -> None:
        self.registry = registry
        self.write_sql = write_sql
        self.read_sql = read_sql
        self.writes = SideCounts(writer) if writer else None
        self.reads = SideCounts(reader) if reader else None
        self._n_writers = writers if writer else 0
        self._n_readers = readers if reader else 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_write_by_host: dict[str, float] = {}
        self.failover: FailoverWatch | None = None

    def start(self) -> None:
        for i in range(self._n_writers):
            self._spawn(f"demo-writer-{i + 1}", self._write_loop, i + 1)
        for i in range(self._n_readers):
            self._spawn(f"demo-reader-{i + 1}", self._read_loop, i + 1)

    def _spawn(self, name: str, target: Callable[[int], None], worker: int) -> None:
        thread = threading.Thread(target=target, args=(worker,), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every thread (each finishes its operation; a checkout waits at most the pool's
        timeout)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            logger.warning("workload threads still running after %.0f s: %s", timeout, alive)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # -- the threads ------------------------------------------------------------------------

    def _write_loop(self, worker: int) -> None:
        assert self.writes is not None
        handle = self.registry.get(self.writes.pool)
        while not self._stop.is_set():
            try:
                with handle.conn() as conn:
                    with conn.cursor() as cur:
                        cur.execute(self.write_sql, (worker,) if "%s" in self.write_sql else None)
                        row = cur.fetchone()
                    conn.commit()
            except Exception as exc:  # a demo thread never dies: every error is counted
                self._failed(self.writes, exc)
                self._stop.wait(ERROR_PAUSE)
                continue
            host = str(row[-1]) if row and row[-1] is not None else "local"
            self._wrote(host, time.monotonic())
            self._stop.wait(WRITE_PACE)

    def _read_loop(self, worker: int) -> None:
        assert self.reads is not None
        handle = self.registry.get(self.reads.pool)
        while not self._stop.is_set():
            try:
                with handle.conn() as conn, conn.cursor() as cur:
                    cur.execute(self.read_sql)
                    cur.fetchall()
            except Exception as exc:  # a demo thread never dies: every error is counted
                self._failed(self.reads, exc)
                self._stop.wait(ERROR_PAUSE)
                continue
            with self._lock:
                self.reads.ops += 1
            self._stop.wait(READ_PACE)

    def _wrote(self, host: str, at: float) -> None:
        with self._lock:
            assert self.writes is not None
            self.writes.ops += 1
            self.last_write_by_host[host] = at
            watch = self.failover
            if watch is None or watch.first_after is not None:
                return
            if host == watch.old_host:
                watch.last_before = at
            elif at >= watch.started:
                watch.first_after = at
                watch.first_after_host = host

    def _failed(self, side: SideCounts, exc: BaseException) -> None:
        kind = type(exc).__name__
        with self._lock:
            side.errors += 1
            side.error_kinds[kind] += 1
            side.error_samples.setdefault(kind, _first_line(exc))
        logger.info("%s: %s: %s", side.pool, kind, _first_line(exc))

    # -- what the main thread reads ---------------------------------------------------------

    def watch_failover(self, old_host: str) -> FailoverWatch:
        """Start measuring a failover away from ``old_host``."""
        with self._lock:
            watch = FailoverWatch(started=time.monotonic(), old_host=old_host,
                                  last_before=self.last_write_by_host.get(old_host))
            self.failover = watch
            return watch

    def errors(self) -> dict[str, int]:
        with self._lock:
            return {side.pool: side.errors for side in self.sides()}

    def sides(self) -> list[SideCounts]:
        return [side for side in (self.writes, self.reads) if side is not None]


# --------------------------------------------------------------------------------------------
# The live table
# --------------------------------------------------------------------------------------------


def _label_key(label: str) -> tuple[int, Any, str]:
    host = label.rsplit(":", 1)[0].strip("[]")
    try:
        return (0, ipaddress.ip_address(host), label)
    except ValueError:
        return (1, 0, label)


def format_spread(stats: dict[str, Any]) -> str:
    """``127.0.0.12:5432=3 127.0.0.13:5432=3``: connections per address; an address that left
    DNS or is banned is marked."""
    parts = []
    for label, a in sorted(stats.get("addresses", {}).items(), key=lambda kv: _label_key(kv[0])):
        if not a["active"] and not a["connections"]:
            continue
        mark = ""
        if a["banned"]:
            mark = f"[banned:{a['ban_reason'] or '?'}]"
        elif not a["active"]:
            mark = "[left-dns]"
        parts.append(f"{label}={a['connections']}{mark}")
    return " ".join(parts) or "-"


class Table:
    """One block of lines per period: time, phase, then per pool its size, checkouts per
    second, errors since the last block and the spread over addresses."""

    def __init__(self, out: Output, registry: Registry, workload: Workload) -> None:
        self.out = out
        self.registry = registry
        self.workload = workload
        self.pools = [side.pool for side in workload.sides()]
        self._width = max([len("pool"), *(len(p) for p in self.pools)])
        self._last_at: float | None = None
        self._last_checkouts: dict[str, int] = {}
        self._last_errors: dict[str, int] = {}

    def header(self) -> None:
        self.out.line(f"{'time':>7}  {'phase':<11}  {'pool':<{self._width}}  {'conns':>5}  "
                      f"{'chk/s':>6}  {'err':>4}  spread (connections per address)")

    def prime(self) -> None:
        """Start counting from now (no line)."""
        self._last_at = time.monotonic()
        stats = self.registry.stats()
        self._last_checkouts = {p: stats[p]["checkouts"] for p in self.pools if p in stats}
        self._last_errors = self.workload.errors()

    def tick(self, elapsed: float, phase: str) -> None:
        now = time.monotonic()
        dt = max(now - (self._last_at or now), 1e-6)
        stats = self.registry.stats()
        errors = self.workload.errors()
        for i, pool in enumerate(self.pools):
            s = stats.get(pool)
            lead = f"{elapsed:6.1f}s  {phase:<11}" if i == 0 else " " * 20
            if s is None:
                self.out.line(f"{lead}  {pool:<{self._width}}  (not in the registry any more)")
                continue
            checkouts = int(s["checkouts"])
            before = self._last_checkouts.get(pool, 0)
            delta = checkouts - before if checkouts >= before else checkouts  # a new pool
            self._last_checkouts[pool] = checkouts
            new_errors = errors.get(pool, 0) - self._last_errors.get(pool, 0)
            size = f"{s['size']}/{s['maxconn']}"
            self.out.line(f"{lead}  {pool:<{self._width}}  {size:>5}  {delta / dt:6.0f}  "
                          f"{new_errors:4d}  {format_spread(s)}")
        self._last_errors = errors
        self._last_at = now


class WarningCounter(logging.Handler):
    """Counts the warnings the pools logged during the run (for the summary)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


@contextlib.contextmanager
def logs_to_file(verbose: bool, log_path: Path) -> Iterator[WarningCounter]:
    """The pools' logs (INFO and up) go to ``log_path``, never between the table's rows; with
    ``verbose`` also on stderr."""
    root = logging.getLogger()
    lib = logging.getLogger("pgregistry")
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(log_path, encoding="utf-8", delay=True)
    file_handler.setFormatter(fmt)
    counting = WarningCounter()
    handlers: list[logging.Handler] = [file_handler, counting]
    if verbose:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(fmt)
        handlers.append(stderr)
    saved = [(lib, lib.level, lib.propagate), (root, root.level, root.propagate)]
    lib.setLevel(logging.INFO)
    lib.propagate = False  # the table owns stdout and stderr
    for handler in handlers:
        lib.addHandler(handler)
    try:
        yield counting
    finally:
        for handler in handlers:
            lib.removeHandler(handler)
        file_handler.close()
        for lg, level, propagate in saved:
            lg.setLevel(level)
            lg.propagate = propagate


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM (and SIGINT, as always) end the run like Ctrl-C: summary, then cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def no_interruptions() -> Iterator[None]:
    """While stopping and cleaning up, a second Ctrl-C must not leave servers behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
