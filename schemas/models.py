"""Frozen pydantic models of the YAML file: ``RegistryConfig``, ``DnsConfig``, ``PoolConfig``.

Every model shares one base (:class:`ConfigModel`): unknown keys are errors, instances are
frozen, non-finite floats are refused, and validation errors never echo their input (a
password may be in it).

Defaults live in the models: a :class:`PoolConfig` carries the ``ConnectionPool`` defaults for
every pool keyword it was not given, so ``config.pools["x"].maxconn`` is the value the pool
runs with. Connection parameters (libpq) and secrets default to ``None`` (not set). The
``defaults:`` section is kept as given in :class:`PoolDefaults` (``model_fields_set`` says which
keys were written); it is already merged into every pool by the loader.

Field types live in :mod:`.fields`; the cross-field checks (pure functions returning
:class:`Issue` values, raised by the models' validators as one :class:`CrossFieldError`) in
:mod:`.checks`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    SerializerFunctionWrapHandler,
    WrapSerializer,
    field_serializer,
    model_validator,
)

from .checks import CrossFieldError, Issue, dns_issues, fallback_issues, pool_issues
from .dsn import DsnError, parse_dsn, redact_dsn
from .fields import (
    Flag,
    Float,
    Int,
    IpAddress,
    NonNegFloat,
    NonNegInt,
    Port,
    PosFloat,
    Replication,
    Secret,
    Text,
    TlsVersion,
    check_hostaddr,
    check_instance_host_pattern,
    check_require_auth,
    digits_to_int,
    split_list,
)

__all__ = [
    "ConfigModel",
    "CREDENTIAL_KEYS",
    "CrossFieldError",
    "DnsConfig",
    "ENV_NAME_PATTERN",
    "Issue",
    "LIBPQ_PARAMETERS",
    "LIVE_KEYWORDS",
    "LOAD_BALANCE_HOSTS_REASON",
    "POOL_KEYS",
    "POOL_KEYWORDS",
    "POOL_NAME_PATTERN",
    "PoolConfig",
    "PoolDefaults",
    "RegistryConfig",
    "SECRET_KEYS",
    "SECRET_SOURCE_KEYS",
    "dns_issues",
    "fallback_issues",
    "pool_issues",
]

POOL_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

#: Keywords of the pool itself (``ConnectionPool``), plus ``role`` and ``fallback``.
POOL_KEYWORDS = frozenset({
    "minconn", "maxconn", "idle_timeout", "reap_idle_interval", "lifetime_timeout",
    "lifetime_jitter", "test_on_borrow", "background_prewarm", "timeout", "max_waiting", "reuse",
    "validation_bypass", "autocommit", "reconnect_backoff", "reconnect_backoff_max", "placement",
    "address_ban", "address_ban_max", "rebalance_fraction", "rebalance_interval", "role",
    "role_check_interval", "leak_detection_threshold", "ping_timeout", "query_timeout",
    "fallback", "recycle", "max_replica_lag", "discovery", "instance_host_pattern",
    "topology_refresh_interval", "dns_membership_window",
})

#: The pool keywords a running pool takes in place; changing anything else (the DSN, a libpq
#: parameter, a secret, ``autocommit``, ``role``) changes the connection identity: a new pool.
LIVE_KEYWORDS = frozenset({
    "minconn", "maxconn", "idle_timeout", "reap_idle_interval", "lifetime_timeout",
    "lifetime_jitter", "test_on_borrow", "background_prewarm", "timeout", "max_waiting", "reuse",
    "validation_bypass", "reconnect_backoff", "reconnect_backoff_max", "placement", "address_ban",
    "address_ban_max", "rebalance_fraction", "rebalance_interval", "role_check_interval",
    "leak_detection_threshold", "ping_timeout", "fallback", "recycle", "dns_membership_window",
    "max_replica_lag",
})

#: libpq connection parameters a pool may set (``password`` is a secret, see below).
LIBPQ_PARAMETERS = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "passfile", "require_auth", "channel_binding",
    "connect_timeout", "client_encoding", "options", "application_name",
    "fallback_application_name", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "tcp_user_timeout", "replication", "gssencmode", "sslmode", "requiressl",
    "sslnegotiation", "sslcompression", "sslcert", "sslkey", "sslpassword", "sslcertmode",
    "sslrootcert", "sslcrl", "sslcrldir", "sslsni", "requirepeer", "ssl_min_protocol_version",
    "ssl_max_protocol_version", "krbsrvname", "gsslib", "gssdelegation", "service",
    "target_session_attrs",
})

#: Keys whose values are secrets: shown as ``***`` everywhere.
SECRET_KEYS = frozenset({"password", "sslpassword"})

#: Where a pool's password comes from; at most one of them per pool.
SECRET_SOURCE_KEYS = ("password", "password_env", "password_file", "password_provider")

#: Where new connections get their password: not connection identity. Changing only these on
#: reload retunes the running pool in place (its open connections stay).
CREDENTIAL_KEYS = frozenset(SECRET_SOURCE_KEYS)

PROVIDER_PATTERN = (r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
                    r":[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

#: Every key a pool (or ``defaults``) may have.
POOL_KEYS = POOL_KEYWORDS | LIBPQ_PARAMETERS | {"dsn", *SECRET_SOURCE_KEYS}

LOAD_BALANCE_HOSTS_REASON = (
    "load_balance_hosts is not allowed: the pool spreads connections over a host's addresses "
    "itself (see placement: least_connections or random)"
)

# A fingerprint key that lives as long as the process: identity() can compare secrets across
# reloads without holding them, and a logged identity reveals nothing.
_FINGERPRINT_KEY = os.urandom(32)


def _fingerprint(secret: str) -> str:
    digest = hmac.new(_FINGERPRINT_KEY, secret.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return digest.hexdigest()[:32]


# -- field types of the pool and registry models (the others: .fields) ----------------

def _check_dsn(value: str) -> str:
    try:
        params = parse_dsn(value)
    except DsnError as exc:
        raise ValueError(f"invalid dsn: {exc}") from None
    if "load_balance_hosts" in params:
        raise ValueError(f"in the dsn: {LOAD_BALANCE_HOSTS_REASON}")
    for key in params:  # (the loader checks each value too, with its place in the file)
        if key not in LIBPQ_PARAMETERS and key not in SECRET_KEYS:
            shown = f" {key!r}" if key.isidentifier() and len(key) <= 40 else ""
            raise ValueError(f"unknown connection parameter{shown} in the dsn")
    return value


PoolName = Annotated[str, Field(pattern=POOL_NAME_PATTERN)]
EnvName = Annotated[str, Field(pattern=ENV_NAME_PATTERN)]
Dsn = Annotated[str, AfterValidator(_check_dsn)]


# -- models --------------------------------------------------------------------------------


class ConfigModel(BaseModel):
    """The one base of every model of the file."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        hide_input_in_errors=True,
    )


