"""schemas: the YAML file's models, loader, errors and JSON Schema. Pure: no database."""

from __future__ import annotations

import json
import logging
import os
import pickle
import textwrap
from pathlib import Path
from typing import Any

import pgregistry.schemas as schemas
import pytest
from pgregistry.schemas import (
    LIBPQ_PARAMETERS,
    LIVE_KEYWORDS,
    POOL_KEYWORDS,
    ConfigError,
    DnsConfig,
    PoolConfig,
    Problem,
    RegistryConfig,
    check_file,
    json_schema,
    load_config,
    load_config_text,
)
from pgregistry.schemas.dsn import UNPARSEABLE, dsn_has_password, parse_dsn, redact_dsn
from pgregistry.schemas.jsonschema import SCHEMA_FILE, json_schema_text
from pydantic import SecretStr, ValidationError

SENTINEL = "s3cr3t-SENTINEL-7f1e"
ENV = {"PGPASSWORD": "pw-from-env", "HOME": "/nonexistent"}

FULL = """\
version: 1
dns:                       # optional
  nameservers: [10.0.0.2]
  port: 53
  timeout: 2.0
  lifetime: 5.0
  search: []
  min_ttl: 1.0
  max_ttl: 300.0
  stale_grace: 300.0
  refresh_ahead: 0.8
  families: [ipv4, ipv6]
defaults:
  maxconn: 10
  connect_timeout: 5
  application_name: app
pools:
  writer:
    dsn: postgresql://app@mydb.cluster-abc.eu-west-1.rds.amazonaws.com:5432/app
    password_env: PGPASSWORD
    target_session_attrs: read-write
    role: writer
  readers:
    dsn: postgresql://app@mydb.cluster-ro-abc.eu-west-1.rds.amazonaws.com:5432/app
    password_env: PGPASSWORD
    minconn: 2
    maxconn: 30
    lifetime_timeout: 600
    role: reader
    fallback: writer
  analytics:
    host: analytics-1.internal,analytics-2.internal
    port: "5432,5433"
    dbname: warehouse
    user: analyst
    password_file: secrets/analytics.pw
    idle_timeout: null
    reuse: lifo
    sslmode: verify-full
    keepalives: 1
"""


def load(text: str, environ: dict[str, str] | None = None, **kw: Any) -> RegistryConfig:
    return load_config_text(textwrap.dedent(text), environ=ENV if environ is None else environ,
                            **kw)


def fail(text: str, environ: dict[str, str] | None = None, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, environ, **kw)
    return info.value


def only(err: ConfigError, path: str | None = None) -> Problem:
    """The one problem of ``err`` (at ``path`` when given)."""
    found = [p for p in err.problems if path is None or p.path == path]
    assert len(found) == 1, str(err)
    return found[0]


POOL = "pools:\n  p:\n    host: db\n"


# -- a valid file ----------------------------------------------------------------------------


@pytest.fixture
def full_file(tmp_path: Path) -> Path:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "analytics.pw").write_text("pw-from-file\n")
    path = tmp_path / "pools.yaml"
    path.write_text(FULL)
    return path


def test_full_file_loads_with_defaults_merged(full_file: Path) -> None:
    config = load_config(full_file, environ=ENV)
    assert isinstance(config, RegistryConfig)
    assert list(config.pools) == ["writer", "readers", "analytics"]
    writer, readers, analytics = (config.pools[n] for n in ("writer", "readers", "analytics"))
    # defaults merged, the pool's own keys win
    assert writer.maxconn == 10 and readers.maxconn == 30
    assert writer.connect_timeout == readers.connect_timeout == analytics.connect_timeout == 5
    assert analytics.application_name == "app"
    # ConnectionPool defaults for what nobody set
    assert writer.minconn == 1 and writer.idle_timeout == 300.0 and writer.reuse == "fifo"
    assert readers.minconn == 2 and readers.lifetime_timeout == 600.0
    assert analytics.idle_timeout is None and analytics.reuse == "lifo"
    assert analytics.port == "5432,5433" and analytics.keepalives == 1
    assert writer.role == "writer" and readers.fallback == "writer" and analytics.role == "any"
    # secrets resolved, sources kept as given
    assert writer.password is not None
    assert writer.password.get_secret_value() == "pw-from-env"
    assert writer.password_env == "PGPASSWORD"
    assert analytics.password is not None
    assert analytics.password.get_secret_value() == "pw-from-file"
    assert analytics.password_file == "secrets/analytics.pw"
    # defaults kept as given
    assert config.defaults.model_fields_set == {"maxconn", "connect_timeout", "application_name"}
    assert config.dns_settings() == {
        "nameservers": ["10.0.0.2"], "port": 53, "timeout": 2.0, "lifetime": 5.0, "search": [],
        "min_ttl": 1.0, "max_ttl": 300.0, "stale_grace": 300.0, "refresh_ahead": 0.8,
        "families": ["ipv4", "ipv6"],
    }
    assert check_file(full_file, environ=ENV) == []


