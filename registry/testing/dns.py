"""An in-process authoritative DNS server for tests, on ``127.0.0.1`` and a free port.

Tests set A/AAAA records, flip them (a failover), make the server fail on demand and check which
queries really arrived. Every change is seen by the very next query: there is no cache.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSError
from dnslib.server import DNSLogger, DNSServer

if TYPE_CHECKING:
    import dns.resolver

__all__ = ["MODES", "DnsServer"]

log = logging.getLogger(__name__)

MODES = ("normal", "servfail", "nxdomain", "refused", "silent")
_RCODES = {"servfail": RCODE.SERVFAIL, "nxdomain": RCODE.NXDOMAIN, "refused": RCODE.REFUSED}


class _Dropped(DNSError):  # type: ignore[misc]
    """Raised by the resolver for "silent": dnslib's handler logs it (quietly), sends nothing."""


def _normalize(name: str) -> str:
    return name.rstrip(".").lower()


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"DNS mode must be one of {MODES}, not {mode!r}")
    return mode


@dataclass
class _Entry:
    a: list[str] = field(default_factory=list)
    aaaa: list[str] = field(default_factory=list)
    a_ttl: int = 1
    aaaa_ttl: int = 1


class _Resolver:
    """dnslib resolver answering from the owning :class:`DnsServer`'s tables."""

    def __init__(self, owner: DnsServer) -> None:
        self._owner = owner

    def resolve(self, request: Any, handler: Any) -> Any:
        qname = _normalize(str(request.q.qname))
        qtype = str(QTYPE[request.q.qtype])
        mode, entry = self._owner._lookup(qname, qtype)
        if mode == "silent":
            raise _Dropped(f"dropped {qname} {qtype}")
        reply = request.reply()
        if mode in _RCODES:
            reply.header.rcode = _RCODES[mode]
            return reply
        if entry is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if qtype in ("A", "ANY"):
            for ip in entry.a:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=entry.a_ttl))
        if qtype in ("AAAA", "ANY"):
            for ip in entry.aaaa:
                reply.add_answer(
                    RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(ip), ttl=entry.aaaa_ttl)
                )
        return reply


class _QuietLogger(DNSLogger):  # type: ignore[misc]
    """dnslib's logger with every hook off and no output."""

    def __init__(self) -> None:
        super().__init__(
            log="-recv,-send,-request,-reply,-truncated,-error,-data", logf=lambda _s: None
        )


