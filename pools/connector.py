"""Opening one connection: which address, in what order, within what budget.

The connector owns a pool's libpq parameters (parsed by :mod:`.conninfo`), its credentials
and the act of connecting; where connections may go (the members, their discovery and the
address book) is its base, :class:`~.discovery.Membership`.

Invariants:
- Each attempt goes to one address with ``hostaddr=<ip>`` while ``host=<name>`` stays for TLS
  verification and pg_hba; addresses are tried in the book's placement order (a preferred one
  first), the next after a failure, while the caller's deadline lasts; each attempt is bounded
  by ``connect_timeout`` and by what is left of the deadline (:func:`.attempt.bounded_connect`).
- The book's counts are exact under interruption: an address reserved for an attempt is
  either ``opened``, ``failed`` or ``unreserved``, even when the attempt raises
  ``KeyboardInterrupt``; an address on hold is not tried (its remembered error counts).
- A rotated password (file, provider) makes remembered authentication refusals moot.
- It never logs or shows a password (reprs and errors use :func:`.conninfo.describe`).
"""

from __future__ import annotations

import getpass
import logging
import os
import random
import time
from collections.abc import Mapping
from typing import Any

import psycopg2
import psycopg2.extensions

from .addresses import DEFAULT_MEMBERSHIP_WINDOW_S, HOLD_KINDS, Address, AddressBook, Hold
from .attempt import DeadlinePassed, PendingConnect, bounded_connect, classify, first_line
from .clock import REAL_CLOCK, Clock
from .conninfo import (
    _PER_ATTEMPT,
    _PSYCOPG_KEYS,
    DEFAULT_CONNECT_TIMEOUT,
    REDACTED,
    SECRET_KEYS,
    TARGET_SESSION_ATTRS,
    Target,
    describe,
    parse_conninfo,
    parse_targets,
    redact_params,
)
from .credentials import Credentials, PasswordProvider, fingerprint
from .discovery import Membership, role_of
from .resolver import DnsSettings, HostResolver, ResolutionError, is_ip_literal

__all__ = [
    "Connector",
    "ConnectFailed",
    "Target",
    "redact_params",
    "parse_conninfo",
    "describe",
]

# re-exported: the names other modules used from here
_CONNINFO = (DEFAULT_CONNECT_TIMEOUT, REDACTED, SECRET_KEYS, TARGET_SESSION_ATTRS, parse_targets)

logger = logging.getLogger(__name__)



class ConnectFailed(Exception):
    """Every address tried failed (or none could be found). ``attempts`` holds (address, kind,
    message) for each try (see :func:`classify` for the kinds); ``holds`` the addresses skipped
    because they are on hold (their remembered error is in ``attempts`` too; no login was
    tried); ``pending`` the connects given up at the caller's deadline whose sockets may still
    be open; ``__cause__`` is the last error."""

    def __init__(self, target: str, attempts: list[tuple[str, str, str]],
                 resolution: list[ResolutionError], holds: list[Hold] | None = None,
                 pending: list[PendingConnect] | None = None) -> None:
        self.target = target
        self.attempts = attempts
        self.resolution = resolution
        self.holds = holds or []
        self.pending = pending or []
        parts = [f"{label} {kind} ({msg})" for label, kind, msg in attempts]
        parts += [str(err) for err in resolution]
        if not attempts and not resolution:
            parts = ["no address to try"]
        super().__init__(f"cannot connect to {target}: " + "; ".join(parts))

    @property
    def kinds(self) -> set[str]:
        """The kinds of failure seen."""
        return {kind for _, kind, _ in self.attempts}


