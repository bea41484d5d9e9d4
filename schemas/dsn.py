"""Connection strings: parse them as libpq does (to check them key by key), find a password,
show them redacted.

libpq accepts two forms, both parsed here into :class:`DsnParam` items that remember where
each key and value sit in the string:

* key=value: ``host=db port=5432 password='it\\'s'`` -- pairs separated by whitespace, values
  bare or single-quoted, a backslash escapes the next character (libpq's ``conninfo_parse``);
* URI: ``postgresql://user:secret@host:5432/db?sslmode=require`` (``postgres://`` too), every
  part percent-decoded (libpq's ``conninfo_uri_parse_options``; the user information ends at
  the first ``@`` before any ``/``).

Redaction works on the parsed structure: a password's exact span is replaced by ``***``; a
string that does not parse is never shown at all (there is no telling where its password ends).
Nothing here puts a value, or text that might be one, into an error message.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DsnError",
    "DsnParam",
    "REDACTED",
    "SECRET_DSN_KEYS",
    "UNPARSEABLE",
    "dsn_has_password",
    "is_uri",
    "parse_dsn",
    "parse_dsn_params",
    "redact_dsn",
]

REDACTED = "***"

#: What :func:`redact_dsn` shows for a string that does not parse.
UNPARSEABLE = "<not shown: the dsn cannot be parsed>"

#: Keywords whose values are secrets wherever they appear in a connection string.
SECRET_DSN_KEYS = frozenset({"password", "sslpassword"})

_URI_PREFIXES = ("postgresql://", "postgres://")
_HEX = frozenset("0123456789abcdefABCDEF")


class DsnError(ValueError):
    """A connection string libpq would refuse. The message never quotes the string;
    ``offset`` is the 0-based character where the trouble is (``None``: the whole string)."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True)
class DsnParam:
    """One parameter of a connection string: its keyword and (decoded) value, where the
    keyword starts, and the span ``[value_start, value_end)`` of the value as written."""

    key: str
    value: str
    key_offset: int
    value_start: int
    value_end: int
    in_query: bool = False  # a URI query parameter (``?key=value``)


def is_uri(dsn: str) -> bool:
    """True for the URI form (``postgresql://`` or ``postgres://``)."""
    return dsn[:13].lower().startswith(_URI_PREFIXES)


def parse_dsn_params(dsn: str) -> list[DsnParam]:
    """The parameters of a connection string in order, as libpq would read them (a later
    repeat of a keyword wins in libpq; both are listed here). Raises :class:`DsnError`."""
    if is_uri(dsn):
        return _parse_uri(dsn)
    return _parse_key_value(dsn)


def parse_dsn(dsn: str) -> dict[str, str]:
    """The parameters of a connection string as a mapping (the last of a repeated keyword
    wins, as in libpq). Raises :class:`DsnError` (the message names keywords and positions,
    never values)."""
    return {param.key: param.value for param in parse_dsn_params(dsn)}


def dsn_has_password(dsn: str) -> bool:
    """True when the connection string carries a (non-empty) password itself. An
    unparseable string counts as carrying one when the word password appears in it."""
    try:
        params = parse_dsn(dsn)
    except DsnError:
        return "password" in dsn.lower() or (is_uri(dsn) and "@" in dsn)
    return bool(params.get("password"))


def redact_dsn(dsn: str) -> str:
    """``dsn`` with the value of every secret parameter (``password``, ``sslpassword``, the
    password of a URI's user information) replaced by ``***``; :data:`UNPARSEABLE` for a
    string that does not parse."""
    try:
        params = parse_dsn_params(dsn)
    except DsnError:
        return UNPARSEABLE
    spans = sorted((p.value_start, p.value_end) for p in params
                   if p.key in SECRET_DSN_KEYS and p.value_end > p.value_start)
    out: list[str] = []
    position = 0
    for start, end in spans:
        out.append(dsn[position:start])
        out.append(REDACTED)
        position = end
    out.append(dsn[position:])
    return "".join(out)


# -- key=value -----------------------------------------------------------------------------