def test_models_are_frozen_and_pools_read_only(full_file: Path) -> None:
    config = load_config(full_file, environ=ENV)
    with pytest.raises(ValidationError):
        config.pools["writer"].maxconn = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.pools["x"] = config.pools["writer"]  # type: ignore[index]
    assert json.loads(config.model_dump_json())["pools"]["writer"]["maxconn"] == 10


def test_minimal_and_optional_sections() -> None:
    config = load("version: 1\n")
    assert config.pools == {} and config.dns is None and config.dns_settings() is None
    assert config.defaults.model_fields_set == set()
    config = load("version: 1\ndns:\ndefaults:\npools:\n")
    assert config.pools == {} and config.dns is None
    assert load("version: 1\ndns: {}\n").dns_settings() == DnsConfig().settings()


def test_yaml_anchors_and_merge_keys() -> None:
    config = load("""\
        version: 1
        defaults: &base {host: db, maxconn: 5}
        pools:
          a:
            <<: *base
            maxconn: 7
          b: *base
        """)
    assert config.pools["a"].maxconn == 7 and config.pools["b"].maxconn == 5
    assert config.pools["a"].host == "db"


# -- unknown keys, types, ranges ---------------------------------------------------------------


def test_unknown_key_did_you_mean_with_line_and_column() -> None:
    err = fail("""\
        version: 1
        pools:
          writer:
            host: db
            maxcon: 5
        """, source="pools.yaml")
    problem = only(err)
    assert problem.path == "pools.writer.maxcon" and problem.pool == "writer"
    assert (problem.line, problem.column) == (5, 5)
    assert "did you mean 'maxconn'?" in problem.message
    assert problem.value is None
    assert str(err) == ("pools.yaml:5:5: pools.writer.maxcon: unknown key 'maxcon' for a pool; "
                        "did you mean 'maxconn'?")


@pytest.mark.parametrize("text, path, hint", [
    ("version: 1\nverison: 1\n", "verison", "did you mean 'version'?"),
    ("version: 1\ndns:\n  nameserver: [10.0.0.1]\n", "dns.nameserver", "'nameservers'"),
    ("version: 1\ndefaults:\n  sslmod: require\n", "defaults.sslmod", "'sslmode'"),
    ("version: 1\nmaxconn: 3\n", "maxconn", "under 'defaults' or under a pool"),
])
def test_unknown_keys_everywhere(text: str, path: str, hint: str) -> None:
    problem = only(fail(text))
    assert problem.path == path and hint in problem.message


def test_format_of_a_problem_line() -> None:
    err = fail("""\
        version: 1
        defaults:
          connect_timeout: 5
        pools:
          writer:
            host: db
            maxconn: 0
        """, source="pools.yaml")
    assert str(err) == ("pools.yaml:7:5: pools.writer.maxconn: Input should be greater than or "
                        "equal to 1 (value: 0)")
    problem = only(err)
    assert problem == Problem(path="pools.writer.maxconn", pool="writer", line=7, column=5,
                              value="0", message="Input should be greater than or equal to 1")


@pytest.mark.parametrize("line, path, message", [
    ("maxconn: 0", "maxconn", "greater than or equal to 1"),
    ("minconn: -1", "minconn", "greater than or equal to 0"),
    ("maxconn: abc", "maxconn", "valid integer"),
    ("maxconn: 2.5", "maxconn", "valid integer"),
    ("maxconn: true", "maxconn", "got a boolean"),
    ("timeout: -1", "timeout", "greater than or equal to 0"),
    ("idle_timeout: .nan", "idle_timeout", "finite number"),
    ("lifetime_timeout: 0", "lifetime_timeout", "greater than 0"),
    ("lifetime_jitter: 1", "lifetime_jitter", "less than 1"),
    ("rebalance_fraction: 0", "rebalance_fraction", "greater than 0"),
    ("reuse: newest", "reuse", "'fifo' or 'lifo'"),
    ("placement: roundrobin", "placement", "'least_connections' or 'random'"),
    ("role: primary", "role", "'writer', 'reader' or 'any'"),
    ("test_on_borrow: maybe", "test_on_borrow", "valid boolean"),
    ("sslmode: verify", "sslmode", "'verify-full'"),
    ("target_session_attrs: rw", "target_session_attrs", "'read-write'"),
    ("port: 70000", "port", "1 to 65535"),
    ("port: 'a,b'", "port", "1 to 65535"),
    ("keepalives: 2", "keepalives", "less than or equal to 1"),
    ("connect_timeout: -5", "connect_timeout", "greater than or equal to 0"),
    ("hostaddr: db.example.com", "hostaddr", "IP addresses"),
    ("require_auth: magic", "require_auth", "require_auth"),
    ("dbname: [a, b]", "dbname", "valid string"),
    ("password_env: 1NOT-A-NAME", "password_env", "environment variable name"),
    ("dsn: 'host=db port'", "dsn", "invalid dsn"),
    ("fallback: 'not a name'", "fallback", "does not exist"),
])
def test_bad_types_and_ranges(line: str, path: str, message: str) -> None:
    problem = only(fail(f"version: 1\npools:\n  p:\n    host: db\n    {line}\n"))
    assert problem.path == f"pools.p.{path}"
    assert message in problem.message
    # a problem inside a dsn points at its place in the string ("port" at column 19)
    assert (problem.line, problem.column) == (5, 19 if path == "dsn" else 5)