class DnsConfig(ConfigModel):
    """How host names are resolved (the ``dns:`` section)."""

    nameservers: Annotated[tuple[IpAddress, ...], BeforeValidator(split_list)] = Field(
        default=(),
        description="Name servers to ask, as IP addresses; empty: the system's resolvers.")
    port: Int = Field(default=53, ge=1, le=65535, description="The name servers' port.")
    timeout: Float = Field(default=2.0, gt=0, description="Seconds for one try at one name server.")
    lifetime: Float = Field(default=5.0, gt=0, description="Seconds for a whole lookup, every try.")
    search: Annotated[tuple[Text, ...], BeforeValidator(split_list)] = Field(
        default=(), description="Search domains appended to names without a dot; empty: none.")
    min_ttl: Float = Field(
        default=1.0, ge=0, description="An answer is cached at least this long (s).")
    max_ttl: Float = Field(
        default=300.0, ge=0, description="An answer is cached at most this long (s).")
    stale_grace: Float = Field(
        default=300.0, ge=0,
        description="When a lookup fails, keep using the last answer this long past its TTL (s).")
    refresh_ahead: Float = Field(
        default=0.8, gt=0, le=1,
        description="Refresh an answer when this fraction of its TTL has passed, in (0, 1].")
    families: Annotated[
        tuple[Literal["ipv4", "ipv6"], ...], BeforeValidator(split_list)
    ] = Field(default=("ipv4", "ipv6"), min_length=1, description="Address families to look up.")

    @model_validator(mode="after")
    def _check_dns(self) -> DnsConfig:
        issues = dns_issues(self)
        if issues:
            raise CrossFieldError(issues)
        return self

    def settings(self) -> dict[str, Any]:
        """The section as a plain mapping (lists as lists), what ``ConnectionPool(dns=...)``
        and the resolver take."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in self._values()}

    def _values(self) -> Iterator[tuple[str, Any]]:
        for name in type(self).model_fields:
            yield name, getattr(self, name)


class _PoolFields(ConfigModel):
    """Every key a pool may have, with its limits. Pool keywords default to the
    ``ConnectionPool`` defaults; connection parameters and secrets to ``None`` (not set)."""

    # -- pool keywords -----------------------------------------------------------------
    minconn: Int = Field(
        default=1, ge=0, description="Connections kept open (prewarmed, refilled).")
    maxconn: Int = Field(default=10, ge=1, description="Never more connections than this.")
    idle_timeout: NonNegFloat | None = Field(
        default=300.0,
        description="Seconds a connection above minconn may stay idle; null: forever.")
    reap_idle_interval: Float = Field(
        default=300.0, ge=0, description="Seconds between idle reaps; 0: never.")
    lifetime_timeout: PosFloat | None = Field(
        default=86400.0,
        description="A connection's lifetime in seconds (jittered); null: forever.")
    lifetime_jitter: Float = Field(
        default=0.1, ge=0, lt=1,
        description="Each lifetime is varied by up to this fraction, in [0, 1).")
    test_on_borrow: bool = Field(
        default=True, description="Ping a connection before handing it out (unless just used).")
    background_prewarm: bool = Field(
        default=True,
        description="Open minconn connections in the background, not in the constructor.")
    timeout: Float = Field(
        default=30.0, ge=0,
        description="Seconds a checkout waits for a connection; 0: fail at once.")
    max_waiting: Int = Field(
        default=0, ge=0, description="Most callers waiting at once; 0: no limit.")
    reuse: Literal["fifo", "lifo"] = Field(
        default="fifo",
        description="Hand out the oldest idle connection (fifo) or the newest (lifo).")
    validation_bypass: Float = Field(
        default=0.5, ge=0,
        description="No ping for a connection returned less than this many s ago.")
    autocommit: bool | None = Field(
        default=None,
        description="Set autocommit on every connection; null: leave psycopg2's default.")
    reconnect_backoff: Float = Field(
        default=1.0, ge=0, description="First wait (s) before retrying after a failed connect.")
    reconnect_backoff_max: Float = Field(
        default=60.0, ge=0, description="Longest wait (s) between connect retries.")
    placement: Literal["least_connections", "random"] = Field(
        default="least_connections",
        description="How a new connection picks among a host's addresses.")
    address_ban: Float = Field(
        default=1.0, ge=0, description="First ban (s) of an address that failed to connect.")
    address_ban_max: Float = Field(default=60.0, ge=0, description="Longest ban (s) of an address.")
    rebalance_fraction: Float = Field(
        default=0.25, gt=0, le=1,
        description="Most of the pool moved at once when addresses are uneven, in (0, 1].")
    rebalance_interval: Float = Field(
        default=1.0, gt=0, description="Seconds between rebalancing steps.")
    role: Literal["writer", "reader", "any"] = Field(
        default="any",
        description="What the pool is for. A writer connects only where writes are accepted "
                    "(target_session_attrs read-write unless set) and follows a failover when "
                    "its server is demoted; a reader retires connections to a promoted replica.")
    role_check_interval: Float = Field(
        default=5.0, gt=0,
        description="Seconds between the supervisor's checks of each address's role "
                    "(writer/reader pools).")
    discovery: Literal["auto", "dns", "aurora"] = Field(
        default="auto",
        description="Where the pool finds its servers. dns: the addresses the host name "
                    "resolves to (a rotating name's answers are collected over time). aurora: "
                    "the cluster's own topology, aurora_replica_status() read from any "
                    "instance, connecting to instance endpoints (readers spread at once; a "
                    "writer follows a failover before DNS does). auto: aurora for an Aurora "
                    "cluster (.cluster-) or reader (.cluster-ro-) endpoint name, else dns.")
    instance_host_pattern: Annotated[Text, AfterValidator(check_instance_host_pattern)] | None = (
        Field(default=None,
              description="An instance endpoint with '?' for the instance id, e.g. "
                          "'?.abc123.eu-west-1.rds.amazonaws.com'. Derived from an RDS host "
                          "name when not set; required for discovery: aurora otherwise."))
    dns_membership_window: Float = Field(
        default=300.0, ge=0, le=3600,
        description="Seconds an address a host name's DNS answers named stays a member of the "
                    "pool after the last answer that named it: a name whose answers rotate "
                    "(Aurora's reader endpoint answers one instance per query) is the union of "
                    "its answers over this window, so a rotation never closes a connection; an "
                    "address DNS no longer names leaves when the window ends, or at once when "
                    "connecting to it fails. 0 follows each answer exactly.")
    topology_refresh_interval: PosFloat = Field(
        default=30.0,
        description="Seconds between refreshes of an Aurora cluster's topology (every second "
                    "while a writer pool hunts a new writer after a failover).")
    ping_timeout: PosFloat = Field(
        default=5.0,
        description="Seconds a test-on-borrow ping may take (or the checkout's timeout, if "
                    "less) before its socket is shut down and the address banned: nothing in "
                    "libpq bounds a query on a frozen server.")
    max_replica_lag: PosFloat | None = Field(
        default=None,
        description="Seconds of replication lag past which a replica gets no new checkouts "
                    "(Aurora: the topology's replica_lag_in_msec; streaming replicas: measured "
                    "each second); when every replica is over it, the least lagging one is "
                    "used. Off by default.")
    recycle: Literal["fast", "verified", "clean"] | None = Field(
        default=None,
        description="psqlpy's recycling methods: fast (returned as it is, rolled back; no "
                    "ping), verified (pinged on checkout), clean (also DISCARD ALL on return, "
                    "bounded by ping_timeout); null: test_on_borrow decides.")
    query_timeout: PosFloat | None = Field(
        default=None,
        description="Seconds any one query may take before the pool cuts its connection (the "
                    "query fails, the address is banned): the bound for a frozen server, which "
                    "nothing in libpq gives. Off by default.")
    leak_detection_threshold: PosFloat | None = Field(
        default=None,
        description="Warn (once, with the stack that checked it out) about a connection held "
                    "longer than this many seconds. Off by default.")
    fallback: PoolName | None = Field(
        default=None, description="Another pool of this file to use when this one cannot serve.")

    # -- secrets -----------------------------------------------------------------------
    password: Secret | None = Field(
        default=None,
        description="The password, literally (discouraged: prefer password_env or "
                    "password_file). After loading: the resolved password, whatever its source.")
    password_env: EnvName | None = Field(
        default=None, description="Name of the environment variable holding the password.")
    password_file: Annotated[str, Field(min_length=1)] | None = Field(
        default=None,
        description="File holding the password (one trailing newline is dropped); relative "
                    "to the YAML file's directory. Read again for every new connection, so a "
                    "rotated secret is used by the next connect.")
    password_provider: Annotated[str, Field(pattern=PROVIDER_PATTERN)] | None = Field(
        default=None,
        description="'package.module:function' called for every new connection as "
                    "function(host=..., port=..., user=...), returning the password (e.g. "
                    "the IAM token provider of the aws extra, for Aurora IAM authentication).")

    # -- connection ----------------------------------------------------------------------
    dsn: Dsn | None = Field(
        default=None,
        description="libpq connection string, key=value or postgresql:// URI; the parameters "
                    "below override it.")
    host: Text | None = Field(
        default=None,
        description="Host name(s), IP address(es) or socket directory; comma-separated for "
                    "several.")
    hostaddr: Annotated[Text, AfterValidator(check_hostaddr)] | None = Field(
        default=None, description="IP address(es) to connect to, skipping DNS.")
    port: Port | None = Field(
        default=None, description="Port, or comma-separated ports (one per host).")
    dbname: Text | None = Field(default=None, description="Database name.")
    user: Text | None = Field(default=None, description="User name.")
    passfile: Text | None = Field(
        default=None, description="libpq password file (~/.pgpass format).")
    require_auth: Annotated[Text, AfterValidator(check_require_auth)] | None = Field(
        default=None, description="Authentication methods the server may ask for.")
    channel_binding: Literal["disable", "prefer", "require"] | None = Field(
        default=None, description="SCRAM channel binding.")
    connect_timeout: NonNegInt | None = Field(
        default=None, description="Seconds to wait for one connection attempt; 0: forever.")
    client_encoding: Text | None = Field(default=None, description="Client encoding.")
    options: Text | None = Field(
        default=None,
        description="Command-line options for the server, e.g. '-c statement_timeout=5s'.")
    application_name: Text | None = Field(
        default=None, description="application_name of connections.")
    fallback_application_name: Text | None = Field(
        default=None, description="application_name when none is set elsewhere.")
    keepalives: Flag | None = Field(default=None, description="TCP keepalives on (1) or off (0).")
    keepalives_idle: NonNegInt | None = Field(
        default=None, description="Seconds of inactivity before a TCP keepalive is sent.")
    keepalives_interval: NonNegInt | None = Field(
        default=None, description="Seconds between unanswered TCP keepalives.")
    keepalives_count: NonNegInt | None = Field(
        default=None, description="Unanswered TCP keepalives before the connection is dead.")
    tcp_user_timeout: NonNegInt | None = Field(
        default=None, description="Milliseconds transmitted data may stay unacknowledged.")
    replication: Replication | None = Field(
        default=None, description="Replication connection: true, database or false.")
    gssencmode: Literal["disable", "prefer", "require"] | None = Field(
        default=None, description="GSSAPI encryption.")
    sslmode: Literal[
        "disable", "allow", "prefer", "require", "verify-ca", "verify-full"
    ] | None = Field(default=None, description="TLS: whether to use it and how much to verify.")
    requiressl: Flag | None = Field(default=None, description="Deprecated: use sslmode.")
    sslnegotiation: Literal["postgres", "direct"] | None = Field(
        default=None, description="How TLS is negotiated.")
    sslcompression: Flag | None = Field(default=None, description="TLS compression (1) or not (0).")
    sslcert: Text | None = Field(default=None, description="Client certificate file.")
    sslkey: Text | None = Field(default=None, description="Client key file.")
    sslpassword: Secret | None = Field(default=None, description="Password of the client key.")
    sslcertmode: Literal["disable", "allow", "require"] | None = Field(
        default=None, description="Whether a client certificate is sent.")
    sslrootcert: Text | None = Field(
        default=None, description="CA certificate file (or 'system') to verify the server with.")
    sslcrl: Text | None = Field(default=None, description="Certificate revocation list file.")
    sslcrldir: Text | None = Field(
        default=None, description="Certificate revocation list directory.")
    sslsni: Flag | None = Field(
        default=None, description="Send the host name in TLS SNI (1) or not (0).")
    requirepeer: Text | None = Field(
        default=None, description="OS user the Unix-socket server runs as.")
    ssl_min_protocol_version: TlsVersion | None = Field(
        default=None, description="Lowest TLS version allowed.")
    ssl_max_protocol_version: TlsVersion | None = Field(
        default=None, description="Highest TLS version allowed.")
    krbsrvname: Text | None = Field(default=None, description="Kerberos service name.")
    gsslib: Literal["gssapi", "sspi"] | None = Field(
        default=None, description="GSS library (Windows).")
    gssdelegation: Flag | None = Field(
        default=None, description="Forward GSS credentials to the server (1) or not (0).")
    service: Text | None = Field(default=None, description="Service name in pg_service.conf.")
    target_session_attrs: Literal[
        "any", "read-write", "read-only", "primary", "standby", "prefer-standby"
    ] | None = Field(default=None, description="Which servers are acceptable.")

    @model_validator(mode="before")
    @classmethod
    def _refuse_load_balance_hosts(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "load_balance_hosts" in data:
            raise CrossFieldError([Issue(("load_balance_hosts",), LOAD_BALANCE_HOSTS_REASON)])
        return data

    @field_serializer("dsn", when_used="json")
    def _redacted_dsn(self, dsn: str | None) -> str | None:
        # JSON output is for people and logs (SecretStr fields print ********** there too).
        return None if dsn is None else redact_dsn(dsn)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # Only what differs from the defaults (seventy fields otherwise), never a clear DSN
        # password (SecretStr fields hide themselves).
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if value == field.default and name not in self.model_fields_set:
                continue
            if name == "dsn" and isinstance(value, str):
                value = redact_dsn(value)
            yield name, value


class PoolDefaults(_PoolFields):
    """The ``defaults:`` section, as given: any pool key, no cross-field checks (they apply to
    each pool once the defaults are merged in). ``model_fields_set`` holds the keys written."""


class PoolConfig(_PoolFields):
    """One pool, with the ``defaults:`` section merged in and its password resolved."""

    @model_validator(mode="after")
    def _check_pool(self) -> PoolConfig:
        issues = pool_issues(self)
        if issues:
            raise CrossFieldError(issues)
        return self

    def pool_kwargs(self, base_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Keyword arguments for ``ConnectionPool``: every pool keyword (but ``fallback``, which
        is the registry's), ``dsn``, every libpq parameter that is set, and the credential
        source (:meth:`credentials`, relative to ``base_dir``). Never ``password_env``."""
        kwargs: dict[str, Any] = self.credentials(base_dir)
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in POOL_KEYWORDS:
                if name != "fallback":
                    kwargs[name] = value
            elif name == "dsn":
                kwargs[name] = value
            elif name in LIBPQ_PARAMETERS and value is not None:
                kwargs[name] = (value.get_secret_value() if isinstance(value, SecretStr)
                                else value)
        return kwargs

    def credentials(self, base_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Where new connections get their password, as ``ConnectionPool`` keywords: one of
        ``password_file`` (read again per connection; a relative path is joined to
        ``base_dir``, the YAML file's folder, as the loader read it), ``password_provider``
        (its spec), or ``password`` in clear (from ``password``/``password_env``); empty when
        none is set. Pure: no file is read."""
        if self.password_provider is not None:
            return {"password_provider": self.password_provider}
        if self.password_file is not None:
            path = os.path.expanduser(self.password_file)
            if base_dir is not None and not os.path.isabs(path):
                path = os.path.join(os.fspath(base_dir), path)
            return {"password_file": path}
        if self.password is not None:
            return {"password": self.password.get_secret_value()}
        return {}

    def identity(self) -> tuple[tuple[str, Any], ...]:
        """What the pool's connections are: every field but the live keywords and the
        credential source (:data:`CREDENTIAL_KEYS`: changed in place), with secrets (an
        ``sslpassword``, a DSN's password) as keyed fingerprints. Two configs with equal
        identities open the same connections; safe to log."""
        items: list[tuple[str, Any]] = []
        for name in type(self).model_fields:
            if name in LIVE_KEYWORDS or name in CREDENTIAL_KEYS:
                continue
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = ("secret", _fingerprint(value.get_secret_value()))
            elif name == "dsn" and isinstance(value, str):
                value = (redact_dsn(value), _fingerprint(value))
            items.append((name, value))
        return tuple(items)

    def live(self) -> dict[str, Any]:
        """The settings a running pool takes in place (:data:`LIVE_KEYWORDS`)."""
        return {name: getattr(self, name) for name in type(self).model_fields
                if name in LIVE_KEYWORDS}


def _frozen_pools(pools: Mapping[str, PoolConfig]) -> Mapping[str, PoolConfig]:
    return MappingProxyType(dict(pools))


def _serialize_pools(
    pools: Mapping[str, PoolConfig], handler: SerializerFunctionWrapHandler
) -> Any:
    return handler(dict(pools))


class RegistryConfig(ConfigModel):
    """The whole file. ``pools`` holds every pool with ``defaults`` merged in (a read-only
    mapping, in file order); ``defaults`` is the section as given."""

    version: Annotated[Literal[1], BeforeValidator(digits_to_int)] = Field(
        description="Version of the file format; must be 1.")
    dns: DnsConfig | None = Field(
        default=None, description="How host names are resolved; absent: the system's resolvers.")
    defaults: PoolDefaults = Field(
        default=PoolDefaults(), description="Keys applied to every pool; a pool's own keys win.")
    pools: Annotated[
        Mapping[PoolName, PoolConfig],
        AfterValidator(_frozen_pools),
        WrapSerializer(_serialize_pools),
    ] = Field(
        default_factory=dict, description="The pools, by name.")

    @model_validator(mode="after")
    def _check_fallbacks(self) -> RegistryConfig:
        issues = fallback_issues({name: pool.fallback for name, pool in self.pools.items()})
        if issues:
            raise CrossFieldError(issues)
        return self

    def dns_settings(self) -> dict[str, Any] | None:
        """The ``dns:`` section as a plain mapping (lists as lists); ``None`` when absent."""
        return None if self.dns is None else self.dns.settings()
