"""The loader's checks beyond the models: a dsn checked key by key, YAML 1.1 surprises, syntax
hints, secrets kept out of every message, and the JSON Schema agreeing with ``check``. Pure:
no database."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from helpers import SENTINEL_PASSWORD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgregistry.pools import ConnectionPool, FakeClock, Supervisor
from pgregistry.schemas import ConfigError, Problem, json_schema, load_config, load_config_text
from test_schemas_hypothesis import ENV as HYPOTHESIS_ENV
from test_schemas_hypothesis import documents

PW = SENTINEL_PASSWORD


def problems(text: str, environ: dict[str, str] | None = None) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(text), environ=environ or {})
    assert PW not in str(info.value)
    return info.value.problems


def one(text: str) -> Problem:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def pool(line: str) -> str:
    return f"version: 1\npools:\n  p:\n    {line}\n"


# -- a dsn, key by key ------------------------------------------------------------------------


@pytest.mark.parametrize("dsn, column, message", [
    (f"host=db passwrod={PW}", 19, "unknown connection parameter 'passwrod' in the dsn; did you "
                                   "mean 'password'?"),
    ("host=db port=abc", 19, "port in the dsn: port must be a number"),
    ("host=db sslmode=bogus", 19, "sslmode in the dsn: Input should be 'disable'"),
    ("host=db maxconn=5", 19, "maxconn is a pool setting, not a connection parameter"),
    ("host=db load_balance_hosts=random", 19, "load_balance_hosts is not allowed"),
    ("postgresql://u@db/app?sslmode=bogus", 33, "sslmode in the dsn"),
    ("postgresql://u@db/app?sslmdoe=require", 33, "unknown URI query parameter 'sslmdoe' in the "
                                                  "dsn; did you mean 'sslmode'?"),
    ("postgresql://u@db:abc/app", None, "port in the dsn"),
])
def test_each_dsn_key_is_checked_as_a_pool_key(dsn: str, column: int | None,
                                               message: str) -> None:
    problem = one(pool(f'dsn: "{dsn}"'))
    assert problem.path == "pools.p.dsn" and problem.line == 4
    assert message in problem.message
    if column is not None:  # the column of the key inside the string
        assert problem.column == column


def test_every_dsn_problem_is_in_the_one_list_in_file_order() -> None:
    found = problems(f"""\
        version: 1
        defaults:
          dsn: "host=db connect_timeout=x"
        pools:
          a: {{dsn: "host=db passwrod={PW}"}}
          b: {{host: db, maxconn: 0}}
          c: {{dsn: "postgresql://u@db/app?foo=1&sslmode=no"}}
        """)
    assert [(p.path, p.line) for p in found] == [
        ("defaults.dsn", 3), ("pools.a.dsn", 5), ("pools.b.maxconn", 6), ("pools.c.dsn", 7),
        ("pools.c.dsn", 7)]


@pytest.mark.parametrize("dsn, hint", [
    (f"host=db password={PW} more", "single-quote it"),
    (f"host=db password='{PW}''s x'", "written \\' (not '')"),
    (f"host=db password='{PW}", "unterminated quoted value"),
    (f"postgresql://u:{PW}@x@db/app", "percent-encoded ('@' is %40"),
    (f"postgresql://u:{PW}/x@db/app", "percent-encoded"),
    (f"postgresql://u:{PW}%zz@db/app", "invalid %-escape in the password"),
])
def test_a_broken_dsn_gets_a_hint_and_never_shows_the_password(dsn: str, hint: str) -> None:
    problem = one(pool(f'dsn: "{dsn}"'))
    assert hint in problem.message and problem.path == "pools.p.dsn"
    assert PW not in problem.format() and problem.line == 4


def test_libpq_is_asked_too_and_its_message_never_echoed() -> None:
    # our parser and libpq agree on every case above; this one (an empty keyword) is ours
    problem = one(pool('dsn: "host=db =x"'))
    assert "no keyword" in problem.message


def test_a_dsn_from_defaults_is_checked_once() -> None:
    found = problems("""\
        version: 1
        defaults: {dsn: "host=db sslmode=nope"}
        pools: {a: {}, b: {}}
        """)
    assert [p.path for p in found] == ["defaults.dsn"]


# -- YAML 1.1 ---------------------------------------------------------------------------------


def test_a_leading_zero_integer_is_an_error() -> None:
    problem = one(pool("host: db\n    port: 05432"))
    assert problem.path == "pools.p.port" and (problem.line, problem.column) == (5, 11)
    assert "05432 has a leading zero" in problem.message and "2842" in problem.message
    assert "write 5432" in problem.message
    secret = one(pool("host: db\n    password: 0123456"))
    assert "leading zero" in secret.message and "0123456" not in secret.format()


@pytest.mark.parametrize("word", ["on", "off", "yes", "no", "On"])
def test_yaml11_booleans_in_a_text_field(word: str) -> None:
    problem = one(pool(f"host: db\n    application_name: {word}"))
    assert f"{word!r} is read as a boolean" in problem.message and "quote it" in problem.message


def test_yaml11_booleans_where_a_boolean_is_meant_are_fine() -> None:
    config = load_config_text(pool("host: db\n    test_on_borrow: no\n    autocommit: on"))
    assert config.pools["p"].test_on_borrow is False and config.pools["p"].autocommit is True


def test_base_60_number() -> None:
    assert "base-60" in one(pool("host: db\n    options: 1:30")).message


# -- hints ----------------------------------------------------------------------------------


def test_tab_indentation() -> None:
    problem = one("version: 1\npools:\n  a:\n\thost: x\n")
    assert problem.line == 4 and "use spaces" in problem.message


def test_unterminated_quote_names_the_line_where_it_opened() -> None:
    problem = one('version: 1\npools:\n  a:\n    host: "db\n    port: 5432\n    user: x\n')
    assert (problem.line, problem.column) == (4, 11)
    assert "opened at line 4" in problem.message


def test_non_utf8_file_gives_a_line(tmp_path: Path) -> None:
    path = tmp_path / "pools.yaml"
    path.write_bytes(b"version: 1\npools:\n  a:\n    host: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problem = info.value.problems[0]
    assert (problem.line, problem.column) == (4, 14) and "UTF-8" in problem.message


@pytest.mark.parametrize("text, hint", [
    ("version: 1\ndns: {ttl_min: 3}\n", "did you mean 'min_ttl'?"),
    ("version: 1\npools:\n  p: {host: db, ttl_min: 3}\n", "did you mean 'min_ttl'? (a resolver"),
    ("version: 1\npools:\n  p: {host: db, conect_timeout: 3}\n", "did you mean 'connect_timeout'"),
])
def test_did_you_mean(text: str, hint: str) -> None:
    assert hint in one(text).message


def test_top_level_x_blocks_hold_anchors() -> None:
    config = load_config_text("""\
