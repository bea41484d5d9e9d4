"""psqlpy's pool surface, synchronous, over :class:`~pgregistry.pools.ConnectionPool`.

Code written against psqlpy's ``ConnectionPool`` keeps its parameter names and calls; each
``await x(...)`` becomes ``x(...)`` and each ``async with``/``async for`` a plain ``with``/
``for``:

- ``ConnectionPool(...)`` / ``connect(...)``: psqlpy's keywords (``dsn``, ``username``,
  ``password``, ``host``/``hosts``, ``port``/``ports``, ``db_name``, ``target_session_attrs``,
  ``options``, ``application_name``, ``connect_timeout_sec``/``_nanosec``,
  ``tcp_user_timeout_sec``/``_nanosec``, ``keepalives``, ``keepalives_idle_sec``/``_nanosec``,
  ``keepalives_interval_sec``/``_nanosec``, ``keepalives_retries``, ``load_balance_hosts``,
  ``max_db_pool_size``, ``conn_recycling_method``, ``ssl_mode``, ``ca_file``), mapped to
  libpq's parameters. As in psqlpy, a given ``dsn`` makes ``username``, ``password``,
  ``host``, ``hosts``, ``port``, ``ports``, ``db_name`` and ``target_session_attrs`` ignored.
  Like psqlpy's, the pool opens connections on demand (``minconn`` 0).
- ``connection()`` -> :class:`Connection` (give it back with ``back_to_pool()``), ``acquire()``
  as a context manager, ``execute``/``fetch`` on the pool, ``resize(new_max_size)``,
  ``status()`` (``max_size``, ``size``, ``available``, ``waiting``), ``listener()``,
  ``close()``, ``with ConnectionPool(...) as pool``.
- :class:`Connection`: ``execute``, ``fetch``, ``execute_many``, ``fetch_row``, ``fetch_val``
  with psqlpy's ``$1, $2, ...`` placeholders, results as :class:`QueryResult` (``result()``:
  a list of dicts). Each call commits on success and rolls back on error (psqlpy runs
  statements outside explicit transactions); ``execute_many`` is atomic.
- ``conn_recycling_method``: ``Fast`` (returned as it is after the rollback), ``Verified``
  (pinged on checkout), ``Clean`` (``DISCARD ALL`` on return): see the README's "Recycling".

Not provided: transactions, cursors, prepared statements and row factories of psqlpy's
``Connection`` (use ``Connection.raw``, the psycopg2 connection, for those).
"""

from __future__ import annotations

import enum
import math
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras

from ..pools.errors import PoolError
from ..pools.listener import Gap
from ..pools.listener import Listener as _Listener
from ..pools.pool import ConnectionPool as _Pool

__all__ = [
    "ConnRecyclingMethod",
    "Connection",
    "ConnectionPool",
    "ConnectionPoolStatus",
    "Listener",
    "ListenerNotificationMsg",
    "LoadBalanceHosts",
    "QueryResult",
    "SingleQueryResult",
    "SslMode",
    "TargetSessionAttrs",
    "connect",
]


class ConnRecyclingMethod(enum.Enum):
    """psqlpy's recycling methods, by their names."""

    Fast = "fast"
    Verified = "verified"
    Clean = "clean"


class SslMode(enum.Enum):
    Disable = "disable"
    Allow = "allow"
    Prefer = "prefer"
    Require = "require"
    VerifyCa = "verify-ca"
    VerifyFull = "verify-full"


class TargetSessionAttrs(enum.Enum):
    Any = "any"
    ReadWrite = "read-write"
    ReadOnly = "read-only"


class LoadBalanceHosts(enum.Enum):
    Disable = "disable"
    Random = "random"


# Parameters psqlpy ignores when a dsn is given (its documented rule).
_OVERRIDDEN_BY_DSN = ("username", "password", "host", "hosts", "port", "ports", "db_name",
                      "target_session_attrs")

_PLACEHOLDER = re.compile(r"\$(\d+)")


def _value(x: Any) -> Any:
    return x.value if isinstance(x, enum.Enum) else x


def _seconds(sec: int | None, nanosec: int | None, name: str) -> float | None:
    if sec is None:
        if nanosec is not None:
            raise ValueError(f"{name}_nanosec can be used only with {name}_sec")
        return None
    return sec + (nanosec or 0) / 1e9


