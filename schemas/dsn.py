"""Connection strings without libpq: parse (to check them), find a password, redact.

libpq accepts two forms, both handled here:

* key=value: ``host=db port=5432 password='it''s'`` -- pairs separated by whitespace, values
  bare or single-quoted, backslash escapes in both;
* URI: ``postgresql://user:secret@host:5432/db?sslmode=require`` (``postgres://`` too).

Nothing here ever puts a password, or text that might be one, into an error message.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = [
    "DsnError",
    "REDACTED",
    "SECRET_DSN_KEYS",
    "dsn_has_password",
    "is_uri",
    "parse_dsn",
    "redact_dsn",
]

REDACTED = "***"

#: Keywords whose values are secrets wherever they appear in a connection string.
SECRET_DSN_KEYS = frozenset({"password", "sslpassword"})

_URI_PREFIXES = ("postgresql://", "postgres://")
_URI_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:ssl)?password=)[^&#]*", re.I)
_KV_SECRET = re.compile(
    r"(?P<key>(?<![A-Za-z0-9_])(?:ssl)?password\s*=\s*)(?P<value>'(?:\\.|[^'\\])*'?|(?:\\.|[^\s\\])*)",
    re.I,
)
_KEYWORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class DsnError(ValueError):
    """A connection string libpq would refuse. The message never quotes the string."""


def is_uri(dsn: str) -> bool:
    """True for the URI form (``postgresql://`` or ``postgres://``)."""
    return dsn[:13].lower().startswith(_URI_PREFIXES)


def parse_dsn(dsn: str) -> dict[str, str]:
    """The parameters of a connection string, as libpq would read them.

    Raises :class:`DsnError` for a string libpq would refuse (the message names keywords
    and positions, never values)."""
    if is_uri(dsn):
        return _parse_uri(dsn)
    return _parse_key_value(dsn)


def dsn_has_password(dsn: str) -> bool:
    """True when the connection string carries a (non-empty) password itself.

    An unparseable string counts as carrying one when it looks like it does."""
    try:
        params = parse_dsn(dsn)
    except DsnError:
        return redact_dsn(dsn) != dsn
    return bool(params.get("password"))


def redact_dsn(dsn: str) -> str:
    """``dsn`` with every password (``user:pass@`` of a URI, ``password=`` and
    ``sslpassword=`` anywhere) replaced by ``***``. Works on malformed strings too."""
    if is_uri(dsn):
        # Over-redact rather than leak: the user info ends at the last '@' before the query,
        # so a password with an unescaped '@' or '/' in it is hidden whole.
        start = dsn.index("://") + 3
        query_at = dsn.find("?", start)
        at = dsn.rfind("@", start, len(dsn) if query_at < 0 else query_at)
        if at >= 0 and ":" in dsn[start:at]:
            user = dsn[start:at].split(":", 1)[0]
            dsn = f"{dsn[:start]}{user}:{REDACTED}{dsn[at:]}"
        return _URI_QUERY_SECRET.sub(lambda m: f"{m['key']}{REDACTED}", dsn)
    return _KV_SECRET.sub(lambda m: f"{m['key']}{REDACTED}", dsn)


def _parse_key_value(dsn: str) -> dict[str, str]:
    params: dict[str, str] = {}
    pos, end = 0, len(dsn)
    count = 0
    while True:
        while pos < end and dsn[pos].isspace():
            pos += 1
        if pos >= end:
            return params
        count += 1
        match = _KEYWORD.match(dsn, pos)
        if match is None:
            raise DsnError(f"parameter #{count} does not start with a keyword "
                           "(expected key=value pairs)")
        key = match.group()
        pos = match.end()
        while pos < end and dsn[pos].isspace():
            pos += 1
        if pos >= end or dsn[pos] != "=":
            raise DsnError(f"missing '=' after {key!r} (expected key=value pairs)")
        pos += 1
        while pos < end and dsn[pos].isspace():
            pos += 1
        value: list[str] = []
        if pos < end and dsn[pos] == "'":
            pos += 1
            while True:
                if pos >= end:
                    raise DsnError(f"unterminated quoted value for {key!r}")
                char = dsn[pos]
                if char == "\\" and pos + 1 < end:
                    value.append(dsn[pos + 1])
                    pos += 2
                elif char == "'":
                    pos += 1
                    break
                else:
                    value.append(char)
                    pos += 1
        else:
            while pos < end and not dsn[pos].isspace():
                if dsn[pos] == "\\" and pos + 1 < end:
                    value.append(dsn[pos + 1])
                    pos += 2
                else:
                    value.append(dsn[pos])
                    pos += 1
        params[key] = "".join(value)


def _parse_uri(dsn: str) -> dict[str, str]:
    rest = dsn.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    params: dict[str, str] = {}
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        hosts = netloc
    if userinfo:
        user, colon, password = userinfo.partition(":")
        if user:
            params["user"] = unquote(user)
        if colon:
            params["password"] = unquote(password)
    if hosts:
        host_list: list[str] = []
        port_list: list[str] = []
        for item in hosts.split(","):
            host, port = _split_host_port(item)
            host_list.append(host)
            port_list.append(port)
        if any(host_list):
            params["host"] = ",".join(host_list)
        if any(port_list):
            params["port"] = ",".join(port_list)
    if slash and path:
        params["dbname"] = unquote(path)
    if query:
        for number, item in enumerate(query.split("&"), 1):
            if not item:
                continue
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise DsnError(f"query parameter #{number} of the URI is not key=value")
            params[unquote(key)] = unquote(value)
    return params


def _split_host_port(item: str) -> tuple[str, str]:
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket:
            raise DsnError("unterminated '[' in an IPv6 host of the URI")
        if rest and not rest.startswith(":"):
            raise DsnError("unexpected text after an IPv6 host of the URI")
        port = rest[1:]
    else:
        host, _, port = item.partition(":")
    if port and not port.isdigit():
        raise DsnError("a port in the URI is not a number")
    return unquote(host), port