def _parse_key_value(dsn: str) -> list[DsnParam]:
    params: list[DsnParam] = []
    pos, end = 0, len(dsn)
    count = 0
    while True:
        while pos < end and dsn[pos].isspace():
            pos += 1
        if pos >= end:
            return params
        count += 1
        key_at = pos
        while pos < end and not dsn[pos].isspace() and dsn[pos] != "=":
            pos += 1
        key = dsn[key_at:pos]
        while pos < end and dsn[pos].isspace():
            pos += 1
        if not key:
            raise DsnError(f"parameter #{count} has no keyword before its '='", key_at)
        if pos >= end or dsn[pos] != "=":
            previous = params[-1].key if params else None
            hint = ("; a value with spaces must be single-quoted: key='a b'"
                    if previous is not None else "")
            if previous in SECRET_DSN_KEYS:
                hint = (f"; if this is part of the {previous}, single-quote it: "
                        f"{previous}='...'")
            raise DsnError(f"parameter #{count} has no '=' (expected key=value pairs){hint}",
                           key_at)
        pos += 1
        while pos < end and dsn[pos].isspace():
            pos += 1
        value: list[str] = []
        value_at = pos
        if pos < end and dsn[pos] == "'":
            pos += 1
            while True:
                if pos >= end:
                    raise DsnError(f"unterminated quoted value of parameter #{count} "
                                   "(a quote inside a quoted value is written \\')", value_at)
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
            if pos < end and dsn[pos] == "'":
                raise DsnError(f"two quotes in a row after the value of parameter #{count}: "
                               "a quote inside a quoted value is written \\' (not '')", pos)
            value_start, value_end = value_at + 1, pos - 1
        else:
            while pos < end and not dsn[pos].isspace():
                if dsn[pos] == "\\":  # escapes the next character; at the end: nothing
                    value.append(dsn[pos + 1:pos + 2])
                    pos += 2
                else:
                    value.append(dsn[pos])
                    pos += 1
            value_start, value_end = value_at, pos
        params.append(DsnParam(key, "".join(value), key_at, value_start, value_end))


# -- URI -----------------------------------------------------------------------------------


def _decode(dsn: str, start: int, end: int, what: str) -> str:
    """Percent-decode ``dsn[start:end]`` as libpq does (``%`` and two hex digits, never
    ``%00``); the error names the part, never its text."""
    raw = dsn[start:end]
    if "%" not in raw:
        return raw
    data = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char != "%":
            data.extend(char.encode("utf-8", "surrogatepass"))
            i += 1
            continue
        digits = raw[i + 1:i + 3]
        if len(digits) != 2 or not set(digits) <= _HEX:
            raise DsnError(f"invalid %-escape in the {what} of the URI (a '%' must be "
                           "followed by two hex digits; write %25 for a literal '%')",
                           start + i)
        if digits == "00":
            raise DsnError(f"%00 (a zero byte) in the {what} of the URI is not allowed",
                           start + i)
        data.append(int(digits, 16))
        i += 3
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise DsnError(f"the %-escapes in the {what} of the URI are not UTF-8",
                       start) from None