@pytest.mark.parametrize("section, path, message", [
    ("dns:\n  nameservers: [dns.example.com]\n", "dns.nameservers[0]", "not an IP address"),
    ("dns:\n  families: []\n", "dns.families", "must have at least 1 item"),
    ("dns:\n  families: [ipv5]\n", "dns.families[0]", "'ipv4' or 'ipv6'"),
    ("dns:\n  timeout: 0\n", "dns.timeout", "greater than 0"),
    ("dns:\n  refresh_ahead: 1.5\n", "dns.refresh_ahead", "less than or equal to 1"),
    ("dns:\n  min_ttl: 10\n  max_ttl: 5\n", "dns.max_ttl", "less than min_ttl"),
    ("dns: [10.0.0.1]\n", "dns", "expected a mapping, not a list"),
    ("pools: [a, b]\n", "pools", "expected a mapping, not a list"),
    ("pools:\n  a: 5\n", "pools.a", "expected a mapping, not a number"),
    ("pools:\n  9lives:\n    host: db\n", "pools.9lives", "invalid pool name"),
])
def test_bad_sections(section: str, path: str, message: str) -> None:
    problem = only(fail("version: 1\n" + section))
    assert problem.path == path and message in problem.message


def test_text_values_and_lax_conversions() -> None:
    pool = load("""\
        version: 1
        pools:
          p:
            host: db
            dbname: 2024
            port: "5433"
            keepalives: true
            replication: true
            maxconn: "12"
        """).pools["p"]
    assert pool.dbname == "2024" and pool.port == 5433 and pool.keepalives == 1
    assert pool.replication == "true" and pool.maxconn == 12


def test_timestamps_stay_text() -> None:
    assert load(POOL.replace("db", "2024-01-01").join(["version: 1\n", ""])) \
        .pools["p"].host == "2024-01-01"


# -- cross-field checks --------------------------------------------------------------------------


def test_minconn_above_maxconn() -> None:
    problem = only(fail(POOL.join(["version: 1\n", "    minconn: 20\n    maxconn: 5\n"])))
    assert problem.path == "pools.p.minconn" and problem.line == 5
    assert problem.message == "minconn (20) is more than maxconn (5)"
    assert problem.value == "20"


def test_minconn_above_maxconn_from_defaults_names_both() -> None:
    err = fail("""\
        version: 1
        defaults:
          maxconn: 3
        pools:
          writer:
            host: db
            minconn: 5
        """, source="pools.yaml")
    problem = only(err)
    assert problem.path == "pools.writer.minconn" and problem.pool == "writer"
    assert (problem.line, problem.column) == (7, 5)
    assert "minconn (5) is more than maxconn (3)" in problem.message
    assert "defaults.maxconn, line 3" in problem.message


def test_bad_value_in_defaults_reported_once_naming_the_pools() -> None:
    err = fail("""\
        version: 1
        defaults:
          maxconn: 0
        pools:
          a: {host: db}
          b: {host: db}
          c: {host: db, maxconn: 4}
        """)
    problem = only(err)
    assert problem.path == "defaults.maxconn" and (problem.line, problem.column) == (3, 3)
    assert "inherited by pools a, b" in problem.message
    # no pool takes it: reported on defaults itself
    problem = only(fail("version: 1\ndefaults:\n  maxconn: 0\n"))
    assert problem.path == "defaults.maxconn" and problem.pool is None


