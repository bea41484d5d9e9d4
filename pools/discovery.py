"""Where a pool's connections may go: its members, their discovery and their refresh.

A pool's members are the hosts it connects to: the names from its configuration (each
resolved by :mod:`.resolver`, sampled into a DNS membership over ``membership_window``), or with
``discovery: aurora`` the instances of the cluster's shared topology (:mod:`.topology`), plus
what other sources add (:meth:`Membership.set_members`). Their addresses are kept in the
pool's :class:`~.addresses.AddressBook`, which orders them for placement.

Invariants:
- The book holds exactly the addresses of the current members (:meth:`Membership.sync`):
  an address no source lists any more leaves the book and is reported once by
  :meth:`Membership.take_removed`, for the pool to retire its connections.
- A name that cannot be resolved keeps its open connections (DNS trouble is not database
  trouble) but gets no new ones; an instance endpoint of the topology that does not resolve is
  skipped for one topology refresh interval, with one warning.
- Nothing here blocks the caller on the network except a first resolution of a name never
  resolved; the topology query runs on the supervisor's I/O workers (``set_io``), and a
  refresh is only scheduled (``refresh_due``, ``refresh_soon``), never waited for.
- Opening a connection is not this module's: :class:`~.connector.Connector` (a
  ``Membership``) does it, and provides :meth:`Membership._probe` for the topology query.
"""

from __future__ import annotations

import logging
import math
import random
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psycopg2.extensions

from .addresses import AddressBook, Member, check_membership_window
from .clock import Clock
from .conninfo import Target
from .resolver import Answer, DnsSettings, HostResolver, ResolutionError, is_ip_literal
from .topology import (
    ClusterTopology,
    check_instance_host_pattern,
    derive_instance_host_pattern,
    resolve_discovery,
    shared_topology,
)

__all__ = ["Membership", "role_of"]

logger = logging.getLogger(__name__)


class Membership:
    """The members of one pool and their address book (the base of
    :class:`~pgregistry.pools.connector.Connector`).

    :param targets: the configured hosts (``conninfo.parse_targets``).
    :param placement, ban_initial, ban_max, rng: the address book's (see ``addresses``).
    :param role: ``writer``, ``reader`` or ``any``: which of the topology's instances are
        members (default: from ``target_session_attrs``, see :func:`role_of`).
    :param discovery: ``dns``, ``aurora`` or ``auto`` (see ``topology.resolve_discovery``).
    :param topology_refresh_interval: seconds between topology refreshes (> 0, else
        ``ValueError``).
    :param membership_window: seconds a DNS answer's address stays a member (see
        ``addresses.check_membership_window``; ``ValueError`` outside 0..3600).
    """

    def __init__(
        self,
        targets: list[Target],
        *,
        name: str,
        clock: Clock,
        dns: DnsSettings | Mapping[str, Any] | None,
        resolver: HostResolver | None,
        placement: str,
        ban_initial: float,
        ban_max: float,
        rng: random.Random | None,
        role: str,
        discovery: str,
        instance_host_pattern: str | None,
        topology_refresh_interval: float,
        membership_window: float,
    ) -> None:
        self.name = name
        self.targets = targets
        self.membership_window = check_membership_window(membership_window)
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
        self.role = role
        self._synced: set[tuple[str, str]] = set()  # names whose addresses are in the book
        self._skipped: dict[str, float] = {}  # instance endpoints that did not resolve: until
        self._warned: set[str] = set()
        self.members_from = "dns"
        self.topology: ClusterTopology | None = None
        self._topology_seen = -1
        self._topology_sub: int | None = None
        self.discovery = self._setup_discovery(discovery, instance_host_pattern,
                                               topology_refresh_interval)

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
        """A short-lived autocommit connection to ``host``, for the topology query (the
        connector opens it)."""
        raise NotImplementedError

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


def role_of(target_session_attrs: str) -> str:
    """The role a pool plays for discovery when it was not told: from its session attrs."""
    if target_session_attrs in ("read-write", "primary"):
        return "writer"
    if target_session_attrs in ("read-only", "standby", "prefer-standby"):
        return "reader"
    return "any"


def _no_wake() -> None:
    """The wake of a connector whose pool did not give one: maintenance polls instead."""