def _parse_uri(dsn: str) -> list[DsnParam]:
    params: list[DsnParam] = []
    pos = dsn.index("://") + 3
    end = len(dsn)
    # user information: up to the first '@' before any '/' (libpq's rule)
    look = pos
    while look < end and dsn[look] not in "@/":
        look += 1
    if look < end and dsn[look] == "@":
        colon = dsn.find(":", pos, look)
        user_end = colon if colon >= 0 else look
        if user_end > pos:
            params.append(DsnParam("user", _decode(dsn, pos, user_end, "user name"), pos,
                                   pos, user_end))
        if colon >= 0 and look > colon + 1:  # libpq drops an empty password
            params.append(DsnParam("password", _decode(dsn, colon + 1, look, "password"),
                                   colon + 1, colon + 1, look))
        pos = look + 1
    # hosts and ports
    hosts: list[tuple[int, int]] = []
    ports: list[tuple[int, int]] = []
    while True:
        if pos < end and dsn[pos] == "[":
            close = dsn.find("]", pos)
            if close < 0:
                raise DsnError("unterminated '[' in an IPv6 host of the URI", pos)
            if close == pos + 1:
                raise DsnError("an empty IPv6 host '[]' in the URI", pos)
            hosts.append((pos + 1, close))
            pos = close + 1
            if pos < end and dsn[pos] not in ":/?,":
                raise DsnError("unexpected text after an IPv6 host of the URI", pos)
        else:
            start = pos
            while pos < end and dsn[pos] not in ":/?,":
                pos += 1
            hosts.append((start, pos))
        if pos < end and dsn[pos] == ":":
            start = pos + 1
            pos = start
            while pos < end and dsn[pos] not in "/?,":
                pos += 1
            ports.append((start, pos))
        else:
            ports.append((pos, pos))
        if pos < end and dsn[pos] == ",":
            pos += 1
            continue
        break
    # libpq takes the first '@' as the end of the user information: a raw '@' anywhere after
    # it means the password was cut there (and its rest would be shown as host or database)
    rest_end = dsn.find("?", pos)
    if "@" in dsn[pos:end if rest_end < 0 else rest_end] or any(
            "@" in dsn[a:b] for a, b in hosts):
        raise DsnError("an '@' after the user information of the URI: a password holding '@' "
                       "(or '/', '?', '#') must be percent-encoded ('@' is %40, '/' is %2F, "
                       "'?' is %3F, '#' is %23)", pos)
    for start, stop in hosts:
        if "@" in dsn[start:stop]:
            raise DsnError("an '@' in the host part of the URI: a password holding '@' (or "
                           "'/', '?', '#') must be percent-encoded ('@' is %40, ':' is %3A, "
                           "'/' is %2F)", start)
    for start, stop in ports:
        text = dsn[start:stop]
        if text and not text.isdigit() and "@" in dsn[stop:]:
            raise DsnError("the port of the URI is not a number; if this is user:password, "
                           "percent-encode the password's '/', '?', '@' and '#' (%2F, %3F, "
                           "%40, %23)", start)
    host_values = [_decode(dsn, a, b, "host") for a, b in hosts]
    several = len(hosts) > 1  # libpq keeps the list as written, empty entries too
    if several or any(host_values):
        first, last = hosts[0][0], hosts[-1][1]
        params.append(DsnParam("host", ",".join(host_values), first, first, last))
    if several or any(b > a for a, b in ports):
        first = next((a for a, b in ports if b > a), ports[0][0])
        last = max(b for a, b in ports)
        params.append(DsnParam("port", ",".join(_decode(dsn, a, b, "port") for a, b in ports),
                               first, first, last))
    # database
    if pos < end and dsn[pos] == "/":
        start = pos + 1
        pos = start
        while pos < end and dsn[pos] != "?":
            pos += 1
        if pos > start:
            params.append(DsnParam("dbname", _decode(dsn, start, pos, "database name"), start,
                                   start, pos))
    # query parameters
    if pos < end and dsn[pos] == "?":
        pos += 1
        number = 0
        while pos <= end:
            amp = dsn.find("&", pos)
            stop = end if amp < 0 else amp
            if stop == pos and stop < end:  # an empty parameter (only a last '&' is allowed)
                raise DsnError("an empty query parameter in the URI ('&&' or '?&')", pos)
            if stop > pos:
                number += 1
                eq = dsn.find("=", pos, stop)
                if eq < 0 or eq == pos:
                    raise DsnError(f"query parameter #{number} of the URI is not key=value",
                                   pos)
                if "=" in dsn[eq + 1:stop]:
                    raise DsnError(f"a second '=' in query parameter #{number} of the URI "
                                   "(percent-encode it as %3D)", pos)
                key = _decode(dsn, pos, eq, "query")
                value = _decode(dsn, eq + 1, stop, "query")
                if key == "ssl":  # libpq's alias: ssl=true is sslmode=require
                    if value != "true":
                        raise DsnError("the URI query parameter ssl takes only 'true' "
                                       "(or use sslmode=...)", pos)
                    key, value = "sslmode", "require"
                params.append(DsnParam(key, value, pos, eq + 1, stop, in_query=True))
            if amp < 0:
                break
            pos = amp + 1
    return params