def _join(one: Any, many: Sequence[Any] | None, name: str) -> str | None:
    if one is not None and many is not None:
        raise ValueError(f"give {name} or {name}s, not both")
    if many is not None:
        return ",".join(str(x) for x in many)
    return None if one is None else str(one)


def libpq_params(
    *,
    dsn: str | None = None,
    username: str | None = None,
    password: str | None = None,
    host: str | None = None,
    hosts: Sequence[str] | None = None,
    port: int | None = None,
    ports: Sequence[int] | None = None,
    db_name: str | None = None,
    target_session_attrs: TargetSessionAttrs | str | None = None,
    options: str | None = None,
    application_name: str | None = None,
    connect_timeout_sec: int | None = None,
    connect_timeout_nanosec: int | None = None,
    tcp_user_timeout_sec: int | None = None,
    tcp_user_timeout_nanosec: int | None = None,
    keepalives: bool | None = None,
    keepalives_idle_sec: int | None = None,
    keepalives_idle_nanosec: int | None = None,
    keepalives_interval_sec: int | None = None,
    keepalives_interval_nanosec: int | None = None,
    keepalives_retries: int | None = None,
    load_balance_hosts: LoadBalanceHosts | str | None = None,
    ssl_mode: SslMode | str | None = None,
    ca_file: str | None = None,
) -> tuple[str | None, dict[str, Any], str]:
    """psqlpy's connection keywords as (dsn, libpq keywords, placement). libpq counts
    ``connect_timeout``, ``keepalives_idle`` and ``keepalives_interval`` in whole seconds
    (rounded up here) and ``tcp_user_timeout`` in milliseconds."""
    kw: dict[str, Any] = {}
    if dsn is None:
        kw["user"] = username
        kw["password"] = password
        kw["host"] = _join(host, hosts, "host")
        kw["port"] = _join(port, ports, "port")
        kw["dbname"] = db_name
        kw["target_session_attrs"] = _value(target_session_attrs)
    kw["options"] = options
    kw["application_name"] = application_name
    timeout = _seconds(connect_timeout_sec, connect_timeout_nanosec, "connect_timeout")
    if timeout is not None:
        kw["connect_timeout"] = math.ceil(timeout)
    user_timeout = _seconds(tcp_user_timeout_sec, tcp_user_timeout_nanosec, "tcp_user_timeout")
    if user_timeout is not None:
        kw["tcp_user_timeout"] = math.ceil(user_timeout * 1000)
    if keepalives is not None:
        kw["keepalives"] = 1 if keepalives else 0
    idle = _seconds(keepalives_idle_sec, keepalives_idle_nanosec, "keepalives_idle")
    if idle is not None:
        kw["keepalives_idle"] = math.ceil(idle)
    interval = _seconds(keepalives_interval_sec, keepalives_interval_nanosec,
                        "keepalives_interval")
    if interval is not None:
        kw["keepalives_interval"] = math.ceil(interval)
    kw["keepalives_count"] = keepalives_retries
    kw["sslmode"] = _value(ssl_mode)
    kw["sslrootcert"] = ca_file
    balance = _value(load_balance_hosts) or "disable"
    if balance not in ("disable", "random"):
        raise ValueError(f"load_balance_hosts must be disable or random, got {balance!r}")
    placement = "random" if balance == "random" else "least_connections"
    return dsn, {k: v for k, v in kw.items() if v is not None}, placement


def _recycling(method: ConnRecyclingMethod | str | None) -> str:
    value = _value(method) or "fast"
    value = str(value).lower()
    if value not in ("fast", "verified", "clean"):
        raise ValueError(f"conn_recycling_method must be Fast, Verified or Clean, got {method!r}")
    return value


def _sql(querystring: str) -> str:
    """psqlpy's ``$1``-style placeholders as psycopg2's named ones (``%`` kept literal)."""
    return _PLACEHOLDER.sub(lambda m: f"%(p{m.group(1)})s", querystring.replace("%", "%%"))


def _args(parameters: Sequence[Any] | None) -> dict[str, Any] | None:
    if parameters is None:
        return None
    return {f"p{i}": v for i, v in enumerate(parameters, 1)}


