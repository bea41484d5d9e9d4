"""The reload log lists only the settings that changed (secrets only as "changed")."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import SENTINEL_PASSWORD
from pgregistry import Registry
from pgregistry.reload import plan_reload
from pgregistry.schemas import load_config_text


def test_plan_names_each_changed_setting() -> None:
    before = load_config_text("version: 1\npools:\n  a: {host: db, maxconn: 3}\n"
                              "  b: {host: db}\n  c: {host: db}\n")
    after = load_config_text("version: 1\ndns: {port: 5353}\npools:\n"
                             f"  a: {{host: db2, maxconn: 4, password: {SENTINEL_PASSWORD}}}\n"
                             "  b: {host: db, minconn: 0}\n  c: {host: db}\n  d: {host: x}\n")
    summary = plan_reload(before, after).summary()
    assert summary == ("added d; replaced a (maxconn 3 -> 4, password changed, host db -> db2); "
                       "retuned b (minconn 1 -> 0); dns (port 53 -> 5353)")


def test_reload_log_lists_only_what_changed(tmp_path: Path, dead_port: int,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "pools.yaml"
    text = ("version: 1\npools:\n  p: {{host: 127.0.0.1, port: {port}, minconn: 0, "
            "maxconn: {maxconn}, password: {pw}}}\n  q: {{host: 127.0.0.1, port: {port}, "
            "minconn: 0}}\n")
    path.write_text(text.format(port=dead_port, maxconn=2, pw=SENTINEL_PASSWORD))
    with Registry.from_yaml(path, install_sighup=False) as reg:
        caplog.set_level(logging.INFO, "pgregistry")
        path.write_text(text.format(port=dead_port, maxconn=5, pw=SENTINEL_PASSWORD))
        reg.reload()
    lines = [r.getMessage() for r in caplog.records if "reload to generation" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith(": retuned p (maxconn 2 -> 5)"), lines
    assert SENTINEL_PASSWORD not in caplog.text