@pytest.mark.parametrize("extra, path, message", [
    ("    address_ban: 10\n    address_ban_max: 5\n", "pools.p.address_ban_max",
     "address_ban_max (5) is less than address_ban (10)"),
    ("    reconnect_backoff: 9\n    reconnect_backoff_max: 2\n",
     "pools.p.reconnect_backoff_max", "less than reconnect_backoff"),
    ("    port: '1,2'\n", "pools.p.port", "2 ports for 1 hosts"),
])
def test_other_cross_field_checks(extra: str, path: str, message: str) -> None:
    problem = only(fail(POOL.join(["version: 1\n", extra])))
    assert problem.path == path and message in problem.message


def test_pool_needs_somewhere_to_connect() -> None:
    problem = only(fail("version: 1\npools:\n  lost:\n    maxconn: 3\n"))
    assert problem.path == "pools.lost" and problem.pool == "lost" and problem.line == 3
    assert "set dsn or host" in problem.message
    for where in ("dsn: 'dbname=x host=db'", "hostaddr: 10.0.0.5", "service: prod"):
        assert load(f"version: 1\npools:\n  p:\n    {where}\n").pools["p"]
    assert load("version: 1\ndefaults:\n  host: db\npools:\n  p: {}\n  q:\n").pools["q"].host


def test_load_balance_hosts_is_refused_with_a_reason() -> None:
    for text, path in [
        (POOL.join(["version: 1\n", "    load_balance_hosts: random\n"]),
         "pools.p.load_balance_hosts"),
        ("version: 1\ndefaults:\n  load_balance_hosts: random\n" + POOL,
         "defaults.load_balance_hosts"),
        ("version: 1\npools:\n  p:\n    dsn: host=db load_balance_hosts=random\n", "pools.p.dsn"),
    ]:
        problem = only(fail(text))
        assert problem.path == path
        assert "load_balance_hosts is not allowed" in problem.message
        assert "placement" in problem.message
    with pytest.raises(ValidationError, match="load_balance_hosts is not allowed"):
        PoolConfig.model_validate({"host": "db", "load_balance_hosts": "random"})


def test_fallback_must_exist_and_not_be_itself() -> None:
    err = fail("""\
        version: 1
        pools:
          a: {host: db, fallback: nobody}
          b: {host: db, fallback: b}
          c: {host: db, fallback: a}
        """)
    a, b = err.problems
    assert a.path == "pools.a.fallback" and a.line == 3
    assert "fallback pool 'nobody' does not exist" in a.message
    assert b.path == "pools.b.fallback" and "cannot be its own fallback" in b.message
    with pytest.raises(ValidationError, match="own fallback"):
        RegistryConfig(version=1, pools={"x": PoolConfig(host="db", fallback="x")})


# -- ${VAR} expansion ---------------------------------------------------------------------------


def test_missing_variable_names_it_with_path_and_line() -> None:
    err = fail(POOL.join(["version: 1\n", "    dbname: ${NOPE}\n"]), environ={},
               source="pools.yaml")
    problem = only(err)
    assert problem.path == "pools.p.dbname" and problem.line == 5
    assert "'NOPE'" in problem.message and "not set" in problem.message
    assert str(err).startswith("pools.yaml:5:5: pools.p.dbname: environment variable 'NOPE'")


def test_expansion_defaults_and_dollar_escape() -> None:
    pool = load("""\
        version: 1
        pools:
          p:
            host: ${DBHOST:-fallback.example}
            port: ${PGPORT}
            user: ${EMPTY:-nobody}
            dbname: ${DB}-$$x-$y
            application_name: ${EMPTY}
        """, environ={"PGPORT": "5433", "DB": "app", "EMPTY": ""}).pools["p"]
    assert pool.host == "fallback.example"
    assert pool.port == 5433  # expansion gives text; validation converts it
    assert pool.user == "nobody"
    assert pool.dbname == "app-$x-$y"
    assert pool.application_name == ""


@pytest.mark.parametrize("value", ["${unterminated", "${1BAD}", "${}"])
def test_bad_variable_references(value: str) -> None:
    problem = only(fail(POOL.join(["version: 1\n", f"    dbname: '{value}'\n"])))
    assert problem.path == "pools.p.dbname"
    assert "$$" in problem.message


def test_variables_in_defaults_and_lists() -> None:
    config = load("""\
        version: 1
        dns:
          nameservers: ["${NS:-10.1.1.1}", "${NS2}"]
        defaults:
          host: ${HOST}
        pools:
          p: {}
        """, environ={"HOST": "db", "NS2": "10.2.2.2"})
    assert config.pools["p"].host == "db"
    assert config.dns is not None and config.dns.nameservers == ("10.1.1.1", "10.2.2.2")
    err = fail("version: 1\ndefaults:\n  host: ${HOST}\npools:\n  p: {}\n  q: {}\n", environ={})
    assert only(err).path == "defaults.host"  # once, where it is written


