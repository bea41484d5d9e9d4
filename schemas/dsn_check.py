"""A pool's ``dsn`` checked key by key, as if each of its parameters were written as a pool key.

:func:`dsn_issues` parses the string (:mod:`.dsn`, libpq's grammar), refuses keywords libpq
does not know (with a "did you mean") and settings that belong to the pool rather than to
libpq, validates every value with the same field rules as the pool key of that name (so
``port=abc`` or ``?sslmode=bogus`` are refused as ``port: abc`` would be), and finally asks
libpq's own parser (``psycopg2.extensions.parse_dsn``) whether it agrees. libpq's message is
never passed on: it may quote the input, password included.

Each issue carries the 0-based offset in the string of the keyword (or of the trouble) so that
the loader can give a line and column. Pure: no I/O.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions
from pydantic import ValidationError

from .dsn import SECRET_DSN_KEYS, DsnError, DsnParam, parse_dsn_params
from .models import LIBPQ_PARAMETERS, LOAD_BALANCE_HOSTS_REASON, POOL_KEYWORDS, PoolDefaults

__all__ = ["DsnIssue", "dsn_issues", "similar_key"]

#: Every keyword a dsn may hold.
DSN_KEYWORDS = frozenset(LIBPQ_PARAMETERS | SECRET_DSN_KEYS)


@dataclass(frozen=True)
class DsnIssue:
    """One problem of a dsn: the parameter it is about (``None`` for the string as a whole),
    where it is (0-based offset), the pydantic error type (``None`` for our own checks), the
    message, and the value as given (the caller redacts it)."""

    key: str | None
    offset: int | None
    message: str
    error_type: str | None = None
    value: str | None = None


def similar_key(key: str, known: frozenset[str] | tuple[str, ...]) -> str | None:
    """The known key ``key`` was most likely meant to be: a close spelling, or the same
    words in another order (``ttl_min`` for ``min_ttl``)."""
    words = sorted(key.lower().split("_"))
    for candidate in sorted(known):
        if len(words) > 1 and sorted(candidate.split("_")) == words:
            return candidate
    close = difflib.get_close_matches(key.lower(), sorted(known), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown(param: DsnParam) -> DsnIssue:
    what = "URI query parameter" if param.in_query else "connection parameter"
    close = similar_key(param.key, DSN_KEYWORDS)
    if close is not None:
        return DsnIssue(param.key, param.key_offset,
                        f"unknown {what} {param.key!r} in the dsn; did you mean {close!r}?")
    # a keyword that is no near miss is shown only when it looks like one: a fragment of a
    # badly quoted password must not be echoed
    shown = f" {param.key!r}" if param.key.isidentifier() and len(param.key) <= 40 else ""
    return DsnIssue(param.key, param.key_offset,
                    f"unknown {what}{shown} in the dsn (not a libpq keyword)")


def _value_issues(param: DsnParam) -> list[DsnIssue]:
    try:
        PoolDefaults.model_validate({param.key: param.value})
    except ValidationError as exc:
        issues = []
        for error in exc.errors(include_url=False):
            message = str(error["msg"])
            if message.startswith("Value error, "):
                message = message[len("Value error, "):]
            issues.append(DsnIssue(param.key, param.key_offset,
                                   f"{param.key} in the dsn: {message}",
                                   str(error["type"]), param.value))
        return issues
    return []


def dsn_issues(dsn: str) -> list[DsnIssue]:
    """Every problem of one connection string, in string order; ``[]`` when libpq and every
    field rule accept it."""
    try:
        params = parse_dsn_params(dsn)
    except DsnError as exc:
        return [DsnIssue(None, exc.offset, f"invalid dsn: {exc}")]
    issues: list[DsnIssue] = []
    for param in params:
        if param.key == "load_balance_hosts":
            issues.append(DsnIssue(param.key, param.key_offset,
                                   f"in the dsn: {LOAD_BALANCE_HOSTS_REASON}"))
        elif param.key in POOL_KEYWORDS:
            issues.append(DsnIssue(param.key, param.key_offset,
                                   f"{param.key} is a pool setting, not a connection "
                                   "parameter: write it as a key of the pool, not in the dsn"))
        elif param.key not in DSN_KEYWORDS:
            issues.append(_unknown(param))
        elif param.key not in SECRET_DSN_KEYS:
            issues.extend(_value_issues(param))
    if issues:
        return issues
    try:
        psycopg2.extensions.parse_dsn(dsn)
    except (psycopg2.Error, ValueError):  # (ValueError: psycopg2 decoding libpq's bytes)
        return [DsnIssue(None, None, "invalid dsn: libpq cannot parse it (its message is not "
                                     "shown: it may quote the password)")]
    return []

