"""Where a pool's password comes from, asked again for every new connection.

A pool has at most one credential source: a fixed ``password``; a ``password_file`` read at
each new connection (a Kubernetes secret rotated on disk is used by the next connect, the
running connections stay); or a ``password_provider``, a callable (or ``"package.module:
function"``) called at each new connection as ``provider(host=..., port=..., user=...)`` with
the host name, port (int) and user of the attempt, returning the password (e.g. a short-lived
IAM auth token: :mod:`pgregistry.pools.iam`).

Invariants: no secret ever reaches a message, a log line or a repr; a failure of the source is
a :class:`CredentialError` whose text names the source (file path, provider name) and the kind
of failure, never what the file or the provider held or said (a provider's exception message
might quote a secret, so only its type is shown and it is not chained).
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import logging
import os
import re
from collections.abc import Callable
from typing import Any

__all__ = [
    "CredentialError",
    "Credentials",
    "PasswordProvider",
    "load_provider",
    "fingerprint",
    "read_password_file",
    "MAX_PASSWORD_FILE_BYTES",
]

logger = logging.getLogger(__name__)

#: ``provider(host=..., port=..., user=...) -> password``
PasswordProvider = Callable[..., str]

#: A password file larger than this is refused (it is not a password).
MAX_PASSWORD_FILE_BYTES = 64 * 1024

PROVIDER_SPEC = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
                           r":[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


# A key that lives as long as the process: fingerprints compare passwords without keeping them.
_FINGERPRINT_KEY = os.urandom(32)


def fingerprint(password: str | None) -> bytes | None:
    """A keyed digest of a password (to tell whether it changed; reveals nothing)."""
    if password is None:
        return None
    return hmac.new(_FINGERPRINT_KEY, password.encode("utf-8", "surrogatepass"),
                    hashlib.sha256).digest()


class CredentialError(Exception):
    """The credential source could not give a password. The message names the source and
    what went wrong, never a secret."""


def load_provider(spec: str) -> PasswordProvider:
    """Import ``"package.module:function"`` (the function may be a dotted attribute path).
    Raises ``ValueError`` for a malformed spec, ``ImportError``/``AttributeError`` (with the
    spec in the message) when it cannot be found, ``TypeError`` when it is not callable."""
    if not PROVIDER_SPEC.match(spec):
        raise ValueError(f"password_provider must be 'package.module:function', got {spec!r}")
    module_name, _, attr_path = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"password_provider {spec!r}: cannot import {module_name!r}: "
                          f"{exc}") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"password_provider {spec!r}: {module_name!r} has no "
                                 f"{attr_path!r}") from None
    if not callable(obj):
        raise TypeError(f"password_provider {spec!r} is not callable")
    return obj  # type: ignore[no-any-return]


def read_password_file(path: str) -> str:
    """The password in ``path`` (UTF-8, one trailing newline dropped). Raises
    :class:`CredentialError` naming the file and why (missing, unreadable, empty, too large,
    not UTF-8), never its content."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PASSWORD_FILE_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CredentialError(f"cannot read password_file {path!r}: {reason}") from None
    if len(data) > MAX_PASSWORD_FILE_BYTES:
        raise CredentialError(f"password_file {path!r} is larger than "
                              f"{MAX_PASSWORD_FILE_BYTES} bytes: not a password")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialError(f"password_file {path!r} is not UTF-8 text") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise CredentialError(f"password_file {path!r} is empty")
    return text


class Credentials:
    """A pool's credential source (at most one of the three keywords; none: libpq's own,
    e.g. ``PGPASSWORD`` or ``~/.pgpass``).

    :param password: a fixed password.
    :param password_file: a file read again at every :meth:`password_for`; relative paths are
        made absolute now (against the working directory).
    :param password_provider: a callable, or ``"package.module:function"`` imported now.
    :raises ValueError: more than one source; a malformed provider spec.
    :raises ImportError, AttributeError, TypeError: a provider that cannot be loaded.
    """

    __slots__ = ("_password", "password_file", "provider", "provider_name")

    def __init__(
        self,
        *,
        password: str | None = None,
        password_file: str | os.PathLike[str] | None = None,
        password_provider: PasswordProvider | str | None = None,
    ) -> None:
        given = [k for k, v in (("password", password), ("password_file", password_file),
                                ("password_provider", password_provider)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"set only one of password, password_file and password_provider "
                             f"(got {' and '.join(given)})")
        self._password = password
        self.password_file = (None if password_file is None
                              else os.path.abspath(os.fspath(password_file)))
        self.provider: PasswordProvider | None
        self.provider_name: str | None
        if isinstance(password_provider, str):
            self.provider = load_provider(password_provider)
            self.provider_name = password_provider
        else:
            self.provider = password_provider
            self.provider_name = (None if password_provider is None else
                                  getattr(password_provider, "__qualname__", None)
                                  or type(password_provider).__name__)

    @property
    def rotates(self) -> bool:
        """Whether the password may change between connections (a file or a provider)."""
        return self.provider is not None or self.password_file is not None

    @property
    def source(self) -> str | None:
        """Which source is set: ``"password"``, ``"password_file"``, ``"password_provider"``,
        or ``None``."""
        if self.provider is not None:
            return "password_provider"
        if self.password_file is not None:
            return "password_file"
        return "password" if self._password is not None else None

    def describe(self) -> str:
        """The source, secret-free: ``password_file /run/secrets/db`` and the like."""
        source = self.source
        if source == "password_file":
            return f"password_file {self.password_file}"
        if source == "password_provider":
            return f"password_provider {self.provider_name}"
        return "password ***" if source == "password" else "no password (libpq's defaults)"

    def password_for(self, host: str, port: int, user: str | None) -> str | None:
        """The password for one new connection to ``host``:``port`` as ``user`` (``None``:
        let libpq find one). Raises :class:`CredentialError` when the source fails; the
        message names the source, never a secret."""
        if self.provider is not None:
            failed: str | None = None
            try:
                value = self.provider(host=host, port=port, user=user)
            except Exception as exc:
                failed = type(exc).__name__
            if failed is not None:
                # raised outside the handler, so the provider's error is neither the cause nor
                # the context: its message may quote a secret; only its type is shown
                raise CredentialError(
                    f"password_provider {self.provider_name} raised {failed} "
                    f"(for {user or 'default user'}@{host}:{port})")
            if not isinstance(value, str) or not value:
                raise CredentialError(
                    f"password_provider {self.provider_name} returned "
                    f"{'an empty string' if value == '' else type(value).__name__}, "
                    "not a password")
            return value
        if self.password_file is not None:
            return read_password_file(self.password_file)
        return self._password

    def __repr__(self) -> str:
        return f"Credentials({self.describe()})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Credentials):
            return NotImplemented
        return (self._password, self.password_file, self.provider) == (
            other._password, other.password_file, other.provider)

    __hash__ = None  # type: ignore[assignment]
