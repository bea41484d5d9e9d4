"""An in-process authoritative DNS server for tests, on ``127.0.0.1`` and a free port.

It answers the way the DNS in front of a database really does, Aurora's included (TESTING.md,
"Aurora as it really is"):

- **address names**: A/AAAA records (several per name: a round-robin setup), each family with
  its own TTL (:meth:`DnsServer.set_a`, :meth:`~DnsServer.set_aaaa`,
  :meth:`~DnsServer.set_records`);
- **CNAME chains**: ``name -> target`` (:meth:`~DnsServer.set_cname`); one reply carries the
  CNAME record(s) and then the target's A/AAAA records, each with its own TTL (an Aurora instance
  endpoint: one A record, TTL 5 s; its cluster endpoint: a CNAME to the writer's instance);
- **rotating answers**: each query picks ``per_query`` targets at random from a set
  (:meth:`~DnsServer.set_rotating`). Targets that are names are answered as a CNAME to the pick
  (Aurora's reader endpoint: TTL 1 s, ONE reader's instance endpoint per query); targets that
  are IP literals are answered as the picked A/AAAA records. The pick comes from the server's
  ``random.Random`` (``seed=`` for reproducible tests);
- **DNS lag**: :meth:`~DnsServer.delay_updates` makes every later change to a name take effect
  ``seconds`` later on the server's clock (``clock=``, a :class:`pgregistry.pools.Clock`; pass the
  test's ``FakeClock`` to move it by hand). Until then queries see the old records. Aurora's
  cluster endpoint after a failover: AWS's driver documentation puts it at up to 40-60 s;
- **failures on demand**: :meth:`~DnsServer.set_mode` ("servfail", "nxdomain", "refused",
  "silent") for every query, one name, or one name and query type (a resolver that drops AAAA);
- **what was asked**: :attr:`~DnsServer.queries` ``[(name, qtype)]`` and
  :attr:`~DnsServer.query_log` (with the time, the CNAME chain followed and the addresses given).

Every change without a delay is seen by the very next query: there is no cache. Names are
case-insensitive and kept without the trailing dot. A name holds either addresses, a CNAME or a
rotation: setting one kind replaces the other (as DNS forbids a CNAME beside other data).

Example, an Aurora-like cluster (``i1`` writer, ``i2``/``i3`` readers)::

    dns = DnsServer(seed=1).start()
    for iid, ip in {"i1": "127.0.0.11", "i2": "127.0.0.12", "i3": "127.0.0.13"}.items():
        dns.set_a(f"{iid}.c1.test", [ip], ttl=5)                 # instance endpoints
    dns.set_cname("db.cluster-c1.test", "i1.c1.test", ttl=5)       # writer endpoint
    dns.set_rotating("db.cluster-ro-c1.test", ["i2.c1.test", "i3.c1.test"], ttl=1)
    dns.delay_updates("db.cluster-c1.test", 30)                    # failovers seen 30 s late
    dns.set_cname("db.cluster-c1.test", "i2.c1.test", ttl=5)       # ... answered from t+30 s
"""

from __future__ import annotations

import logging
import random
import socket
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, A, DNSError
from dnslib.server import DNSLogger, DNSServer

from .dnszone import MODES, Query, Zone, normalize_name

if TYPE_CHECKING:
    import dns.resolver

    from ..pools.clock import Clock

__all__ = ["MODES", "DnsServer", "Query"]

log = logging.getLogger(__name__)

_RCODES = {"servfail": RCODE.SERVFAIL, "nxdomain": RCODE.NXDOMAIN, "refused": RCODE.REFUSED}


class _Dropped(DNSError):  # type: ignore[misc]
    """Raised by the resolver for "silent": dnslib's handler logs it (quietly), sends nothing."""


class _Resolver:
    """dnslib resolver answering from the owning :class:`DnsServer`'s tables."""

    def __init__(self, owner: DnsServer) -> None:
        self._owner = owner

    def resolve(self, request: Any, handler: Any) -> Any:
        qname = normalize_name(str(request.q.qname))
        qtype = str(QTYPE[request.q.qtype])
        ans = self._owner._answer(qname, qtype)
        if ans.mode == "silent":
            raise _Dropped(f"dropped {qname} {qtype}")
        reply = request.reply()
        if ans.mode in _RCODES:
            reply.header.rcode = _RCODES[ans.mode]
            return reply
        for owner, target, ttl in ans.cnames:
            reply.add_answer(RR(owner + ".", QTYPE.CNAME, rdata=CNAME(target + "."), ttl=ttl))
        if not ans.found:
            reply.header.rcode = RCODE.NXDOMAIN  # the name (or the chain's end) does not exist
            return reply
        if qtype in ("A", "ANY"):
            for ip in ans.a:
                reply.add_answer(RR(ans.owner + ".", QTYPE.A, rdata=A(ip), ttl=ans.a_ttl))
        if qtype in ("AAAA", "ANY"):
            for ip in ans.aaaa:
                reply.add_answer(
                    RR(ans.owner + ".", QTYPE.AAAA, rdata=AAAA(ip), ttl=ans.aaaa_ttl)
                )
        return reply


class _QuietLogger(DNSLogger):  # type: ignore[misc]
    """dnslib's logger with every hook off and no output."""

    def __init__(self) -> None:
        super().__init__(
            log="-recv,-send,-request,-reply,-truncated,-error,-data", logf=lambda _s: None
        )



class DnsServer(Zone):
    """A DNS server on ``127.0.0.1:<port>`` (UDP and TCP) answering from its :class:`Zone`.

    ``port``: 0 picks a free one. ``clock``: times delayed updates (default: the process's
    monotonic clock). ``seed`` / ``rng``: the random picks of rotating names.

    Unknown names answer NXDOMAIN; a known name without records of the asked type answers
    NOERROR with no answer (after any CNAMEs). ``mode`` ("normal", "servfail", "nxdomain",
    "refused", "silent") applies to every query unless a per-name (or per-name-and-type) mode
    overrides it; "silent" drops the query. See the module docstring for the whole API.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        port: int = 0,
        tcp: bool = True,
        *,
        clock: Clock | None = None,
        seed: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(clock=clock, seed=seed, rng=rng)
        self.port = port
        self._tcp = tcp
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
