"""Load the YAML file into a :class:`RegistryConfig`, or raise one :class:`ConfigError` with
every problem in it.

The steps, each collecting problems rather than stopping at the first:

1. read the file (a missing file is an error; an empty one is an empty mapping);
2. safe YAML with the line and column of every key (duplicate and non-string keys refused);
3. ``${VAR}`` / ``${VAR:-default}`` expansion in every string value (``$$`` is a ``$``);
4. ``defaults`` merged into every pool (a pool's own keys win; a pool that names its own
   password source drops the defaults' one);
5. secrets resolved: ``password_env`` from the environment, ``password_file`` from disk;
6. pydantic validation, each error turned into a :class:`Problem` with the key path, the YAML
   position, the redacted value and a readable message (``did you mean`` for unknown keys).

``check_file`` runs exactly this loader, so a file it accepts is one the registry accepts.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path as FsPath
from typing import Any

from pydantic import ValidationError

from ._yaml import Path, parse_yaml
from .dsn import REDACTED, redact_dsn
from .errors import ConfigError, Problem
from .models import (
    ENV_NAME_PATTERN,
    LOAD_BALANCE_HOSTS_REASON,
    POOL_KEYS,
    SECRET_KEYS,
    SECRET_SOURCE_KEYS,
    CrossFieldError,
    DnsConfig,
    PoolConfig,
    RegistryConfig,
    fallback_issues,
)

__all__ = ["check_file", "load_config", "load_config_text"]

logger = logging.getLogger("pgregistry.schemas")

_ENV_NAME = re.compile(ENV_NAME_PATTERN)
_MAX_SECRET_FILE = 64 * 1024
_TOP_KEYS = tuple(RegistryConfig.model_fields)
_DNS_KEYS = tuple(DnsConfig.model_fields)
_POOL_KEYS = tuple(sorted(POOL_KEYS))
_MAPPING_ERRORS = frozenset({"model_type", "model_attributes_type", "dict_type", "mapping_type"})


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
        raise ConfigError(name, [_file_problem(
            f"not UTF-8 text (invalid byte at offset {exc.start})")]) from None


# -- the loader ----------------------------------------------------------------------------


def _dotted(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _show(path: Path, value: object) -> str:
    """A value for display: secrets as ``***``, DSNs redacted, long text shortened."""
    keys = {part for part in path if isinstance(part, str)}
    if keys & SECRET_KEYS:
        return REDACTED
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if "dsn" in keys:
            value = redact_dsn(value)
        text = repr(value)
        return text if len(text) <= 100 else text[:96] + "...'"
    if isinstance(value, Mapping):
        return "{...}"
    if isinstance(value, (list, tuple)):
        return "[...]"
    return f"<{type(value).__name__}>"


class _Load:
    """One load: its source, and the problems and positions it collects."""

    def __init__(self, source: str, base_dir: FsPath, environ: Mapping[str, str]) -> None:
        self.source = source
        self.base_dir = base_dir
        self.environ = environ
        self.positions: dict[Path, tuple[int, int]] = {}
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
            at: Path | None = None) -> None:
        line, column = self.position(path if at is None else at)
        pool = path[1] if len(path) >= 2 and path[0] == "pools" and isinstance(path[1], str) \
            else None
        self.problems.append(Problem(path=_dotted(path), pool=pool, line=line, column=column,
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
        for issue in doc.problems:
            path = issue.path or ()
            pool = path[1] if len(path) >= 2 and path[0] == "pools" and isinstance(
                path[1], str) else None
            self.problems.append(Problem(path=_dotted(path), pool=pool, line=issue.line,
                                         column=issue.column, value=None,
                                         message=issue.message))
            if issue.value_dropped:
                self.reported.add(path)
        if doc.data is None and doc.problems:
            raise ConfigError(self.source, self.problems)

        root = {} if doc.data is None else doc.data
        if not isinstance(root, dict):
            self.add((), f"the top level must be a mapping (version, dns, defaults, pools), "
                         f"not {_kind(root)}")
            raise ConfigError(self.source, self.problems)

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
            self.add((*path, sources[1]), f"set only one of password, password_env and "
                                          f"password_file (this pool has {sources[0]} and "
                                          f"{sources[1]})" + self.origin_note(
                                              (*path, sources[1]), sources[:1]))
            return
        if sources == ["password_env"]:
            variable = pool["password_env"]
            if not isinstance(variable, str) or not _ENV_NAME.match(variable):
                return  # validation reports it
            secret = self.environ.get(variable)
            if secret is None:
                key_path = (*path, "password_env")
                self.add(key_path, f"environment variable {variable!r} (password_env) is "
                                   "not set" + self.origin_note(key_path), repr(variable))
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
            self.add(key_path, f"cannot read password_file {name!r}: {reason}"
                               + self.origin_note(key_path), repr(name))

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
                     _show(issue.path, valid.get(str(issue.path[1]))))

    def warn_literal_passwords(self, prepared: dict[str, Any]) -> None:
        """A literal password in the file works, but deserves a warning."""
        candidates: list[Path] = [("defaults", "password")]
        pools = prepared.get("pools") or {}
        candidates += [("pools", name, "password") for name in pools]
        exposed = _readable_by_others(self.source)
        for path in candidates:
            if path in self.positions and path not in self.expanded:
                line, _ = self.positions[path]
                logger.warning("%s:%s: %s is a literal password; prefer password_env or "
                               "password_file%s", self.source, line, _dotted(path), exposed)
        for name, pool in pools.items():  # a password inside a DSN is a literal one too
            dsn = pool.get("dsn") if isinstance(pool, dict) else None
            path = ("pools", name, "dsn")
            if isinstance(dsn, str) and path not in self.expanded and redact_dsn(dsn) != dsn:
                where = self.positions.get(path)
                logger.warning("%s:%s: %s holds a literal password; prefer password_env or "
                               "password_file%s", self.source, where[0] if where else "?",
                               _dotted(path), exposed)

    # -- pydantic errors -----------------------------------------------------------

    def translate(self, exc: ValidationError, prepared: dict[str, Any]) -> None:
        pools = prepared.get("pools")
        inherited_anywhere = set().union(*self.inherited.values()) if self.inherited else set()
        errors = exc.errors(include_url=False)
        # Keys with a field error, per model: its cross-field checks did not run.
        broken: dict[Path, set[str]] = {}
        for error in errors:
            path, _, _ = self.locate(prepared, error)
            model = _model_path(path)
            if model is not None and len(path) > len(model) and isinstance(path[len(model)], str):
                broken.setdefault(model, set()).add(str(path[len(model)]))
        error_paths = [self.locate(prepared, error)[0] for error in errors]
        for error in errors:
            path, value, found = self.locate(prepared, error)
            error_type = error["type"]
            if error_type == "too_short" and any(
                    len(other) > len(path) and other[:len(path)] == path for other in error_paths):
                continue  # "too few items" only because some items were refused
            ctx = error.get("ctx") or {}
            cause = ctx.get("error")
            if isinstance(cause, CrossFieldError):
                self.add_issues(prepared, path, cause)
                continue
            if self.already_reported(path):
                continue
            if "[key]" in error["loc"]:
                value = error.get("input")
            # An error in defaults shows up in every pool that inherits the key; report it
            # there (naming defaults), and on defaults itself only when no pool uses it.
            if (len(path) >= 2 and path[0] == "defaults" and path[1] in inherited_anywhere
                    and isinstance(pools, dict) and error_type != "extra_forbidden"):
                continue
            message = self.message(path, error_type, str(error["msg"]), error.get("input"), ctx)
            shown = _show(path, value) if found and error_type not in (
                "missing", "extra_forbidden") and error_type not in _MAPPING_ERRORS else None
            self.add(path, message + self.origin_note(path), shown)
        for model, keys in broken.items():
            self.recheck(prepared, model, keys)

    def add_issues(self, prepared: dict[str, Any], path: Path, error: CrossFieldError,
                   skip: set[str] | None = None) -> None:
        for issue in error.issues:
            if skip and skip & {*issue.path[:1], *issue.related}:
                continue
            issue_path = (*path, *issue.path)
            if self.already_reported(issue_path):
                continue
            shown = None
            if issue.path:
                present, item = _lookup(prepared, issue_path)
                shown = _show(issue_path, item) if present else None
            self.add(issue_path, issue.message + self.origin_note(issue_path, issue.related),
                     shown)

    def recheck(self, prepared: dict[str, Any], model: Path, broken: set[str]) -> None:
        """Run the cross-field checks of a model whose fields did not all validate, without
        the broken keys; report the issues that do not involve them."""
        present, data = _lookup(prepared, model)
        if not present or not isinstance(data, dict):
            return
        cls = DnsConfig if model == ("dns",) else PoolConfig
        try:
            cls.model_validate({k: v for k, v in data.items() if k not in broken})
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                cause = (error.get("ctx") or {}).get("error")
                if isinstance(cause, CrossFieldError) and not error["loc"]:
                    self.add_issues(prepared, model, cause, broken)

    def locate(self, prepared: dict[str, Any], error: Any) -> tuple[Path, Any, bool]:
        """The data path of a pydantic error (its ``loc`` may end in schema tags such as
        ``[key]`` or a union member), the value there, and whether the value exists."""
        current: Any = prepared
        path: list[str | int] = []
        for part in error["loc"]:
            present, child = _child(current, part)
            if not present:
                if error["type"] == "missing" and isinstance(part, str):
                    path.append(part)
                    return tuple(path), None, False
                break
            current = child
            path.append(part)
        return tuple(path), current, True

    def message(self, path: Path, error_type: str, msg: str, value: object,
                ctx: Mapping[str, Any]) -> str:
        key = path[-1] if path else ""
        if error_type == "missing":
            return f"missing required key {key!r}"
        if error_type == "extra_forbidden":
            return self.unknown_key(path)
        if error_type in _MAPPING_ERRORS:
            return f"expected a mapping, not {_kind(value)}"
        if error_type == "too_short" and isinstance(ctx.get("min_length"), int):
            count = ctx["min_length"]
            return f"must have at least {count} item{'s' if count != 1 else ''}"
        if error_type == "string_pattern_mismatch":
            if len(path) == 2 and path[0] == "pools":
                return ("invalid pool name: it must start with a letter and have only letters, "
                        "digits, '_', '.' and '-' (at most 63 characters)")
            if key == "password_env":
                return ("not an environment variable name (letters, digits and '_', not "
                        "starting with a digit)")
        if error_type == "value_error" and msg.startswith("Value error, "):
            return msg[len("Value error, "):]
        return msg

    def unknown_key(self, path: Path) -> str:
        key = str(path[-1])
        parent = path[:-1]
        if key == "load_balance_hosts":
            return LOAD_BALANCE_HOSTS_REASON
        if parent == ():
            known, where = _TOP_KEYS, "at the top level"
        elif parent == ("dns",):
            known, where = _DNS_KEYS, "in dns"
        elif parent == ("defaults",) or (len(parent) == 2 and parent[0] == "pools"):
            known, where = _POOL_KEYS, "for a pool"
        else:
            known, where = (), "here"
        message = f"unknown key {key!r} {where}"
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            return f"{message}; did you mean {close[0]!r}?"
        if parent == () and key in POOL_KEYS:
            return f"{message}; pool settings go under 'defaults' or under a pool in 'pools'"
        if parent == () and key in _DNS_KEYS:
            return f"{message}; resolver settings go under 'dns'"
        if parent != ("dns",) and key in _DNS_KEYS and key not in POOL_KEYS:
            return f"{message}; resolver settings go under the top-level 'dns'"
        return message


def _model_path(path: Path) -> Path | None:
    """The path of the pool or dns model that ``path`` is in."""
    if len(path) >= 2 and path[0] == "pools":
        return path[:2]
    if path[:1] == ("dns",):
        return ("dns",)
    return None


def _child(data: Any, part: object) -> tuple[bool, Any]:
    """``data[part]`` for a key of a dict or an index of a list: (found, value)."""
    if isinstance(data, dict) and isinstance(part, str) and part in data:
        return True, data[part]
    if isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
        return True, data[part]
    return False, None


def _lookup(data: Any, path: Path) -> tuple[bool, Any]:
    current = data
    for part in path:
        present, current = _child(current, part)
        if not present:
            return False, None
    return True, current
