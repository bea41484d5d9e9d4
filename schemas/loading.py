"""Load the YAML file into a :class:`RegistryConfig`, or raise one :class:`ConfigError` with
every problem in it.

The steps, each collecting problems rather than stopping at the first:

1. read the file (a missing file is an error; an empty one is an empty mapping; a file that
   is not UTF-8 gets the line and column of its first bad byte);
2. safe YAML with the line and column of every key and scalar value (duplicate and non-string
   keys refused; tabs and unterminated quotes explained); top-level ``x-...`` keys (anchor
   blocks) dropped; YAML 1.1 surprises (``05432`` octal, ``1:30`` base 60, ``on``/``no`` in a
   text field) refused;
3. ``${VAR}`` / ``${VAR:-default}`` expansion in every string value (``$$`` is a ``$``);
4. ``defaults`` merged into every pool (a pool's own keys win; a pool that names its own
   password source drops the defaults' one);
5. secrets resolved: ``password_env`` from the environment, ``password_file`` from disk;
6. every ``dsn`` parsed and checked key by key as the pool keys of those names
   (:mod:`.dsn_check`), each problem at its column in the string;
7. pydantic validation, each error turned into a :class:`Problem` with the key path, the YAML
   position, the redacted value and a readable message (:mod:`.translate`). A problem in
   ``defaults`` is reported once there, not once per pool.

``check``, ``Registry.from_yaml``, ``reload()`` and ``stats`` all run exactly this loader, so a
file one of them accepts is one they all accept.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path as FsPath
from typing import Any

from pydantic import ValidationError

from ._yaml import Path, Surprise, ValuePosition, parse_yaml
from .dsn import REDACTED, dsn_has_password
from .dsn_check import dsn_issues
from .errors import ConfigError, Problem
from .models import (
    ENV_NAME_PATTERN,
    LOAD_BALANCE_HOSTS_REASON,
    POOL_KEYS,
    SECRET_KEYS,
    SECRET_SOURCE_KEYS,
    RegistryConfig,
    fallback_issues,
)
from .translate import PydanticErrors, dotted, kind, show

__all__ = ["check_file", "load_config", "load_config_text"]

logger = logging.getLogger("pgregistry.schemas")

_ENV_NAME = re.compile(ENV_NAME_PATTERN)
_MAX_SECRET_FILE = 64 * 1024
# pool keys that take a boolean: yes/no/on/off are fine there
_BOOL_KEYS = frozenset({"test_on_borrow", "background_prewarm", "autocommit", "replication"})
# top-level keys for YAML anchors only (as docker-compose allows): never validated
_EXTENSION_PREFIX = "x-"


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> RegistryConfig:
    """Read, validate and return the configuration file at ``path``.

    Relative ``password_file`` paths are relative to the file's directory. ``environ``
    (default: ``os.environ``) serves ``${VAR}`` and ``password_env``. Raises
    :class:`ConfigError` with every problem found."""
    name = os.fspath(path)
    text = _read_file(name)
    return load_config_text(text, source=name, base_dir=FsPath(name).absolute().parent,
                            environ=environ)


def load_config_text(
    text: str,
    *,
    source: str = "<string>",
    base_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RegistryConfig:
    """Validate YAML ``text`` and return the configuration.

    ``source`` names the text in problems; relative ``password_file`` paths are relative to
    ``base_dir`` (default: the current directory). Raises :class:`ConfigError`."""
    loader = _Load(source, FsPath(base_dir) if base_dir is not None else FsPath.cwd(),
                   os.environ if environ is None else environ)
    config = loader.run(text)
    logger.debug("%s: configuration loaded: %d pool(s)", source, len(config.pools))
    return config


def check_file(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> list[Problem]:
    """Every problem of the file at ``path``: the same loader as :func:`load_config`,
    an empty list when the file is fine."""
    try:
        load_config(path, environ=environ)
    except ConfigError as exc:
        return list(exc.problems)
    return []


# -- reading -------------------------------------------------------------------------------


def _readable_by_others(source: str) -> str:
    """A warning's tail when the file at ``source`` can be read by other users."""
    try:
        mode = os.stat(source).st_mode
    except OSError:
        return ""
    if mode & 0o044:
        return f", and the file is readable by other users (mode {mode & 0o777:o}: chmod 600)"
    return ""