class Connector(Membership):
    """Opens connections with one pool's parameters, over the addresses of its members
    (a :class:`~.discovery.Membership`: where they come from is that module's)."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        dns: DnsSettings | Mapping[str, Any] | None = None,
        resolver: HostResolver | None = None,
        clock: Clock = REAL_CLOCK,
        placement: str = "least_connections",
        ban_initial: float = 1.0,
        ban_max: float = 60.0,
        rng: random.Random | None = None,
        name: str = "",
        role: str | None = None,
        discovery: str = "auto",
        instance_host_pattern: str | None = None,
        topology_refresh_interval: float = 30.0,
        membership_window: float = DEFAULT_MEMBERSHIP_WINDOW_S,
        **connect_kwargs: Any,
    ) -> None:
        password_file = connect_kwargs.pop("password_file", None)
        password_provider = connect_kwargs.pop("password_provider", None)
        extra = {k: connect_kwargs.pop(k) for k in list(connect_kwargs) if k in _PSYCOPG_KEYS}
        if "async_" in connect_kwargs or "async" in connect_kwargs:
            raise ValueError("asynchronous connections cannot be pooled")
        self.params: dict[str, str] = parse_conninfo(dsn, connect_kwargs)
        self.params.setdefault("connect_timeout", str(DEFAULT_CONNECT_TIMEOUT))
        try:
            self.connect_timeout = int(self.params["connect_timeout"])
        except ValueError:
            raise ValueError(
                f"connect_timeout must be whole seconds, got {self.params['connect_timeout']!r}"
            ) from None
        tsa = self.params.get("target_session_attrs", "any")
        if tsa not in TARGET_SESSION_ATTRS:
            raise ValueError(f"target_session_attrs must be one of {TARGET_SESSION_ATTRS}, "
                             f"got {tsa!r}")
        self.target_session_attrs = tsa
        self.targets = parse_targets(self.params)
        self._base = {k: v for k, v in self.params.items() if k not in _PER_ATTEMPT}
        self.credentials = Credentials()
        self.set_credentials(password=self._base.pop("password", None),
                             password_file=password_file, password_provider=password_provider)
        self._factory_kwargs = {k: v for k, v in extra.items() if v is not None}
        super().__init__(
            self.targets, name=name, clock=clock, dns=dns, resolver=resolver,
            placement=placement, ban_initial=ban_initial, ban_max=ban_max, rng=rng,
            role=role or role_of(tsa), discovery=discovery,
            instance_host_pattern=instance_host_pattern,
            topology_refresh_interval=topology_refresh_interval,
            membership_window=membership_window,
        )

    def add_session_setting(self, name: str, value: str) -> bool:
        """Start every new connection's session with ``name = value`` (``-c`` in libpq's
        ``options``: the session's own default, kept by ``RESET`` and ``DISCARD ALL``), unless
        the user's ``options`` set it already. Returns whether the setting is the pool's.
        (PgBouncer ignores ``options``: behind it the setting does not reach the server.)"""
        options = self._base.get("options", "")
        if f"{name}=" in options.replace(" =", "="):
            return False
        self._base["options"] = f"{options} -c {name}={value}".strip()
        return True

    def set_credentials(
        self,
        *,
        password: str | None = None,
        password_file: str | os.PathLike[str] | None = None,
        password_provider: PasswordProvider | str | None = None,
    ) -> None:
        """Where the password of each new connection comes from, from now on (open
        connections are not touched). At most one source; raises ``ValueError`` otherwise, and
        what :class:`~pgregistry.pools.credentials.Credentials` raises for a bad provider."""
        self.credentials = Credentials(password=password, password_file=password_file,
                                       password_provider=password_provider)
        book: AddressBook | None = getattr(self, "book", None)
        if book is not None:
            book.clear_holds("auth")  # new credentials: the remembered refusals are moot
        self._refused_fp: bytes | None = None  # the rotating password last refused
        self._base.pop("password", None)
        if password is not None:
            self.params["password"] = password
        else:
            self.params.pop("password", None)

    def _user(self) -> str | None:
        """The user a connection logs in as (libpq's defaults: PGUSER, then the OS user)."""
        user = self.params.get("user") or os.environ.get("PGUSER")
        if user:
            return user
        try:
            return getpass.getuser()
        except Exception:  # no name for this uid
            return None

    def describe(self) -> str:
        return describe(self.params)

    def __repr__(self) -> str:
        return f"Connector({self.describe()})"

    def _probe(self, host: str) -> psycopg2.extensions.connection:
        """A short-lived connection to ``host`` (resolved as the pool resolves), for the
        topology query: autocommit, ``connect_timeout`` at most 2 s."""
        ips = [host] if is_ip_literal(host) else list(self.resolver.addresses(host))
        last: BaseException | None = None
        for ip in ips:
            kw = dict(self._base)
            kw.update(host=host, hostaddr=ip, port=self.targets[0].port,
                      connect_timeout=str(min(self.connect_timeout or 2, 2)))
            try:
                conn: psycopg2.extensions.connection = psycopg2.connect(
                    psycopg2.extensions.make_dsn(**kw))
            except psycopg2.OperationalError as exc:
                last = exc
                continue
            conn.autocommit = True
            return conn
        raise last or ConnectionError(f"{host}: no address")

    # -- connecting -------------------------------------------------------------------------

    def connect_to(self, label: str, timeout_s: int = 2) -> psycopg2.extensions.connection:
        """A connection to exactly the address ``label`` (a monitor's: not counted in the
        book, never banning), with the pool's parameters and credentials; autocommit.
        Raises ``KeyError`` for an unknown address, ``psycopg2.OperationalError``, and what
        the credential source raises."""
        a = self.book.get(label)
        if a is None:
            raise KeyError(label)
        password = self.credentials.password_for(a.host, int(a.port), self._user())
        kw = dict(self._base)
        kw.update(port=a.port, connect_timeout=str(timeout_s))
        if a.host:
            kw["host"] = a.host
        if a.ip is not None:
            kw["hostaddr"] = a.ip
        if password is not None:
            kw["password"] = password
        conn = psycopg2.connect(**kw, **self._factory_kwargs)  # type: ignore[call-overload]
        conn.autocommit = True
        return conn  # type: ignore[no-any-return]

    def connect(
        self, deadline: float | None = None, prefer: str | None = None
    ) -> tuple[psycopg2.extensions.connection, Address]:
        """Open one connection: try the addresses in placement order (``prefer`` first) until
        one connects, each attempt bounded by ``connect_timeout`` and by what is left until
        ``deadline`` (``time.monotonic()`` seconds). Raises :class:`ConnectFailed`."""
        resolution = self.sync()
        order = self.book.order(self.clock.monotonic(), prefer)
        if self._unresolved:
            order = [a for a in order if (a.host, a.port) not in self._unresolved]
        attempts: list[tuple[str, str, str]] = []
        holds: list[Hold] = []
        pending: list[PendingConnect] = []
        last: BaseException | None = resolution[-1] if resolution else None
        two_pass = self.target_session_attrs == "prefer-standby"
        passes = ["standby", "any"] if two_pass else [self.target_session_attrs]
        wrong_role: list[Address] = []
        for i, tsa in enumerate(passes):
            for a in order if i == 0 else wrong_role:
                remaining: float | None = None
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 and attempts:
                        break  # the budget is spent; at least one address was tried
                rotating: str | None = None
                if self.credentials.rotates:
                    # a rotated password (file, provider) makes remembered auth refusals moot
                    rotating = self.credentials.password_for(a.host, int(a.port), self._user())
                    fp = fingerprint(rotating)
                    if self._refused_fp is not None and fp != self._refused_fp:
                        self.book.clear_holds("auth")
                        self._refused_fp = None
                hold = self.book.reserve(a, self.clock.monotonic())
                if hold is not None:  # no login: the remembered error counts as the attempt
                    holds.append(hold)
                    when = (f"tried again in {hold.retry_in_s:.1f} s" if hold.retry_in_s
                            else "being tried again now")
                    attempts.append((a.label, hold.kind,
                                     f"{hold.error}; remembered, no login tried: {when}"))
                    last = psycopg2.OperationalError(hold.error)
                    continue
                try:
                    password = rotating if self.credentials.rotates else \
                        self.credentials.password_for(a.host, int(a.port), self._user())
                except BaseException:
                    self.book.unreserve(a)
                    raise
                kw: dict[str, Any] = dict(self._base)
                if password is not None:
                    kw["password"] = password
                kw["port"] = a.port
                if a.host:
                    kw["host"] = a.host
                if a.ip is not None:
                    kw["hostaddr"] = a.ip
                if tsa != "any":
                    kw["target_session_attrs"] = tsa
                try:
                    conn = bounded_connect(kw, self._factory_kwargs, self.connect_timeout,
                                           remaining)
                except psycopg2.OperationalError as exc:
                    last = exc
                    kind = classify(exc)
                    if kind == "auth" and self.credentials.rotates:
                        self._refused_fp = fingerprint(password)
                    if isinstance(exc, DeadlinePassed):
                        kind = "deadline"  # the caller's deadline: nothing about the address
                        pending.append(exc.pending)
                    first_pass_role = two_pass and i == 0 and kind == "wrong_role"
                    if first_pass_role:
                        wrong_role.append(a)
                    ban_s = self.book.failed(
                        a, self.clock.monotonic(), kind, first_line(exc),
                        ban=kind not in ("rejected", "deadline") and not first_pass_role,
                    )
                    attempts.append((a.label, kind, first_line(exc)))
                    if not first_pass_role:
                        # one warning per ban or hold period; the rest are DEBUG
                        log = logger.warning if ban_s or kind == "rejected" else logger.debug
                        what = "on hold" if kind in HOLD_KINDS else "banned"
                        log(
                            "pool %s: connect to %s (%s) failed: %s: %s%s",
                            self.name, a.label, a.host or "default",
                            kind, first_line(exc),
                            f"; {what} for {ban_s:.1f} s" if ban_s else "",
                        )
                    continue
                except BaseException:
                    self.book.unreserve(a)
                    raise
                self.book.opened(a)
                if self.topology is not None and self.role == "writer" \
                        and self.members_from == "topology":
                    self.topology.writer_confirmed(a.host)
                return conn, a
        err = ConnectFailed(self.host_label, attempts, resolution, holds, pending)
        raise err from last


