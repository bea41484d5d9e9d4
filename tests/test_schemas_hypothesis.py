"""schemas: whatever the text, the loader returns a RegistryConfig or raises ConfigError."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgregistry.schemas import ConfigError, DnsConfig, PoolConfig, RegistryConfig, load_config_text

ENV = {"PGPASSWORD": "pw", "X": "5", "HOST": "db", "EMPTY": ""}
SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

POOL_KEYS = sorted(PoolConfig.model_fields) + ["load_balance_hosts", "maxcon", "nameservers"]
DNS_KEYS = sorted(DnsConfig.model_fields) + ["nameserver"]
TOP_KEYS = sorted(RegistryConfig.model_fields) + ["verison"]

TOKENS = [
    "version", "pools", "defaults", "dns", "maxconn", "minconn", "host", "dsn", "port",
    "password", "password_env", "password_file", "fallback", "nameservers", "families",
    ":", ": ", " ", "  ", "\n", "\n  ", "\n    ", "- ", "{", "}", "[", "]", ", ", "&a ", "*a",
    "<<: ", "!!binary ", "!!python/object:os.system ", "!!set ", "!!omap ", "!!timestamp ",
    "!!int ", "!!float ", "!!str ", "? ", "'", '"', "# c", "${X}", "${NOPE}", "${X:-1}", "$$",
    "${", "1", "-1", "0.5", ".nan", ".inf", "null", "~", "true", "no", "2020-02-30",
    "2001-12-14t21:59:43.10-05:00", "0x1F", "0o17", "1:30", "1_000", "---", "...", "|", ">",
    "\t", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "\\", "\x00", "\ufeff", "é", "a b",
    "10.0.0.1", "postgresql://u:p@h/d", "host=db password=x", "writer", "ipv4",
]

yaml_ish = st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["${X}", "${NOPE}", "${X:-3}", "$$", "${", "10.0.0.1", "db", "writer",
                     "read-write", "fifo", "random", "ipv6", "verify-full", "pw", "missing",
                     ".", "/dev/null", "", "5432,5433", "postgresql://u:p@h/d",
                     "host=db password=x", "host=db load_balance_hosts=random", "1,2,3"]),
)


def values(keys: list[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=8)), children,
                            max_size=3),
        ),
        max_leaves=6,
    )


pool = st.one_of(
    st.none(), scalars,
    st.dictionaries(st.sampled_from(POOL_KEYS), values(POOL_KEYS), max_size=8),
)
documents = st.one_of(
    values(TOP_KEYS),
    st.dictionaries(
        st.sampled_from(TOP_KEYS),
        st.one_of(
            values(TOP_KEYS),
            st.dictionaries(st.sampled_from(DNS_KEYS), values(DNS_KEYS), max_size=5),
            st.dictionaries(st.sampled_from(POOL_KEYS), values(POOL_KEYS), max_size=6),
            st.dictionaries(st.sampled_from(["writer", "readers", "a", "bad name", "x.y"]),
                            pool, max_size=3),
        ),
        max_size=4,
    ),
    st.fixed_dictionaries(
        {"version": st.sampled_from([1, 1, "1", 2, None])},
        optional={
            "defaults": st.dictionaries(st.sampled_from(POOL_KEYS), values(POOL_KEYS),
                                        max_size=4),
            "pools": st.dictionaries(st.sampled_from(["writer", "readers", "a"]), pool,
                                     max_size=3),
            "dns": st.dictionaries(st.sampled_from(DNS_KEYS), values(DNS_KEYS), max_size=4),
        },
    ),
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hypothesis")
    (path / "pw").write_text("secret\n")
    return path


def check(text: str, base_dir: Path) -> None:
    try:
        config = load_config_text(text, base_dir=base_dir, environ=ENV)
    except ConfigError as exc:
        assert exc.problems
        assert all(problem.message for problem in exc.problems)
        assert str(exc)
        return
    assert isinstance(config, RegistryConfig)
    str(config)
    for pool_config in config.pools.values():
        pool_config.pool_kwargs()
        hash(pool_config.identity())


@SETTINGS
@given(text=st.one_of(yaml_ish, st.text(max_size=200)))
def test_any_text_loads_or_raises_config_error(text: str, base_dir: Path) -> None:
    check(text, base_dir)


@SETTINGS
@given(document=documents)
def test_any_document_loads_or_raises_config_error(document: Any, base_dir: Path) -> None:
    check(yaml.safe_dump(document, allow_unicode=True), base_dir)


def test_some_generated_documents_are_valid(base_dir: Path) -> None:
    # the strategies reach the success path too, not only errors
    text = yaml.safe_dump({"version": 1, "pools": {"a": {"host": "db", "maxconn": "${X}"}}})
    check(text, base_dir)
    assert load_config_text(text, environ=ENV).pools["a"].maxconn == 5