def _file_problem(message: str) -> Problem:
    return Problem(path="", pool=None, line=None, column=None, value=None, message=message)


def _read_file(name: str) -> str:
    try:
        data = FsPath(name).read_bytes()
    except FileNotFoundError:
        raise ConfigError(name, [_file_problem("no such file")]) from None
    except IsADirectoryError:
        raise ConfigError(name, [_file_problem("is a directory, not a file")]) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(name, [_file_problem(f"cannot read the file: {reason}")]) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = data[:exc.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
        raise ConfigError(name, [Problem(
            path="", pool=None, line=line, column=column, value=None,
            message="not UTF-8 text: an invalid byte here (save the file as UTF-8)")]) from None


# -- the loader ----------------------------------------------------------------------------


class _Load(PydanticErrors):
    """One load: its source, and the problems and positions it collects."""

    def __init__(self, source: str, base_dir: FsPath, environ: Mapping[str, str]) -> None:
        self.source = source
        self.base_dir = base_dir
        self.environ = environ
        self.positions: dict[Path, tuple[int, int]] = {}
        self.value_positions: dict[Path, ValuePosition] = {}
        self.from_defaults: dict[tuple[Path, str, str | None], list[str]] = {}
        self.literal_defaults: dict[Path, list[str]] = {}  # the literals of ${VAR:-literal}
        self.problems: list[Problem] = []
        self.reported: set[Path] = set()  # paths with a problem: later errors there are noise
        self.expanded: set[Path] = set()  # string values that contained ${...}
        self.inherited: dict[str, set[str]] = {}  # pool -> keys it took from defaults
        self.secret_cache: dict[FsPath, str | OSError | UnicodeDecodeError] = {}

    # -- problems ------------------------------------------------------------------

    def source_path(self, path: Path) -> Path:
        """Where the value at ``path`` was written: ``defaults.<key>`` for inherited keys."""
        if (len(path) >= 3 and path[0] == "pools" and isinstance(path[1], str)
                and path[2] in self.inherited.get(path[1], ())):
            return ("defaults", *path[2:])
        return path

    def position(self, path: Path) -> tuple[int | None, int | None]:
        path = self.source_path(path)
        for end in range(len(path), -1, -1):
            found = self.positions.get(path[:end])
            if found is not None:
                return found
        return None, None

    def origin_note(self, path: Path, keys: Iterable[str] = ()) -> str:
        """`` (maxconn from defaults.maxconn, line 5)`` for inherited keys of ``path``."""
        if len(path) < 3 or path[0] != "pools" or not isinstance(path[1], str):
            return ""
        inherited = self.inherited.get(path[1], set())
        notes = []
        for key in dict.fromkeys([path[2], *keys]):
            if isinstance(key, str) and key in inherited:
                line, _ = self.position(("pools", path[1], key))
                at = f", line {line}" if line is not None else ""
                what = "inherited" if key == path[2] else key
                notes.append(f"{what} from defaults.{key}{at}")
        return f" ({'; '.join(notes)})" if notes else ""

    def add(self, path: Path, message: str, value: str | None = None,
            at: Path | None = None, offset: int | None = None) -> None:
        """Record a problem at ``path``: placed at its key, or (``at``) at the start of the
        value written at ``at``, or character ``offset`` of that value when it maps one to
        one onto the line."""
        line, column = self.position(path if at is None else at)
        if offset is not None or at is not None:
            where = self.value_positions.get(self.source_path(path if at is None else at))
            if where is not None:
                line, column = where.at(offset)
        pool = path[1] if len(path) >= 2 and path[0] == "pools" and isinstance(path[1], str) \
            else None
        self.problems.append(Problem(path=dotted(path), pool=pool, line=line, column=column,
                                     value=value, message=message))
        self.reported.add(path)

    def already_reported(self, path: Path) -> bool:
        for candidate in (path, self.source_path(path)):
            for end in range(len(candidate), 0, -1):
                if candidate[:end] in self.reported:
                    return True
        return False

    # -- the steps -----------------------------------------------------------------

    def run(self, text: str) -> RegistryConfig:
        doc = parse_yaml(text)
        self.positions = doc.positions
        self.value_positions = doc.value_positions
        for issue in doc.problems:
            path = issue.path or ()
            pool = path[1] if len(path) >= 2 and path[0] == "pools" and isinstance(
                path[1], str) else None
            self.problems.append(Problem(path=dotted(path), pool=pool, line=issue.line,
                                         column=issue.column, value=None,
                                         message=issue.message))
            if issue.value_dropped:
                self.reported.add(path)
        if doc.data is None and doc.problems:
            raise ConfigError(self.source, self.problems)

        root = {} if doc.data is None else doc.data
        if not isinstance(root, dict):
            self.add((), f"the top level must be a mapping (version, dns, defaults, pools), "
                         f"not {kind(root)}")
            raise ConfigError(self.source, self.problems)

        root = {key: value for key, value in root.items()
                if not key.startswith(_EXTENSION_PREFIX)}
        for path, surprise in doc.surprises.items():
            if path and not str(path[0]).startswith(_EXTENSION_PREFIX):
                self.surprise(path, surprise)
        root = self.expand(root, ())
        prepared = dict(root)
        # An absent section and an empty one (`pools:` with nothing under it) are the same;
        # a section that is not a mapping is left for validation to report.
        for key in ("dns", "defaults", "pools"):
            if key in prepared and prepared[key] is None:
                del prepared[key]
        defaults = prepared.get("defaults")
        if isinstance(defaults, dict):
            if "load_balance_hosts" in defaults:
                self.add(("defaults", "load_balance_hosts"), LOAD_BALANCE_HOSTS_REASON)
                defaults = {k: v for k, v in defaults.items() if k != "load_balance_hosts"}
                prepared["defaults"] = defaults
        else:
            defaults = {}
        pools = prepared.get("pools")
        if isinstance(pools, dict):
            prepared["pools"] = {name: self.merge(name, pool, defaults)
                                 for name, pool in pools.items()}
            self.check_fallbacks(prepared["pools"])
        self.check_dsns(prepared)

        try:
            config = RegistryConfig.model_validate(prepared)
        except ValidationError as exc:
            self.translate(exc, prepared)
            raise ConfigError(self.source, self.problems) from None
        if self.problems:
            raise ConfigError(self.source, self.problems)
        self.warn_literal_passwords(prepared)
        return config

    def expand(self, value: Any, path: Path) -> Any:
        """``${VAR}``, ``${VAR:-default}`` and ``$$`` in every string value."""
        if isinstance(value, dict):
            return {key: self.expand(item, (*path, key)) for key, item in value.items()}
        if isinstance(value, list):
            return [self.expand(item, (*path, index)) for index, item in enumerate(value)]
        if isinstance(value, str) and "$" in value:
            return self.expand_text(value, path)
        return value

    def expand_text(self, text: str, path: Path) -> str:
        out: list[str] = []
        position = 0
        failed = referenced = False
        while True:
            dollar = text.find("$", position)
            if dollar < 0:
                out.append(text[position:])
                break
            out.append(text[position:dollar])
            following = text[dollar + 1:dollar + 2]
            if following == "$":
                out.append("$")
                position = dollar + 2
                continue
            if following != "{":
                out.append("$")
                position = dollar + 1
                continue
            close = text.find("}", dollar + 2)
            if close < 0:
                self.add(path, f"unterminated '${{' at character {dollar + 1} "
                               "(write '$$' for a literal '$')")
                return text
            referenced = True
            body = text[dollar + 2:close]
            name, has_default, default = body.partition(":-")
            if has_default and default:
                self.literal_defaults.setdefault(path, []).append(default)
            if not _ENV_NAME.match(name):
                self.add(path, f"invalid variable reference at character {dollar + 1}: "
                               "write ${NAME} or ${NAME:-default}, NAME of letters, digits "
                               "and '_' (and '$$' for a literal '$')")
                return text
            value = self.environ.get(name)
            if value is None or (has_default and value == ""):
                if has_default:
                    value = default
                else:
                    self.add(path, f"environment variable {name!r} is not set (use "
                                   f"${{{name}:-default}} to give a default)")
                    failed = True
                    value = ""
            out.append(value)
            position = close + 1
        if referenced:
            self.expanded.add(path)
        return text if failed else "".join(out)

    def surprise(self, path: Path, surprise: Surprise) -> None:
        """A value YAML 1.1 reads unlike what was meant: an error, but for yes/no/on/off
        where a boolean is expected."""
        secret = any(part in SECRET_KEYS for part in path)
        raw = surprise.raw
        if surprise.kind == "bool":
            if path[-1] in _BOOL_KEYS and (path[0] == "defaults" or path[0] == "pools"):
                return
            shown = "this value" if secret else repr(raw)
            message = (f"{shown} is read as a boolean ({str(surprise.value).lower()}) by YAML "
                       f"1.1; quote it if you mean the text")
        elif surprise.kind == "octal":
            decimal = raw.lstrip("+-").replace("_", "").lstrip("0") or "0"
            message = ("this number has a leading zero: YAML 1.1 reads it as octal and changes "
                       "its digits; quote it" if secret else
                       f"{raw} has a leading zero: YAML 1.1 reads it as the octal number "
                       f"{surprise.value}; write {decimal}, or quote it ('{raw}') for text")
        else:
            message = ("this value is a base-60 number in YAML 1.1; quote it" if secret else
                       f"{raw} is a base-60 number in YAML 1.1 ({surprise.value}); quote it "
                       f"('{raw}') for text")
        self.add(path, message, at=path)

    def check_dsns(self, prepared: dict[str, Any]) -> None:
        """Every dsn parsed and checked key by key (as pool keys), each problem at its place in
        the string; a dsn a pool inherits is checked once, on defaults."""
        sections: list[tuple[Path, Any]] = [(("defaults",), prepared.get("defaults"))]
        pools = prepared.get("pools")
        if isinstance(pools, dict):
            sections += [(("pools", name), pool) for name, pool in pools.items()]
        for path, section in sections:
            if not isinstance(section, dict) or not isinstance(section.get("dsn"), str):
                continue
            dsn_path = (*path, "dsn")
            if self.source_path(dsn_path) != dsn_path or self.already_reported(dsn_path):
                continue
            exact = dsn_path not in self.expanded
            for issue in dsn_issues(section["dsn"]):
                shown = None
                if issue.value is not None:
                    shown = REDACTED if issue.key in SECRET_KEYS else repr(issue.value)
                self.add(dsn_path, issue.message, shown, at=dsn_path,
                         offset=issue.offset if exact else None)

    def merge(self, name: str, pool: Any, defaults: dict[str, Any]) -> Any:
        """The pool's settings over the defaults, with its password resolved."""
        if pool is None:
            pool = {}
        if not isinstance(pool, dict):
            return pool  # validation reports it
        path: Path = ("pools", name)
        if "load_balance_hosts" in pool:
            self.add((*path, "load_balance_hosts"), LOAD_BALANCE_HOSTS_REASON)
            pool = {k: v for k, v in pool.items() if k != "load_balance_hosts"}
        inherited = {k: v for k, v in defaults.items() if k in POOL_KEYS and k not in pool}
        if any(pool.get(key) is not None for key in SECRET_SOURCE_KEYS):
            for key in SECRET_SOURCE_KEYS:
                inherited.pop(key, None)
        self.inherited[name] = set(inherited)
        merged = {**inherited, **pool}
        self.resolve_secret(path, merged)
        return merged

    def resolve_secret(self, path: Path, pool: dict[str, Any]) -> None:
        sources = [key for key in SECRET_SOURCE_KEYS if pool.get(key) is not None]
        if len(sources) > 1:
            self.add((*path, sources[1]), f"set only one of password, password_env, "
                                          f"password_file and password_provider (this pool "
                                          f"has {sources[0]} and "
                                          f"{sources[1]})" + self.origin_note(
                                              (*path, sources[1]), sources[:1]))
            return
        if sources == ["password_env"]:
            variable = pool["password_env"]
            if not isinstance(variable, str) or not _ENV_NAME.match(variable):
                return  # validation reports it
            secret = self.environ.get(variable)
            if secret is None:
                self.add_secret_problem((*path, "password_env"),
                                        f"environment variable {variable!r} (password_env) is "
                                        "not set", repr(variable))
                return
            pool["password"] = secret
        elif sources == ["password_file"]:
            name = pool["password_file"]
            if not isinstance(name, str) or not name:
                return  # validation reports it
            secret_or_error = self.read_secret(name)
            if isinstance(secret_or_error, str):
                pool["password"] = secret_or_error
                return
            key_path = (*path, "password_file")
            if isinstance(secret_or_error, UnicodeDecodeError):
                reason = "it is not UTF-8 text"
            else:
                reason = secret_or_error.strerror or type(secret_or_error).__name__
            self.add_secret_problem(key_path, f"cannot read password_file {name!r}: {reason}",
                                    repr(name))

    def add_secret_problem(self, key_path: Path, message: str, value: str) -> None:
        """A password source that fails: on the pool, or once on ``defaults`` when the pool
        inherits it (not once per pool)."""
        where = self.source_path(key_path)
        if where == key_path:
            self.add(key_path, message, value)
        elif where not in self.reported:
            self.add(where, f"{message} (every pool that inherits it)", value)

    def read_secret(self, name: str) -> str | OSError | UnicodeDecodeError:
        """The password in a file, without one trailing newline; or why it cannot be read.
        Its content never goes into a message."""
        file = FsPath(name).expanduser()
        if not file.is_absolute():
            file = self.base_dir / file
        if file in self.secret_cache:
            return self.secret_cache[file]
        result: str | OSError | UnicodeDecodeError
        try:
            with open(file, "rb") as handle:
                data = handle.read(_MAX_SECRET_FILE + 1)
            if len(data) > _MAX_SECRET_FILE:
                result = OSError(0, f"larger than {_MAX_SECRET_FILE} bytes: not a password")
            else:
                text = data.decode("utf-8")
                if text.endswith("\r\n"):
                    text = text[:-2]
                elif text.endswith("\n"):
                    text = text[:-1]
                result = text if text else OSError(0, "the file is empty")
        except (OSError, UnicodeDecodeError) as exc:
            result = exc
        self.secret_cache[file] = result
        return result

    def check_fallbacks(self, pools: Any) -> None:
        if not isinstance(pools, dict):
            return
        fallbacks = {name: pool.get("fallback") if isinstance(pool, dict) else None
                     for name, pool in pools.items()}
        valid = {name: fallback if isinstance(fallback, str) else None
                 for name, fallback in fallbacks.items()}
        for issue in fallback_issues(valid):
            self.add(issue.path, issue.message + self.origin_note(issue.path),
                     show(issue.path, valid.get(str(issue.path[1]))))

    def warn_literal_passwords(self, prepared: dict[str, Any]) -> None:
        """A literal password in the file works, but deserves a warning."""
        candidates: list[Path] = [("defaults", "password")]
        pools = prepared.get("pools") or {}
        candidates += [("pools", name, "password") for name in pools]
        exposed = _readable_by_others(self.source)
        for path in candidates:
            if path in self.positions and (path not in self.expanded
                                           or path in self.literal_defaults):
                line, _ = self.positions[path]
                logger.warning("%s:%s: %s is a literal password; prefer password_env or "
                               "password_file%s", self.source, line, dotted(path), exposed)
        for name, pool in pools.items():  # a password inside a DSN is a literal one too
            dsn = pool.get("dsn") if isinstance(pool, dict) else None
            path = ("pools", name, "dsn")
            literal = dsn_has_password(dsn) if isinstance(dsn, str) else False
            if path in self.expanded:
                literal = any(dsn_has_password(text)
                              for text in self.literal_defaults.get(path, ()))
            if literal:
                where = self.positions.get(path)
                logger.warning("%s:%s: %s holds a literal password; prefer password_env or "
                               "password_file%s", self.source, where[0] if where else "?",
                               dotted(path), exposed)