class DnsServer:
    """A DNS server on ``127.0.0.1:<port>`` (UDP and TCP) answering from in-memory records.

    Names are case-insensitive and kept without the trailing dot. Unknown names answer
    NXDOMAIN; a known name without records of the asked type answers NOERROR with no answer.
    ``mode`` ("normal", "servfail", "nxdomain", "refused", "silent") applies to every query
    unless a per-name mode overrides it; "silent" drops the query.
    """

    host = "127.0.0.1"

    def __init__(self, port: int = 0, tcp: bool = True) -> None:
        self.port = port
        self._tcp = tcp
        self._lock = threading.Lock()
        self._records: dict[str, _Entry] = {}
        self._mode = "normal"
        self._name_modes: dict[str, str] = {}
        self._queries: list[tuple[str, str]] = []
        self._servers: list[DNSServer] = []

    def __repr__(self) -> str:
        return f"<DnsServer {self.host}:{self.port} mode={self._mode}>"

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- lifecycle ------------------------------------------------------------------------------

    def _bind(self, port: int) -> list[DNSServer]:
        resolver = _Resolver(self)
        udp = DNSServer(resolver, address=self.host, port=port, logger=_QuietLogger())
        servers = [udp]
        if self._tcp:
            bound = int(udp.server.server_address[1])
            try:
                servers.append(
                    DNSServer(
                        resolver, address=self.host, port=bound, tcp=True, logger=_QuietLogger()
                    )
                )
            except OSError:
                udp.server.server_close()
                raise
        return servers

    def start(self) -> DnsServer:
        if self._servers:
            return self
        for attempt in range(20):
            try:
                servers = self._bind(self.port)
            except OSError:
                if self.port or attempt == 19:
                    raise
                continue  # the UDP port is taken for TCP: let the kernel pick another
            break
        self.port = int(servers[0].server.server_address[1])
        for server in servers:
            kind = "tcp" if server.server.socket_type == socket.SOCK_STREAM else "udp"
            thread = threading.Thread(
                target=server.server.serve_forever,
                kwargs={"poll_interval": 0.01},
                name=f"pgregistry-dns-{kind}-{self.port}",
                daemon=True,
            )
            thread.start()
        self._servers = servers
        log.debug("DNS server on %s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.server.shutdown()
            server.server.server_close()

    @property
    def running(self) -> bool:
        return bool(self._servers)

    # -- records --------------------------------------------------------------------------------

    @staticmethod
    def _ips(ips: Iterable[str], version: int) -> list[str]:
        out = []
        for ip in ips:
            parsed = ipaddress.ip_address(ip)
            if parsed.version != version:
                raise ValueError(f"{ip} is not an IPv{version} address")
            out.append(str(parsed))
        return out

    def set_a(self, name: str, ips: Iterable[str], ttl: int = 1) -> None:
        """Replace the A records of ``name`` (the AAAA records stay)."""
        checked = self._ips(ips, 4)
        with self._lock:
            entry = self._records.setdefault(_normalize(name), _Entry())
            entry.a, entry.a_ttl = checked, ttl

    def set_aaaa(self, name: str, ips: Iterable[str], ttl: int = 1) -> None:
        """Replace the AAAA records of ``name`` (the A records stay)."""
        checked = self._ips(ips, 6)
        with self._lock:
            entry = self._records.setdefault(_normalize(name), _Entry())
            entry.aaaa, entry.aaaa_ttl = checked, ttl

    def set_records(self, name: str, ips: Iterable[str], ttl: int = 1) -> None:
        """Replace both A and AAAA records of ``name``: A for IPv4 literals, AAAA for IPv6."""
        parsed = [ipaddress.ip_address(ip) for ip in ips]
        entry = _Entry(
            a=[str(p) for p in parsed if p.version == 4],
            aaaa=[str(p) for p in parsed if p.version == 6],
            a_ttl=ttl,
            aaaa_ttl=ttl,
        )
        with self._lock:
            self._records[_normalize(name)] = entry

    def remove(self, name: str) -> None:
        """Forget ``name``: it answers NXDOMAIN again."""
        with self._lock:
            self._records.pop(_normalize(name), None)

    def records(self, name: str) -> list[str]:
        """The A then AAAA addresses currently served for ``name``."""
        with self._lock:
            entry = self._records.get(_normalize(name))
            return [] if entry is None else [*entry.a, *entry.aaaa]

    # -- failure modes --------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self.set_mode(mode)

    def set_mode(self, mode: str, name: str | None = None) -> None:
        """Set the mode of every query, or with ``name`` the mode of that name only."""
        _check_mode(mode)
        with self._lock:
            if name is None:
                self._mode = mode
            else:
                self._name_modes[_normalize(name)] = mode

    def clear_mode(self, name: str | None = None) -> None:
        """Drop the override of ``name``; without a name, back to "normal" with no overrides."""
        with self._lock:
            if name is None:
                self._mode = "normal"
                self._name_modes.clear()
            else:
                self._name_modes.pop(_normalize(name), None)

    # -- queries --------------------------------------------------------------------------------

    @property
    def queries(self) -> list[tuple[str, str]]:
        """(qname without trailing dot, lower case; qtype name) of every query received."""
        with self._lock:
            return list(self._queries)

    def clear_queries(self) -> None:
        with self._lock:
            self._queries.clear()

    def _lookup(self, qname: str, qtype: str) -> tuple[str, _Entry | None]:
        """Record the query; the mode that applies and a snapshot of the name's records."""
        with self._lock:
            self._queries.append((qname, qtype))
            mode = self._name_modes.get(qname, self._mode)
            entry = self._records.get(qname)
            if entry is not None:
                entry = _Entry(list(entry.a), list(entry.aaaa), entry.a_ttl, entry.aaaa_ttl)
            return mode, entry

    # -- client helper --------------------------------------------------------------------------

    def resolver(
        self, lifetime: float = 1.0, timeout: float | None = None
    ) -> dns.resolver.Resolver:
        """A dnspython resolver that asks only this server (no cache, no system config)."""
        import dns.resolver

        res = dns.resolver.Resolver(configure=False)
        res.port = self.port  # before nameservers: dnspython binds the port when they are set
        res.nameservers = [self.host]
        res.lifetime = lifetime
        res.timeout = timeout if timeout is not None else lifetime
        return res
