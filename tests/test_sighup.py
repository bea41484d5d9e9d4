"""SIGHUP: one process handler over a stack of registries, checked before anything is built,
a warning when it cannot be handled, the original handler back at the end."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from pgregistry import ConfigError, Registry
from pgregistry.signals import sighup_handlers


def _write(path: Path, port: int, maxconn: int = 2) -> Path:
    path.write_text(f"version: 1\npools:\n  p:\n    host: 127.0.0.1\n    port: {port}\n"
                    f"    minconn: 0\n    maxconn: {maxconn}\n")
    return path


@pytest.fixture
def original_handler() -> Iterator[Any]:
    """A Python SIGHUP handler of the application's own, put back after the test."""
    calls: list[int] = []

    def handler(signum: int, frame: object) -> None:
        calls.append(signum)

    handler.calls = calls  # type: ignore[attr-defined]
    before = signal.signal(signal.SIGHUP, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGHUP, before)


def _in_thread(fn: Any) -> Any:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    return out


def test_install_sighup_true_off_the_main_thread_raises_before_building(
        tmp_path: Path, dead_port: int) -> None:
    # a missing file would be a ConfigError: the thread check comes first, nothing is built
    out = _in_thread(lambda: Registry.from_yaml(tmp_path / "missing.yaml", install_sighup=True))
    assert isinstance(out["error"], RuntimeError)
    assert "main thread" in str(out["error"]) and "reload()" in str(out["error"])
    path = _write(tmp_path / "pools.yaml", dead_port)
    threads = threading.active_count()
    out = _in_thread(lambda: Registry.from_yaml(path, install_sighup=True))
    assert isinstance(out["error"], RuntimeError) and threading.active_count() == threads


def test_default_off_the_main_thread_warns_and_leaves_sighup_alone(
        tmp_path: Path, dead_port: int, caplog: pytest.LogCaptureFixture,
        original_handler: Any) -> None:
    caplog.set_level(logging.WARNING, "pgregistry")
    path = _write(tmp_path / "pools.yaml", dead_port)
    out = _in_thread(lambda: Registry.from_yaml(path))
    reg = out["value"]
    try:
        assert signal.getsignal(signal.SIGHUP) is original_handler
        assert any("SIGHUP is not handled" in r.getMessage() and "reload()" in r.getMessage()
                   for r in caplog.records)
        reg.reload()  # the way to reload from there
    finally:
        reg.close()
    # the default never raises for the thread: a missing file is the usual ConfigError
    out = _in_thread(lambda: Registry.from_yaml(tmp_path / "missing.yaml"))
    assert isinstance(out["error"], ConfigError)


def test_two_registries_closed_in_creation_order(tmp_path: Path, dead_port: int,
                                                 original_handler: Any) -> None:
    first = Registry.from_yaml(_write(tmp_path / "a.yaml", dead_port))
    second = Registry.from_yaml(_write(tmp_path / "b.yaml", dead_port))
    try:
        assert sighup_handlers() == 2
        _write(tmp_path / "a.yaml", dead_port, maxconn=3)
        _write(tmp_path / "b.yaml", dead_port, maxconn=3)
        os.kill(os.getpid(), signal.SIGHUP)  # real signal: both reload on the supervisor
        assert wait_until(lambda: first.generation == 2 and second.generation == 2, 10)
        assert original_handler.calls == [signal.SIGHUP]  # and the app's own handler ran
        first.close()  # closed first: its handler is gone, the second's stays
        assert sighup_handlers() == 1
        _write(tmp_path / "b.yaml", dead_port, maxconn=4)
        os.kill(os.getpid(), signal.SIGHUP)
        assert wait_until(lambda: second.generation == 3, 10)
        assert first.generation == 2
        assert original_handler.calls == [signal.SIGHUP] * 2
    finally:
        first.close()
        second.close()
    assert sighup_handlers() == 0
    assert signal.getsignal(signal.SIGHUP) is original_handler  # the original is back


def test_closed_in_reverse_order_too(tmp_path: Path, dead_port: int,
                                    original_handler: Any) -> None:
    first = Registry.from_yaml(_write(tmp_path / "a.yaml", dead_port))
    second = Registry.from_yaml(_write(tmp_path / "b.yaml", dead_port))
    second.close()
    assert signal.getsignal(signal.SIGHUP) is not original_handler
    first.close()
    assert signal.getsignal(signal.SIGHUP) is original_handler


def test_closed_from_another_thread_sighup_acts_as_the_default_again(tmp_path: Path,
                                                                     dead_port: int) -> None:
    """The handler cannot be removed off the main thread; once empty it does what the
    original disposition (the default: terminate) would."""
    import subprocess
    import sys

    path = _write(tmp_path / "pools.yaml", dead_port)
    script = (
        "import os, signal, sys, threading\n"
        "from pgregistry import Registry\n"
        f"reg = Registry.from_yaml({str(path)!r})\n"
        "t = threading.Thread(target=reg.close); t.start(); t.join()\n"
        "print('closed', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "threading.Event().wait(5)\n"
        "print('survived', flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout == "closed\n" and out.returncode == -signal.SIGHUP, out.stderr