# -- secrets ----------------------------------------------------------------------------------


def test_password_env_missing_variable() -> None:
    err = fail(POOL.join(["version: 1\n", "    password_env: DB_SECRET\n"]), environ={})
    problem = only(err)
    assert problem.path == "pools.p.password_env" and problem.line == 5
    assert "'DB_SECRET'" in problem.message and "not set" in problem.message


def test_password_file_relative_to_the_yaml_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "pw").write_text("line one\n")
    (tmp_path / "conf" / "pools.yaml").write_text(
        POOL.join(["version: 1\n", "    password_file: pw\n"]))
    pool = load_config(tmp_path / "conf" / "pools.yaml", environ={}).pools["p"]
    assert pool.password is not None
    assert pool.password.get_secret_value() == "line one"  # one newline stripped
    assert pool.password_file == "pw"
    (tmp_path / "two").write_text("abc\n\n")
    text = POOL.join(["version: 1\n", "    password_file: two\n"])
    pool = load_config_text(text, base_dir=tmp_path, environ={}).pools["p"]
    assert pool.password is not None and pool.password.get_secret_value() == "abc\n"


def test_password_file_unreadable(tmp_path: Path) -> None:
    for name, reason in [("missing.pw", "No such file or directory"), (".", "Is a directory")]:
        text = POOL.join(["version: 1\n", f"    password_file: {name}\n"])
        problem = only(fail(text, base_dir=tmp_path))
        assert problem.path == "pools.p.password_file" and problem.line == 5
        assert f"cannot read password_file '{name}'" in problem.message
        assert reason in problem.message
    (tmp_path / "empty.pw").write_text("\n")
    problem = only(fail(POOL.join(["version: 1\n", "    password_file: empty.pw\n"]),
                        base_dir=tmp_path))
    assert "empty" in problem.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_password_file_permission_denied(tmp_path: Path) -> None:
    secret = tmp_path / "secret.pw"
    secret.write_text(SENTINEL)
    secret.chmod(0)
    problem = only(fail(POOL.join(["version: 1\n", "    password_file: secret.pw\n"]),
                        base_dir=tmp_path))
    assert "Permission denied" in problem.message and SENTINEL not in str(problem)


def test_two_secret_sources() -> None:
    problem = only(fail(POOL.join(["version: 1\n",
                                   "    password_env: PGPASSWORD\n    password_file: x\n"])))
    assert problem.path == "pools.p.password_file"
    assert "only one of password, password_env, password_file and password_provider" in (
        problem.message)
    # a pool's own source replaces the defaults' one
    config = load("version: 1\ndefaults:\n  password_file: nowhere\n"
                  + POOL + "    password_env: PGPASSWORD\n")
    assert config.pools["p"].password_file is None


def test_two_passwords_dsn_and_key() -> None:
    problem = only(fail("""\
        version: 1
        pools:
          p:
            dsn: postgresql://app:inline@db/app
            password_env: PGPASSWORD
        """))
    assert problem.path == "pools.p.password_env"
    assert "two passwords" in problem.message
    assert "inline" not in str(problem)


def test_literal_password_is_allowed_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pgregistry.schemas"):
        pool = load(POOL.join(["version: 1\n", f"    password: {SENTINEL}\n"])).pools["p"]
    assert pool.password == SecretStr(SENTINEL)
    assert "pools.p.password is a literal password" in caplog.text
    assert SENTINEL not in caplog.text


# -- the file and its YAML ------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("pools: {}\n", "missing required key 'version'"),
    ("version: 2\n", "Input should be 1"),
    ("version: one\n", "Input should be 1"),
])
def test_version(text: str, message: str) -> None:
    problem = only(fail(text))
    assert problem.path == "version" and message in problem.message
    assert problem.line == 1


def test_yaml_syntax_error_with_line_and_column() -> None:
    err = fail("version: 1\npools:\n  p: {host: db\n  q: 1\n", source="pools.yaml")
    problem = only(err)
    assert problem.path == "" and problem.message.startswith("invalid YAML")
    assert problem.line == 4 and problem.column is not None
    assert str(err).startswith("pools.yaml:4:")
    problem = only(fail("version: 1\n\tpools: {}\n"))
    assert problem.line == 2 and problem.message.startswith("invalid YAML")


def test_duplicate_keys() -> None:
    err = fail("version: 1\npools:\n  p:\n    host: a\n    host: b\n  q:\n    host: c\n")
    problem = only(err)
    assert (problem.path, problem.line, problem.column) == ("pools.p.host", 5, 5)
    assert problem.message == "duplicate key 'host' (first at line 4)"
    # in a mapping the duplicate replaced, the problem still has its line
    err = fail("version: 1\npools:\n  p:\n    host: a\n    host: b\n  p:\n    host: c\n")
    assert [(p.path, p.line) for p in err.problems] == [("", 5), ("pools.p", 6)]
    assert "duplicate key 'p' (first at line 3)" in err.problems[1].message