class QueryResult:
    """Rows of a statement; ``result()`` gives them as a list of dicts (column -> value)."""

    __slots__ = ("_rows",)

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self._rows = rows

    def result(self) -> list[dict[str, Any]]:
        return list(self._rows)

    def as_class(self, as_class: Callable[..., Any]) -> list[Any]:
        """Each row as ``as_class(**row)``."""
        return [as_class(**row) for row in self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"<QueryResult {len(self._rows)} rows>"


class SingleQueryResult:
    """One row; ``result()`` gives it as a dict."""

    __slots__ = ("_row",)

    def __init__(self, row: dict[str, Any]) -> None:
        self._row = row

    def result(self) -> dict[str, Any]:
        return dict(self._row)

    def as_class(self, as_class: Callable[..., Any]) -> Any:
        return as_class(**self._row)


@dataclass(frozen=True)
class ConnectionPoolStatus:
    """psqlpy's four figures of a pool."""

    max_size: int | float
    size: int
    available: int
    waiting: int


class Connection:
    """One connection taken from the pool (psqlpy's ``Connection``), until ``back_to_pool()``
    (or the end of the ``with pool.acquire()`` block). ``raw`` is the psycopg2 connection."""

    def __init__(self, pool: ConnectionPool, raw: ext.connection) -> None:
        self._pool = pool
        self._raw: ext.connection | None = raw
        self._lock = threading.Lock()

    @property
    def raw(self) -> ext.connection:
        if self._raw is None:
            raise PoolError("the connection was given back to the pool", pool=self._pool.name)
        return self._raw

    def _run(self, querystring: str, parameters: Sequence[Any] | None,
             many: Sequence[Sequence[Any]] | None = None) -> list[dict[str, Any]]:
        conn = self.raw
        with self._lock:
            try:
                with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                    if many is not None:
                        cur.executemany(_sql(querystring), [_args(p) for p in many])
                        rows: list[dict[str, Any]] = []
                    else:
                        cur.execute(_sql(querystring), _args(parameters))
                        rows = [dict(r) for r in cur.fetchall()] if cur.description else []
                if not conn.autocommit:
                    conn.commit()
                return rows
            except BaseException:
                if not conn.closed and not conn.autocommit:
                    conn.rollback()
                raise

    def execute(self, querystring: str, parameters: Sequence[Any] | None = None,
                prepared: bool | None = None) -> QueryResult:
        """Run one statement (``$1``... placeholders); its rows. ``prepared`` is accepted for
        psqlpy's signature (psycopg2 sends statements unprepared)."""
        return QueryResult(self._run(querystring, parameters))

    fetch = execute

    def execute_many(self, querystring: str, parameters: Sequence[Sequence[Any]] | None = None,
                     prepared: bool | None = None) -> None:
        """Run one statement per parameter list, all or none (one transaction)."""
        self._run(querystring, None, many=list(parameters or []))

    def fetch_row(self, querystring: str, parameters: Sequence[Any] | None = None,
                  prepared: bool | None = None) -> SingleQueryResult:
        """The one row of a statement; raises ``PoolError`` unless exactly one came back."""
        rows = self._run(querystring, parameters)
        if len(rows) != 1:
            raise PoolError(f"fetch_row: expected exactly one row, got {len(rows)}",
                            pool=self._pool.name)
        return SingleQueryResult(rows[0])

    def fetch_val(self, querystring: str, parameters: Sequence[Any] | None = None,
                  prepared: bool | None = None) -> Any:
        """The first column of the one row of a statement."""
        row = self.fetch_row(querystring, parameters).result()
        return next(iter(row.values()))

    def back_to_pool(self) -> None:
        """Give the connection back (idempotent); an open transaction is rolled back."""
        raw, self._raw = self._raw, None
        if raw is not None:
            self._pool.pool.putconn(raw)

    close = back_to_pool

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.back_to_pool()


@dataclass(frozen=True)
class ListenerNotificationMsg:
    """One notification, with psqlpy's field names."""

    process_id: int
    channel: str
    payload: str


ListenerCallback = Callable[[Connection | None, str, str, int], None]


class Listener:
    """psqlpy's ``Listener``, synchronous, over the pool's listener (a dedicated connection
    that reconnects after a failover). psqlpy's ``listen()`` runs in the background of its
    event loop; here :meth:`listen` runs the callbacks in the calling thread until
    :meth:`abort_listen` (from another thread) or its ``timeout``; or iterate the listener."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._inner: _Listener | None = None
        self._callbacks: dict[str, list[ListenerCallback]] = {}
        self._abort = threading.Event()

    @property
    def is_started(self) -> bool:
        return self._inner is not None and not self._inner.closed

    @property
    def connection(self) -> ext.connection:
        """The listening psycopg2 connection (raises ``PoolError`` before ``startup()``)."""
        inner = self._started()
        conn = inner._conn
        if conn is None:
            raise PoolError("the listener is reconnecting", pool=self._pool.name)
        return conn

    def startup(self) -> None:
        """Open the listening connection and LISTEN to every channel with callbacks."""
        if self.is_started:
            raise PoolError("the listener is already started", pool=self._pool.name)
        pool = self._pool.pool
        self._inner = _Listener(lambda: pool)
        for channel in self._callbacks:
            self._inner.listen(channel)

    def shutdown(self) -> None:
        """Stop listening and close the connection."""
        self.abort_listen()
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.close()

    def add_callback(self, channel: str, callback: ListenerCallback) -> None:
        """Call ``callback(connection, payload, channel, process_id)`` for each notification
        of ``channel`` (the connection argument is ``None``: the listening connection is not
        the application's to use)."""
        self._callbacks.setdefault(channel, []).append(callback)
        if self.is_started:
            self._started().listen(channel)

    def clear_channel_callbacks(self, channel: str) -> None:
        self._callbacks.pop(channel, None)
        if self.is_started:
            self._started().unlisten(channel)

    def clear_all_channels(self) -> None:
        self._callbacks.clear()
        if self.is_started:
            self._started().unlisten()

    def listen(self, timeout: float | None = None) -> None:
        """Run the callbacks in this thread until :meth:`abort_listen` or ``timeout`` s."""
        self._abort.clear()
        inner = self._started()
        deadline = None if timeout is None else _now() + timeout
        while not self._abort.is_set():
            step = 0.5 if deadline is None else min(0.5, deadline - _now())
            if step <= 0:
                return
            for item in inner.notifications(timeout=step):
                if isinstance(item, Gap):
                    continue
                for cb in list(self._callbacks.get(item.channel, ())):
                    cb(None, item.payload, item.channel, item.pid)
                if self._abort.is_set():
                    return

    def abort_listen(self) -> None:
        self._abort.set()

    def __iter__(self) -> Iterator[ListenerNotificationMsg]:
        inner = self._started()
        for item in inner.notifications():
            if not isinstance(item, Gap):
                yield ListenerNotificationMsg(item.pid, item.channel, item.payload)

    def _started(self) -> _Listener:
        if self._inner is None or self._inner.closed:
            raise PoolError("the listener is not started: call startup() first",
                            pool=self._pool.name)
        return self._inner


def _now() -> float:
    import time

    return time.monotonic()


class _Acquire:
    __slots__ = ("_pool", "_conn")

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._conn: Connection | None = None

    def __enter__(self) -> Connection:
        self._conn = self._pool.connection()
        return self._conn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.back_to_pool()


class ConnectionPool:
    """psqlpy's ``ConnectionPool``, synchronous (see the module's docstring for the mapping).

    :param max_db_pool_size: most connections (default 2, psqlpy's).
    :param conn_recycling_method: ``ConnRecyclingMethod.Fast`` (default), ``Verified`` or
        ``Clean`` (or their names).
    :param pool_kwargs: any other :class:`~pgregistry.pools.ConnectionPool` keyword
        (``timeout``, ``lifetime_timeout``, ``name``, ...).
    :raises ValueError: contradictory or malformed parameters.
    """

    def __init__(
        self,
        dsn: str | None = None,
        username: str | None = None,
        password: str | None = None,
        host: str | None = None,
        hosts: Sequence[str] | None = None,
        port: int | None = None,
        ports: Sequence[int] | None = None,
        db_name: str | None = None,
        target_session_attrs: TargetSessionAttrs | str | None = None,
        options: str | None = None,
        application_name: str | None = None,
        connect_timeout_sec: int | None = None,
        connect_timeout_nanosec: int | None = None,
        tcp_user_timeout_sec: int | None = None,
        tcp_user_timeout_nanosec: int | None = None,
        keepalives: bool | None = None,
        keepalives_idle_sec: int | None = None,
        keepalives_idle_nanosec: int | None = None,
        keepalives_interval_sec: int | None = None,
        keepalives_interval_nanosec: int | None = None,
        keepalives_retries: int | None = None,
        load_balance_hosts: LoadBalanceHosts | str | None = None,
        max_db_pool_size: int = 2,
        conn_recycling_method: ConnRecyclingMethod | str | None = None,
        ssl_mode: SslMode | str | None = None,
        ca_file: str | None = None,
        **pool_kwargs: Any,
    ) -> None:
        if max_db_pool_size < 1:
            raise ValueError(f"max_db_pool_size must be at least 1, got {max_db_pool_size!r}")
        dsn, params, placement = libpq_params(
            dsn=dsn, username=username, password=password, host=host, hosts=hosts, port=port,
            ports=ports, db_name=db_name, target_session_attrs=target_session_attrs,
            options=options, application_name=application_name,
            connect_timeout_sec=connect_timeout_sec,
            connect_timeout_nanosec=connect_timeout_nanosec,
            tcp_user_timeout_sec=tcp_user_timeout_sec,
            tcp_user_timeout_nanosec=tcp_user_timeout_nanosec, keepalives=keepalives,
            keepalives_idle_sec=keepalives_idle_sec,
            keepalives_idle_nanosec=keepalives_idle_nanosec,
            keepalives_interval_sec=keepalives_interval_sec,
            keepalives_interval_nanosec=keepalives_interval_nanosec,
            keepalives_retries=keepalives_retries, load_balance_hosts=load_balance_hosts,
            ssl_mode=ssl_mode, ca_file=ca_file,
        )
        self.conn_recycling_method = _recycling(conn_recycling_method)
        pool_kwargs.setdefault("minconn", 0)  # psqlpy's pool opens connections on demand
        pool_kwargs.setdefault("placement", placement)
        pool_kwargs.setdefault("recycle", self.conn_recycling_method)
        self._pool = _Pool(maxconn=max_db_pool_size, dsn=dsn, **params, **pool_kwargs)

    @property
    def pool(self) -> _Pool:
        """The :class:`~pgregistry.pools.ConnectionPool` underneath (stats, ...)."""
        return self._pool

    @property
    def name(self) -> str:
        return self._pool.name

    def connection(self, timeout: float | None = None) -> Connection:
        """A connection of the pool, until its ``back_to_pool()``."""
        return Connection(self, self._pool.getconn(timeout))

    def acquire(self) -> _Acquire:
        """``with pool.acquire() as connection:``, given back at the end of the block."""
        return _Acquire(self)

    def execute(self, querystring: str, parameters: Sequence[Any] | None = None,
                prepared: bool | None = None) -> QueryResult:
        """One statement on a connection taken for it and given back."""
        with self.acquire() as conn:
            return conn.execute(querystring, parameters, prepared)

    fetch = execute

    def resize(self, new_max_size: int) -> None:
        """Change the most connections; excess ones close as they come back."""
        if new_max_size < 1:
            raise ValueError(f"new_max_size must be at least 1, got {new_max_size!r}")
        self._pool.resize(new_max_size, minconn=min(self._pool.minconn, new_max_size))

    def status(self) -> ConnectionPoolStatus:
        s = self._pool.status()
        return ConnectionPoolStatus(s["max_size"], int(s["size"]), int(s["available"]),
                                    int(s["waiting"]))

    def listener(self) -> Listener:
        """A :class:`Listener` (call its ``startup()``)."""
        return Listener(self)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<psqlpy-style ConnectionPool over {self._pool!r}>"


def connect(**kwargs: Any) -> ConnectionPool:
    """psqlpy's ``connect()``: the same parameters as :class:`ConnectionPool`."""
    return ConnectionPool(**kwargs)