version: 1
x-common: &common
  maxconn: 3
x-unused: {port: 05432, anything: [1, 2]}   # never validated itself
pools:
  a: {<<: *common, host: db}
""")
    assert config.pools["a"].maxconn == 3


# -- secrets ------------------------------------------------------------------------------------


def test_literal_default_of_a_password_variable_is_warned(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    caplog.set_level(logging.WARNING, "pgregistry")
    load_config_text(pool(f"host: db\n    password: ${{DBPASS:-{PW}}}"), environ={})
    assert any("literal password" in r.getMessage() for r in caplog.records)
    caplog.clear()
    load_config_text(pool(f'dsn: "${{DSN:-postgresql://u:{PW}@db/app}}"'), environ={})
    assert any("literal password" in r.getMessage() for r in caplog.records)
    caplog.clear()
    load_config_text(pool("host: db\n    password: ${DBPASS}"), environ={"DBPASS": "x"})
    assert not caplog.records
    assert PW not in caplog.text


# -- the JSON Schema and check agree ---------------------------------------------------------------

# Documents whose validity the schema can express; each must be accepted by both or by neither.
AGREEMENT: list[tuple[str, bool]] = [
    ("version: 1\npools:\n", True),
    ("version: 1\npools: null\ndefaults:\ndns:\n", True),
    ("version: 1\npools:\n  p: {host: db, password: 123456789}\n", True),
    ("version: 1\npools:\n  p: {host: db, dbname: 2024, user: 7}\n", True),
    ("version: 1\nx-base: {maxconn: 3}\npools: {}\n", True),
    ("version: 1\npools:\n  p: {host: db, maxconn: 0}\n", False),
    ("version: 1\npools:\n  p: {host: db, sslmode: bogus}\n", False),
    ("version: 1\npools:\n  p: {host: db, passwrod: x}\n", False),
    ("version: 1\npools:\n  p: {host: db, password: [1]}\n", False),
    ("version: 1\npools:\n  1p: {host: db}\n", False),
    ("version: 2\n", False),
    ("version: 1\nextra: 1\n", False),
    ("version: 1\npools: [a]\n", False),
    ("version: 1\ndns: {nameservers: 10.0.0.1, port: 0}\n", False),
]


@pytest.mark.parametrize("text, valid", AGREEMENT)
def test_json_schema_and_check_agree(text: str, valid: bool) -> None:
    import yaml

    data: Any = yaml.safe_load(text)
    schema_ok = jsonschema.Draft202012Validator(json_schema()).is_valid(data)
    try:
        load_config_text(text)
        check_ok = True
    except ConfigError:
        check_ok = False
    assert (schema_ok, check_ok) == (valid, valid)


# -- what the loader accepts, the pools accept -----------------------------------------------------


_DSNS = ["host=db", "host=a,b port=1,2", "host=a,b port=5432", "host=a,b port=1,2,3",
         "host=a,b hostaddr=10.0.0.1", "hostaddr=10.0.0.1,10.0.0.2", "host=/tmp dbname=x",
         "postgresql://u@a:1,b:2/db", "postgresql://u@a:1,b/db", "postgresql://[::1]:5/db",
         "postgresql:///db?host=/tmp", "postgresql://u@db/app?target_session_attrs=standby",
         "service=x", "host=db target_session_attrs=read-write connect_timeout=0",
         "host=db port=5432,5433", "postgresql://a,b,c/db?port=1,2"]
_POOLS = st.fixed_dictionaries({}, optional={
    "dsn": st.sampled_from(_DSNS),
    "host": st.sampled_from(["db", "a,b", "10.0.0.1", "/tmp", "a,b,c"]),
    "port": st.sampled_from([5432, "5432,5433", "1,2,3", "1,"]),
    "hostaddr": st.sampled_from(["10.0.0.1", "10.0.0.1,10.0.0.2"]),
    "target_session_attrs": st.sampled_from(["any", "read-write", "prefer-standby"]),
    "minconn": st.integers(0, 3), "maxconn": st.integers(1, 4),
    "role": st.sampled_from(["writer", "reader", "any"]),
    "placement": st.sampled_from(["least_connections", "random"]),
})
targeted = st.dictionaries(st.sampled_from(["a", "b"]), _POOLS, min_size=1, max_size=2).map(
    lambda pools: {"version": 1, "pools": pools})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=st.one_of(documents, targeted))
def test_every_loaded_pool_builds(document: Any, tmp_path_factory: pytest.TempPathFactory
                                  ) -> None:
    """The registry builds pools from a loaded file with ConnectionPool(**pool_kwargs()): it
    must never refuse what the loader accepted (its refusal has no line, and came after
    check said ok). Built on a supervisor that never runs: nothing connects."""
    import yaml

    try:
        config = load_config_text(yaml.safe_dump(document), environ=HYPOTHESIS_ENV,
                                  base_dir=tmp_path_factory.getbasetemp())
    except ConfigError:
        return
    supervisor = Supervisor(clock=FakeClock(), start=False)
    for name, pool_config in config.pools.items():
        kwargs = {**pool_config.pool_kwargs(), "background_prewarm": True}
        pool = ConnectionPool(name=name, dns=config.dns_settings(), supervisor=supervisor,
                              **kwargs)
        pool.close()
