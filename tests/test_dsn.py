"""The dsn parser reads connection strings as libpq does: whatever it accepts (with libpq's
keywords), libpq's own parser (``psycopg2.extensions.parse_dsn``) accepts with the same
parameters. Strings are drawn from the characters that matter (quotes, backslashes, spaces,
``=``, ``@``, ``:``, ``/``, ``%``, ``?``, ``&``, ``,``, brackets)."""

from __future__ import annotations

import psycopg2
import psycopg2.extensions
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pgregistry.schemas.dsn import DsnError, parse_dsn, redact_dsn
from pgregistry.schemas.dsn_check import DSN_KEYWORDS

SETTINGS = settings(max_examples=400, deadline=None)
KEYS = st.sampled_from(["host", "port", "dbname", "user", "password", "application_name",
                        "options"])
KV_VALUE = st.text(alphabet=st.sampled_from(list("ab1 '\\=@:/%?&#\t")), max_size=8)
URI_PART = st.text(alphabet=st.sampled_from(list("ab1:@/%?&=,[]#2f")), max_size=10)


def _libpq(dsn: str) -> dict[str, str] | None:
    try:
        return dict(psycopg2.extensions.parse_dsn(dsn))
    except (psycopg2.Error, ValueError):
        return None


def _ours(dsn: str) -> dict[str, str] | None:
    try:
        return parse_dsn(dsn)
    except DsnError:
        return None


def _agree(dsn: str) -> None:
    ours = _ours(dsn)
    if ours is not None and set(ours) <= DSN_KEYWORDS:
        assert _libpq(dsn) == ours, dsn
        # redaction works on the same structure: every password value becomes ***
        redacted = _ours(redact_dsn(dsn))
        if ours.get("password") and redacted is not None:
            assert redacted.get("password") == "***", dsn


@SETTINGS
@given(st.lists(st.tuples(KEYS, KV_VALUE), max_size=4), st.sampled_from(["", " ", "\t"]))
def test_key_value_strings_parse_as_libpq_reads_them(pairs: list[tuple[str, str]],
                                                    pad: str) -> None:
    _agree(pad + " ".join(f"{key}={value}" for key, value in pairs) + pad)


@SETTINGS
@given(URI_PART, URI_PART, URI_PART)
@example("h", "?&", "")  # found by this test: an empty parameter is refused (a last '&' is not)
@example("h", "?sslmode=require", "&")
def test_uris_parse_as_libpq_reads_them(a: str, b: str, c: str) -> None:
    _agree(f"postgresql://{a}{b}{c}")
