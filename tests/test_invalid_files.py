"""One loader behind check, from_yaml, reload() and stats: every file of fixtures/invalid/ is
refused by all four with the same problems, each with file:line:column, and the sentinel
password (which most of them hold) appears in none of their outputs, logs or stats.

Each fixture's first line is ``# expect: <text>``: a problem must contain that text."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import SENTINEL_PASSWORD
from pgregistry import ConfigError, Registry
from pgregistry.__main__ import main

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "invalid").glob("*.yaml"))


@pytest.fixture(scope="module")
def live(pg_server: Any, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[Path, Registry]]:
    """A registry running from a valid file on the real server; each test puts an invalid
    file in its place and asks for a reload."""
    path = tmp_path_factory.mktemp("invalid") / "pools.yaml"
    path.write_text(f'version: 1\npools:\n  app: {{dsn: "{pg_server.dsn()}", minconn: 1}}\n')
    reg = Registry.from_yaml(path, install_sighup=False)
    try:
        yield path, reg
    finally:
        reg.close()


def test_the_fixture_directory_covers_the_cases() -> None:
    assert len(FIXTURES) >= 25
    for fixture in FIXTURES:
        assert fixture.read_bytes().startswith(b"# expect: "), fixture.name


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_check_from_yaml_reload_and_stats_refuse_it_alike(
        fixture: Path, live: tuple[Path, Registry], capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    path, reg = live
    caplog.set_level(logging.DEBUG, "pgregistry")
    data = fixture.read_bytes()
    expect = data.split(b"\n", 1)[0].decode()[len("# expect: "):]
    path.write_bytes(data)

    assert main(["check", str(path)]) == 1
    checked = capsys.readouterr()
    with pytest.raises(ConfigError) as built:
        Registry.from_yaml(path, install_sighup=False)
    with pytest.raises(ConfigError) as reloaded:
        reg.reload()
    recorded = reg.stats()["_registry"]["last_reload_error"]
    assert main(["stats", str(path), "--wait", "1"]) == 1
    stats_out = capsys.readouterr()

    lines = checked.err.splitlines()
    assert lines == str(built.value).splitlines() == str(reloaded.value).splitlines()
    assert lines == recorded.splitlines() == stats_out.err.splitlines()
    assert any(expect in line for line in lines), (expect, lines)
    for line in lines:
        assert re.match(rf"{re.escape(str(path))}:\d+:\d+: ", line), line
    assert reg.generation == 1 and reg.names() == ["app"]  # the running config is kept
    everything = "\n".join([checked.out, checked.err, stats_out.out, stats_out.err,
                            caplog.text, json.dumps(reg.stats(), default=str),
                            repr(built.value), repr(reloaded.value)])
    assert SENTINEL_PASSWORD not in everything


# What a JSON Schema cannot say: the inside of a dsn string, cross-field rules, environment
# variables, YAML's own reading (duplicates, YAML 1.1 numbers, syntax, encoding).
BEYOND_THE_SCHEMA = {
    "defaults_cross_field_once", "dsn_bad_port", "dsn_bad_sslmode", "dsn_host_port_lists",
    "dsn_load_balance_hosts", "dsn_misspelled_keyword", "dsn_password_sql_quoting",
    "dsn_password_unterminated_quote", "dsn_password_with_space", "dsn_pool_keyword",
    "dsn_unknown_uri_parameter", "duplicate_key", "fallback_missing", "minconn_above_maxconn",
    "hostaddr_without_host_ports",
    "missing_variable", "not_utf8", "password_leading_zero", "port_leading_zero",
    "tab_indentation", "two_passwords", "unterminated_quote", "uri_bad_percent_escape",
    "uri_raw_at_in_password", "uri_raw_slash_in_password",
}


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_the_json_schema_refuses_every_file_it_can_judge(fixture: Path) -> None:
    import jsonschema
    import yaml
    from pgregistry.schemas import json_schema

    if fixture.stem in BEYOND_THE_SCHEMA:
        return
    data = yaml.safe_load(fixture.read_text(encoding="utf-8"))
    assert not jsonschema.Draft202012Validator(json_schema()).is_valid(data)
