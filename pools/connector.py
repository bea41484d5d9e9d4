"""Opening one connection: which address, in what order, within what budget.

The connector owns a pool's libpq parameters (parsed by :mod:`.conninfo`), its members (the
addresses of its host names, or with ``discovery: aurora`` the instances of the cluster's shared
topology, :mod:`.topology`), their resolution and the per-address book. Each attempt goes to
one address with ``hostaddr=<ip>`` while ``host=<name>`` stays for TLS verification and
pg_hba; on failure the next address is tried while the caller's budget lasts. It never logs or
shows a password.
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import random
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psycopg2
import psycopg2.extensions

from .addresses import (
    DEFAULT_MEMBERSHIP_WINDOW_S,
    HOLD_KINDS,
    Address,
    AddressBook,
    Hold,
    Member,
    check_membership_window,
)
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
from .resolver import (
    Answer,
    DnsSettings,
    HostResolver,
    ResolutionError,
    is_ip_literal,
)
from .topology import (
    ClusterTopology,
    check_instance_host_pattern,
    derive_instance_host_pattern,
    resolve_discovery,
    shared_topology,
)

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


class Connector:
    """Opens connections with one pool's parameters, over the addresses of its hosts."""

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
        self.name = name
        self.membership_window = check_membership_window(membership_window)
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
        self.clock = clock
        self._dns = dns
        self._resolver = resolver  # built when first needed: IP literals never need one
        self.book = AddressBook(placement=placement, ban_initial=ban_initial, ban_max=ban_max,
                                rng=rng)
        self._removed: list[str] = []
        self._wake: Callable[[], None] | None = None
        self._submit_io: Callable[[str, Callable[[], None]], None] | None = None
        self._unresolved: set[tuple[str, str]] = set()
        self._last_forced = -1e9
        for t in self.targets:  # addresses that need no lookup are known from the start
            if not t.needs_dns:
                self.book.sync(t.host, t.port, [t.hostaddr or (t.host if is_ip_literal(t.host)
                                                                else None)])
        self.role = role or _role_of(tsa)
        # discovery: where the members (the hosts to resolve and connect to) come from
        self._synced: set[tuple[str, str]] = set()  # names whose addresses are in the book
        self._skipped: dict[str, float] = {}  # instance endpoints that did not resolve: until
        self._warned: set[str] = set()
        self.members_from = "dns"
        self.topology: ClusterTopology | None = None
        self._topology_seen = -1
        self._topology_sub: int | None = None
        self.discovery = self._setup_discovery(discovery, instance_host_pattern,
                                               topology_refresh_interval)

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

    @property
    def resolver(self) -> HostResolver:
        if self._resolver is None:
            self._resolver = HostResolver(self._dns, self.clock)
        return self._resolver

    @resolver.setter
    def resolver(self, value: HostResolver) -> None:
        self._resolver = value

    @property
    def resolver_or_none(self) -> HostResolver | None:
        """The resolver, if one was needed yet (IP literals never need one)."""
        return self._resolver

    @property
    def host_label(self) -> str:
        """Where connections go, for logs and errors: ``host:port[,host:port]``."""
        return ",".join(t.label for t in self.targets)

    @property
    def placement(self) -> str:
        return self.book.placement

    def describe(self) -> str:
        return describe(self.params)

    def __repr__(self) -> str:
        return f"Connector({self.describe()})"

    # -- discovery --------------------------------------------------------------------------

    def _setup_discovery(self, discovery: str, pattern: str | None,
                         refresh_interval_s: float) -> str:
        """Resolve ``auto`` and, for ``aurora``, join the cluster's shared topology."""
        if refresh_interval_s <= 0:
            raise ValueError(f"topology_refresh_interval must be > 0 seconds, "
                             f"got {refresh_interval_s!r}")
        named = [t for t in self.targets if t.needs_dns]
        host = named[0].host if len(self.targets) == 1 and named else ""
        mode = resolve_discovery(discovery, host)
        if mode != "aurora":
            return mode
        if not host:
            raise ValueError(
                "discovery: aurora needs one host name (the cluster's writer or reader "
                f"endpoint), got {self.host_label!r}"
            )
        if pattern is None:
            pattern = derive_instance_host_pattern(host)
            if pattern is None:
                raise ValueError(
                    f"discovery: aurora with host {host!r} (not an RDS endpoint name) needs "
                    "instance_host_pattern: an instance endpoint with '?' for the instance id, "
                    "e.g. '?.cluster-id.region.rds.amazonaws.com'"
                )
        self.topology = shared_topology(check_instance_host_pattern(pattern),
                                        self.targets[0].port, self.clock)
        self._topology_interval_s = refresh_interval_s
        self._topology_sub = self.topology.subscribe(_no_wake, refresh_interval_s)
        weakref.finalize(self, self.topology.unsubscribe, self._topology_sub)
        return mode

    def set_wake(self, wake: Callable[[], None]) -> None:
        """How the topology, or a change of members, asks this connector's pool to look again
        (its supervisor task)."""
        self._wake = wake
        topo = self.topology
        if topo is None:
            return
        if self._topology_sub is not None:
            topo.unsubscribe(self._topology_sub)
        self._topology_sub = topo.subscribe(wake, self._topology_interval_s)
        weakref.finalize(self, topo.unsubscribe, self._topology_sub)

    def close(self) -> None:
        """Leave the shared topology (the pool closed)."""
        if self.topology is not None and self._topology_sub is not None:
            self.topology.unsubscribe(self._topology_sub)
            self._topology_sub = None

    def _members(self) -> tuple[list[Target], str]:
        """The hosts connections go to, and where they come from (``topology`` or ``dns``)."""
        topo = self.topology
        if topo is None or topo.unavailable is not None:
            return self.targets, "dns"
        snap = topo.snapshot
        if snap is None:
            return self.targets, "dns"
        port = self.targets[0].port
        return [Target(i.host, port) for i in snap.for_role(self.role)], "topology"

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

    def set_io(self, submit: Callable[[str, Callable[[], None]], None]) -> None:
        """Where the topology query runs: the supervisor's I/O workers (``submit_io``)."""
        self._submit_io = submit

    def _maybe_refresh_topology(self, now: float) -> None:
        if self.topology is not None:
            self.topology.maybe_refresh(now, self._probe, [t.host for t in self.targets],
                                        submit=self._submit_io)

    # -- addresses --------------------------------------------------------------------------

    def sync(self) -> list[ResolutionError]:
        """Bring the address book in line with the members (the topology's instances, or the
        resolver's answers for the configured names; from the cache, a name never resolved is
        queried now). Returns the names that could not be resolved."""
        members, source = self._members()
        if self.topology is not None:
            self._topology_seen = self.topology.version
        now = self.clock.monotonic()
        errors: list[ResolutionError] = []
        unresolved: set[tuple[str, str]] = set()
        wanted: dict[tuple[str, str], Answer] = {}
        for t in members:
            if not t.needs_dns:
                continue
            if source == "topology" and self._skipped.get(t.host, -math.inf) > now:
                continue
            try:
                wanted[(t.host, t.port)] = self.resolver.answer(t.host)
            except ResolutionError as exc:
                if source == "topology":  # an instance id with no DNS record: skip it
                    self._skip_instance(t.host, now, exc)
                    continue
                errors.append(exc)
                unresolved.add((t.host, t.port))
        if source == "topology" and not wanted and members:
            self._warn_once(
                "no_instance_resolves",
                "pool %s: no instance endpoint of the topology resolves (instance_host_pattern "
                "%s): using DNS discovery of %s", self.name,
                self.topology.pattern if self.topology else "?", self.host_label,
            )
            return self._sync_dns_only()
        if source != self.members_from:
            logger.info("pool %s: members from %s (%s)", self.name, source,
                        ", ".join(h for h, _ in wanted) or self.host_label)
            self.members_from = source
        # the configured names are sampled into a membership (rotating answers); the topology's
        # instance endpoints (one A record each) are followed answer by answer
        self._apply(wanted, unresolved, self.membership_window if source == "dns" else 0.0)
        return errors

    def _sync_dns_only(self) -> list[ResolutionError]:
        errors: list[ResolutionError] = []
        unresolved: set[tuple[str, str]] = set()
        wanted: dict[tuple[str, str], Answer] = {}
        for t in self.targets:
            if not t.needs_dns:
                continue
            try:
                wanted[(t.host, t.port)] = self.resolver.answer(t.host)
            except ResolutionError as exc:
                errors.append(exc)
                unresolved.add((t.host, t.port))
        self.members_from = "dns"
        self._apply(wanted, unresolved, self.membership_window)
        return errors

    def _apply(self, wanted: Mapping[tuple[str, str], Answer],
               unresolved: set[tuple[str, str]], window: float) -> None:
        """Each name's members into the book: the addresses its answers named within
        ``window`` seconds and not failing since (:meth:`AddressBook.observe`; 0: the latest
        answer only); names no longer wanted leave."""
        now = self.clock.monotonic()
        for (host, port), ans in wanted.items():
            _, removed = self.book.observe(host, port, ans.addresses, ans.seen, now, window)
            self._removed.extend(removed)
        for host, port in self._synced - set(wanted) - unresolved:
            _, removed = self.book.sync(host, port, [])  # a member that left
            self._removed.extend(removed)
        self._synced = set(wanted) | unresolved
        # A name whose answer cannot be served (failed, past its grace) gets no new
        # connections: its open ones stay (DNS trouble is not database trouble).
        self._unresolved = unresolved

    def _skip_instance(self, host: str, now: float, exc: ResolutionError) -> None:
        interval = self.topology.refresh_interval_s if self.topology else 30.0
        self._skipped[host] = now + interval
        self._warn_once(
            f"unresolved:{host}",
            "pool %s: the topology names %s, which does not resolve (%s): skipped; "
            "check instance_host_pattern", self.name, host, exc.answer,
        )

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    def _names(self) -> set[str]:
        return {h.lower() for h, _ in self._synced if not is_ip_literal(h)} | {
            t.host.lower() for t in self.targets if t.needs_dns}

    def refresh_due(self) -> float | None:
        """When the resolver next wants to refresh one of this connector's names, or the
        topology wants refreshing (at once when it changed since the last sync)."""
        dues: list[float] = []
        if self.topology is not None:
            if self.topology.version != self._topology_seen:
                return -math.inf
            dues.append(self.topology.due())
        names = self._names()
        if names and self._resolver is not None:
            dues += [a.refresh_at for n, a in self.resolver.answers().items() if n in names]
        return min(dues) if dues else None

    def refresh(self, now: float) -> None:
        """Refresh what is due (the supervisor calls this): start a topology refresh (in a
        worker), refresh due names, then sync."""
        self._maybe_refresh_topology(now)
        due = set(self.resolver.due_names(now)) & self._names()
        for name in due:
            try:
                self.resolver.refresh(name)
            except ResolutionError as exc:
                logger.warning("pool %s: %s", self.name, exc)
        self.sync()

    def refresh_soon(self, force: bool = False) -> bool:
        """Make this connector's names due for a refresh now (at most once a second unless
        ``force``); with a topology, refresh it now (a writer pool: hunt for a new writer).
        Returns whether anything was marked."""
        now = self.clock.monotonic()
        if self.topology is not None:
            if self.role == "writer":
                self.topology.writer_gone(now)
            else:
                self.topology.request(now)
            self._maybe_refresh_topology(now)
        if not force and now - self._last_forced < 1.0:
            return self.topology is not None
        self._last_forced = now
        names = self._names()
        for name in names:
            self.resolver.expedite(name, now)
        return bool(names) or self.topology is not None

    def set_members(
        self,
        source: str,
        members: Mapping[str, str] | Iterable[Member | tuple[str, str | None, str]],
    ) -> tuple[list[str], list[str]]:
        """Add the members another source gives this pool (a user's list, a service
        registry): ``members`` as ``{host: ip}`` (on the port of the pool's first host) or as
        ``Member(host, ip, port)`` tuples; an empty one withdraws the source. They add to the
        members DNS or the topology give (an address is a member while any source lists it).
        Addresses no source lists any more are retired by the pool at its next maintenance
        step (asked for at once). ``source`` must not start with ``dns:`` (DNS names' own).
        Returns (added, removed) labels."""
        if source.startswith("dns:"):
            raise ValueError(f"source {source!r}: 'dns:' sources are the DNS names' own")
        if isinstance(members, Mapping):
            port = self.targets[0].port if self.targets else "5432"
            listed = [Member(host, ip, port) for host, ip in members.items()]
        else:
            listed = [Member(*m) for m in members]
        added, removed = self.book.set_members(source, listed)
        self._removed.extend(removed)
        if (added or removed) and self._wake is not None:
            self._wake()  # place connections on the new members, retire the ones that left
        return added, removed

    def discovery_stats(self) -> dict[str, Any]:
        """``discovery``, where the members come from, and the shared topology's state."""
        out: dict[str, Any] = {"discovery": self.discovery, "members_from": self.members_from}
        if self.topology is not None:
            out["topology"] = self.topology.stats()
        return out

    def all_banned(self, now: float) -> bool:
        if any(t.needs_dns for t in self.targets) or self.topology is not None:
            self.sync()  # learn the addresses if nothing connected yet
        return self.book.all_banned(now)

    def after_fork(self) -> None:
        self.book.after_fork()
        if self._resolver is not None:
            self._resolver.after_fork()
        self._removed = []

    def take_removed(self) -> list[str]:
        """Addresses that left their host's DNS answer since the last call."""
        removed, self._removed = self._removed, []
        return removed

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


def _role_of(target_session_attrs: str) -> str:
    """The role a pool plays for discovery when it was not told: from its session attrs."""
    if target_session_attrs in ("read-write", "primary"):
        return "writer"
    if target_session_attrs in ("read-only", "standby", "prefer-standby"):
        return "reader"
    return "any"


def _no_wake() -> None:
    """The wake of a connector whose pool did not give one: maintenance polls instead."""
