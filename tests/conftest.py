"""Test configuration: the real-server fixtures come from the harness plugin; pool fixtures
from pool_fixtures. This file also proves that secrets never leak: every pool of the suite
carries a sentinel password, everything the pools log (at DEBUG) goes to a file for the
session, and the run fails if the sentinel shows up there or in any test's output, captured
log or failure text."""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path

import pytest
from helpers import SENTINEL_ENV, SENTINEL_PASSWORD

pytest_plugins = ["pgregistry.testing.plugin", "pool_fixtures", "reliability"]

os.environ[SENTINEL_ENV] = SENTINEL_PASSWORD  # for password_env in the suite's YAML files

_LOGGERS = ("pgregistry",)
_leaks: list[str] = []
_log_handler: logging.StreamHandler[io.TextIOWrapper] | None = None
_log_path: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _log_handler, _log_path
    fd, name = tempfile.mkstemp(prefix="pgregistry-suite-", suffix=".log")
    os.close(fd)
    _log_path = Path(name)
    # An unbuffered stream: a buffered file's internal lock, held by a thread writing at the
    # moment a test forks, would stay locked in the child and hang its first log line.
    stream = io.TextIOWrapper(io.FileIO(_log_path, "a"), encoding="utf-8", write_through=True)
    _log_handler = logging.StreamHandler(stream)
    _log_handler.setLevel(logging.DEBUG)
    _log_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(_log_handler)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for what, text in (("failure", report.longreprtext), ("stdout", report.capstdout),
                       ("stderr", report.capstderr), ("log", report.caplog)):
        if SENTINEL_PASSWORD in (text or ""):
            _leaks.append(f"{report.nodeid} ({report.when}, {what})")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _log_handler is not None and _log_path is not None:
        _log_handler.flush()
        for name in _LOGGERS:
            logging.getLogger(name).removeHandler(_log_handler)
        _log_handler.close()
        _log_handler.stream.close()
        text = _log_path.read_text(encoding="utf-8", errors="replace")
        lines = [ln for ln in text.splitlines() if SENTINEL_PASSWORD in ln]
        _leaks.extend(f"session log: {ln[:200]}" for ln in lines[:10])
        _log_path.unlink(missing_ok=True)
    if _leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "SECRET LEAK: the sentinel password was found", red=True)
            for leak in _leaks:
                reporter.write_line(leak)
        session.exitstatus = 1