def test_non_string_keys() -> None:
    err = fail("version: 1\npools:\n  1: {host: db}\n  true: {host: db}\n")
    assert [p.line for p in err.problems] == [3, 4]
    assert all("keys must be strings" in p.message for p in err.problems)


@pytest.mark.parametrize("text, message", [
    ("- version: 1\n", "the top level must be a mapping"),
    ("just text\n", "the top level must be a mapping"),
    ("!!python/object:os.system {}\n", "invalid YAML"),
    ("a: &x [*x]\n", "contains it"),
    ("--- 1\n--- 2\n", "invalid YAML"),
    ("version: 1\nx: !!binary 'not base64!'\n", "invalid YAML"),
])
def test_unusable_documents(text: str, message: str) -> None:
    err = fail(text)
    assert any(message in p.message for p in err.problems), str(err)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_is_an_empty_mapping(text: str, tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    [problem] = check_file(path)
    assert problem.path == "version" and "missing required key 'version'" in problem.message


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.file == str(missing)
    assert str(info.value) == f"{missing}: no such file"
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"version: 1\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_five_mistakes_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text(textwrap.dedent("""\
        version: 1
        dns:
          port: 0
        defaults:
          maxcon: 4
        pools:
          writer:
            host: db
            sslmode: sometimes
          readers:
            host: ${READER_HOST}
            minconn: 9
            maxconn: 3
          batch:
            host: db
            fallback: nowhere
        """))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    err = info.value
    assert [(p.path, p.line) for p in err.problems] == [
        ("dns.port", 3),
        ("defaults.maxcon", 5),
        ("pools.writer.sslmode", 9),
        ("pools.readers.host", 11),
        ("pools.readers.minconn", 12),
        ("pools.batch.fallback", 16),
    ]
    assert err.pools == ["writer", "readers", "batch"]
    lines = str(err).splitlines()
    assert len(lines) == 6 and all(line.startswith(f"{path}:") for line in lines)
    assert check_file(path, environ={}) == err.problems


def test_config_error_pickles_and_has_a_short_repr() -> None:
    err = fail("version: 3\n")
    copy = pickle.loads(pickle.dumps(err))
    assert isinstance(copy, ConfigError) and copy.problems == err.problems
    assert str(copy) == str(err)
    assert repr(err) == "ConfigError('<string>', 1 problem)"
    assert isinstance(err, ValueError)


# -- secrets never shown ------------------------------------------------------------------------


def test_a_secret_is_never_shown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "pw").write_text(SENTINEL + "\n")
    env = {"PW": SENTINEL, "PGPASSWORD": SENTINEL}
    good = f"""\
        version: 1
        defaults:
          sslpassword: {SENTINEL}
        pools:
          env: {{host: db, password_env: PW}}
          file: {{host: db, password_file: pw}}
          literal: {{host: db, password: {SENTINEL}}}
          expanded: {{host: db, password: "${{PW}}"}}
          uri: {{dsn: "postgresql://app:{SENTINEL}@db/app"}}
          kv: {{dsn: "host=db password='{SENTINEL}' user=app"}}
        """
    bad = f"""\
        version: 1
        pools:
          a: {{host: db, password: [{SENTINEL}]}}
          b: {{host: db, sslpassword: {{x: {SENTINEL}}}}}
          c: {{dsn: "postgresql://app:{SENTINEL}@db/app", password_env: PW}}
          d: {{dsn: "host=db password={SENTINEL} port", maxconn: 0}}
          e: {{host: db, pasword: {SENTINEL}}}
          f: {{dsn: "postgresql://app:{SENTINEL}@db/app?sslpassword={SENTINEL}", maxconn: x}}
          g: {{host: db, password: "{SENTINEL}${{NOPE}}"}}
          h: {{host: db, password: "{SENTINEL}${{"}}
        """
    shown: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="pgregistry.schemas"):
        config = load(good, environ=env, base_dir=tmp_path)
        err = fail(bad, environ=env, base_dir=tmp_path)
    for pool in config.pools.values():
        shown += [repr(pool), str(pool), repr(pool.identity()), repr(pool.live()),
                  pool.model_dump_json()]
        assert pool.password is None or pool.password.get_secret_value() == SENTINEL
    shown += [repr(config), str(config), config.model_dump_json(), repr(config.defaults)]
    shown += [str(err), repr(err)] + [repr(p) for p in err.problems]
    shown += [p.value for p in err.problems if p.value is not None]
    shown.append(caplog.text)
    assert len(err.problems) >= 8
    for text in shown:
        assert SENTINEL not in text, text
    # what is shown instead
    assert "***" in repr(config.pools["uri"]) and "***" in repr(config.pools["kv"])
    values = {p.path: p.value for p in err.problems}
    assert values["pools.a.password"] == "***"
    assert values["pools.e.pasword"] is None


def test_validation_errors_of_direct_construction_hide_input() -> None:
    with pytest.raises(ValidationError) as info:
        PoolConfig(host="db", password=SENTINEL, dsn=f"postgresql://u:{SENTINEL}@h/d")
    assert SENTINEL not in str(info.value)


def test_dsn_helpers() -> None:
    assert redact_dsn("postgresql://app:pw@db:5432/app") == "postgresql://app:***@db:5432/app"
    # redaction works on the parsed structure: a string that does not parse is not shown
    for broken in ("postgres://app:p@ss/w@db/app", "host=db password=a b", "postgresql://u:%zz@h",
                   "host=db password='a"):
        assert redact_dsn(broken) == UNPARSEABLE
    assert redact_dsn("postgresql://app@db/app?password=pw&sslmode=require") == (
        "postgresql://app@db/app?password=***&sslmode=require")
    assert redact_dsn("host=db password='a b\\' c' user=x") == "host=db password='***' user=x"
    assert redact_dsn("host=db sslpassword = pw") == "host=db sslpassword = ***"
    assert redact_dsn("host=db user=password") == "host=db user=password"
    assert parse_dsn("host=db port = 5432 options='-c a=b'") == {
        "host": "db", "port": "5432", "options": "-c a=b"}
    assert parse_dsn("postgresql://u:p%40@h1:1,h2/db?sslmode=require") == {
        "user": "u", "password": "p@", "host": "h1,h2", "port": "1,", "dbname": "db",
        "sslmode": "require"}
    assert dsn_has_password("postgresql://u:x@h/d") and dsn_has_password("password=x")
    assert not dsn_has_password("postgresql://u@h/d") and not dsn_has_password("host=h")


# -- the model's API for the registry --------------------------------------------------------------


def _pool(**kw: Any) -> PoolConfig:
    return PoolConfig.model_validate({"host": "db", **kw})


def test_pool_kwargs() -> None:
    pool = load("""\
        version: 1
        defaults:
          connect_timeout: 3
        pools:
          other: {host: db}
          p:
            host: db
            port: 5433
            sslpassword: key-pw
            password_env: PGPASSWORD
            role: writer
            fallback: other
            maxconn: 4
            idle_timeout: null
        """).pools["p"]
    kwargs = pool.pool_kwargs()
    assert kwargs["password"] == "pw-from-env" and isinstance(kwargs["password"], str)
    assert kwargs["sslpassword"] == "key-pw"
    for absent in ("password_env", "password_file", "fallback", "name", "dns",
                   "sslmode", "dbname"):
        assert absent not in kwargs
    assert kwargs["role"] == "writer"  # the pool guards its writer
    assert kwargs["host"] == "db" and kwargs["port"] == 5433 and kwargs["connect_timeout"] == 3
    assert kwargs["maxconn"] == 4 and kwargs["idle_timeout"] is None and kwargs["minconn"] == 1
    assert kwargs["dsn"] is None
    assert set(kwargs) == (POOL_KEYWORDS - {"fallback"}) | {
        "dsn", "password", "host", "port", "sslpassword", "connect_timeout"}
    assert "password" not in _pool().pool_kwargs()


def test_identity_and_live() -> None:
    base = _pool(password=SENTINEL, maxconn=5)
    assert base.identity() == _pool(password=SENTINEL, maxconn=5).identity()
    hash(base.identity())
    for change in [dict(host="other"), dict(dsn="dbname=x"),
                   dict(sslmode="require"), dict(role="reader"), dict(autocommit=True),
                   dict(port=5433)]:
        assert _pool(**{"password": SENTINEL, "maxconn": 5, **change}).identity() \
            != base.identity(), change
    for change in [dict(maxconn=50), dict(minconn=0), dict(timeout=1), dict(fallback="x"),
                   dict(lifetime_timeout=None), dict(placement="random")]:
        changed = _pool(**{"password": SENTINEL, "maxconn": 5, **change})
        assert changed.identity() == base.identity(), change
        assert changed.live() != base.live()
    assert _pool(dsn="postgresql://u:a@h/d").identity() != _pool(
        dsn="postgresql://u:b@h/d").identity()
    assert set(base.live()) == LIVE_KEYWORDS and base.live()["maxconn"] == 5
    assert SENTINEL not in repr(base.identity())
    # the credential source is not identity: a running pool takes a new one in place
    for change in [dict(password="two"), dict(password=None, password_file="/run/pw"),
                   dict(password=None, password_provider="mod.sub:make_token")]:
        changed = _pool(**{"password": SENTINEL, "maxconn": 5, **change})
        assert changed.identity() == base.identity(), change
        assert changed.credentials() != base.credentials()
    assert base.credentials() == {"password": SENTINEL}
    assert _pool(password_file="pw.txt").credentials("/etc/app") == {
        "password_file": "/etc/app/pw.txt"}
    assert _pool(password_provider="m:f").pool_kwargs()["password_provider"] == "m:f"


def test_keyword_sets() -> None:
    assert LIVE_KEYWORDS < POOL_KEYWORDS
    # applied when a connection opens: a change needs a new pool
    assert {"autocommit", "role", "query_timeout", "discovery", "instance_host_pattern",
            "topology_refresh_interval"} == POOL_KEYWORDS - LIVE_KEYWORDS
    assert not POOL_KEYWORDS & LIBPQ_PARAMETERS
    assert set(PoolConfig.model_fields) == POOL_KEYWORDS | LIBPQ_PARAMETERS | {
        "dsn", "password", "password_env", "password_file", "password_provider"}
    assert "load_balance_hosts" not in LIBPQ_PARAMETERS
    assert {"password", "sslpassword"} == schemas.SECRET_KEYS


def test_public_api() -> None:
    assert set(schemas.__all__) >= {
        "RegistryConfig", "PoolConfig", "DnsConfig", "ConfigError", "Problem", "load_config",
        "load_config_text", "check_file", "json_schema", "POOL_KEYWORDS", "LIBPQ_PARAMETERS",
        "LIVE_KEYWORDS"}
    for name in schemas.__all__:
        assert getattr(schemas, name) is not None
    assert (Path(schemas.__file__).parent / "py.typed").exists()


def test_schemas_imports_nothing_of_ours() -> None:
    """Statically (importing pgregistry.schemas loads the package, and with it the rest):
    see tests/test_packaging.py::test_folders_depend_one_way."""
    for path in Path(schemas.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "from .." not in text and "pgregistry.pools" not in text, path


# -- JSON Schema ------------------------------------------------------------------------------


def test_shipped_json_schema_is_up_to_date() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == json_schema_text(), (
        "regenerate it: python -m schemas --write")
    assert json.loads(SCHEMA_FILE.read_text(encoding="utf-8")) == json_schema()


def test_json_schema_shape() -> None:
    schema = json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["title"] and schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"version", "dns", "defaults", "pools"}
    assert schema["required"] == ["version"]
    pools = schema["properties"]["pools"]
    assert pools["additionalProperties"] == {"$ref": "#/$defs/PoolConfig"}
    # a section written empty is null in YAML, as good as absent (check and schema agree)
    assert schema["properties"]["defaults"]["anyOf"] == [{"$ref": "#/$defs/PoolConfig"},
                                                         {"type": "null"}]
    assert schema["patternProperties"] == {"^x-": {}}  # anchor blocks
    pool = schema["$defs"]["PoolConfig"]
    assert pool["additionalProperties"] is False
    assert set(pool["properties"]) == set(PoolConfig.model_fields)
    assert all(prop.get("description") for prop in pool["properties"].values())
    assert "load_balance_hosts" not in pool["properties"]
    assert set(schema["$defs"]["DnsConfig"]["properties"]) == set(DnsConfig.model_fields)
    text = json.dumps(schema)
    for raw in ('"ge"', '"gt"', '"le"', '"lt"'):
        assert raw not in text  # limits are spelled the JSON Schema way


def test_literal_password_in_a_world_readable_file_is_warned(tmp_path, caplog) -> None:
    import logging as _logging
    import os as _os

    caplog.set_level(_logging.WARNING, logger="pgregistry.schemas")
    path = tmp_path / "pools.yaml"
    path.write_text("version: 1\npools:\n  p:\n    host: db\n    password: " + SENTINEL + "\n"
                    "  q:\n    dsn: postgresql://u:" + SENTINEL + "@db/app\n")
    _os.chmod(path, 0o644)
    load_config(path)
    assert "pools.p.password is a literal password" in caplog.text
    assert "pools.q.dsn holds a literal password" in caplog.text
    assert "readable by other users (mode 644: chmod 600)" in caplog.text
    assert SENTINEL not in caplog.text
    caplog.clear()
    _os.chmod(path, 0o600)
    load_config(path)
    assert "literal password" in caplog.text and "readable by other users" not in caplog.text
