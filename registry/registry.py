"""The Registry: named pools built from one validated configuration.

The running state is one immutable *generation* ({name: pool}, its config, its number),
swapped with a single assignment by a reload; readers never lock. ``get(name)`` returns a
handle that looks the name up at each use, so a handle kept across a reload serves the new
pool, and ``putconn`` through it always reaches the pool that gave the connection.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import psycopg2.extensions

from .handle import Fallbacks, PoolHandle
from .pools import (
    ConnectionPool,
    PoolError,
    Supervisor,
    get_supervisor,
)
from .pools.clock import Clock
from .pools.credentials import Credentials
from .pools.listener import Listener
from .reload import ReloadResult, plan_reload
from .schemas import ConfigError, PoolConfig, RegistryConfig, load_config
from .schemas.errors import Problem
from .signals import can_install_sighup as _sighup_unavailable
from .signals import install_sighup

__all__ = ["Registry", "PoolHandle", "UnknownPoolError"]

logger = logging.getLogger(__name__)

Connection = psycopg2.extensions.connection


class UnknownPoolError(KeyError):
    """No pool of that name. Lists the names that exist, and a close match."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        close = difflib.get_close_matches(name, known, n=1)
        msg = f"no pool named {name!r}; pools: {', '.join(known) or '(none)'}"
        if close:
            msg += f"; did you mean {close[0]!r}?"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class Generation:
    number: int
    config: RegistryConfig
    pools: Mapping[str, ConnectionPool]


class Registry:
    """Pools by name, from a :class:`RegistryConfig` (usually via :meth:`from_yaml`)."""

    def __init__(
        self,
        config: RegistryConfig,
        *,
        path: str | os.PathLike[str] | None = None,
        supervisor: Supervisor | None = None,
        clock: Clock | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._path = Path(path) if path is not None else None
        # relative password_file paths are read from the YAML file's folder
        self._base_dir = str(self._path.resolve().parent) if self._path is not None else None
        self._environ = environ
        self._supervisor = supervisor or get_supervisor()
        self._clock = clock
        self._reload_lock = threading.Lock()
        self._closed = False
        self._draining: list[ConnectionPool] = []
        self._handles: dict[str, PoolHandle] = {}
        self._listeners: dict[str, list[Listener]] = {}
        self._listeners_lock = threading.Lock()
        self._restore_sighup: Any = None
        self._reload_requested = False
        self._reloads = 0
        self._reload_errors = 0
        self._last_reload_at: float | None = None
        self._last_reload_error: str | None = None
        self._last_result: ReloadResult | None = None
        self._fallbacks = Fallbacks()
        self._pool_observers: list[Callable[[ConnectionPool], None]] = []
        pools = self._build_all(config, config.pools)
        self._gen = Generation(1, config, MappingProxyType(pools))
        self._fallbacks.configure(config)
        self._reload_task = self._supervisor.add_task(
            f"registry {self._path or id(self)}", self._maintain, due=float("inf")
        )
        _live_registries.add(self)
        logger.info(
            "registry%s: %d pool(s): %s", f" {self._path}" if self._path else "",
            len(pools), self._describe(config),
        )

    @classmethod
    def from_yaml(
        cls,
        path: str | os.PathLike[str],
        *,
        install_sighup: bool | None = None,
        supervisor: Supervisor | None = None,
        clock: Clock | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Registry:
        """Validate the file, build a pool per entry and register them with the supervisor.

        ``install_sighup``: ``True`` reloads on SIGHUP and raises ``RuntimeError`` before
        anything is built when that is impossible (not the main thread: Python's rule);
        ``None`` (default) reloads on SIGHUP when called from the main thread, and otherwise
        logs a warning that SIGHUP is not handled (call :meth:`reload` instead); ``False``
        leaves SIGHUP alone. Raises :class:`ConfigError` for a file it refuses."""
        reason = _sighup_unavailable()
        if install_sighup and reason is not None:
            raise RuntimeError(f"install_sighup=True: {reason}; build the registry on the main "
                               "thread, or pass install_sighup=False and call reload() yourself")
        config = load_config(path, environ=environ)
        reg = cls(config, path=path, supervisor=supervisor, clock=clock, environ=environ)
        if install_sighup is None and reason is not None:
            logger.warning("registry %s: SIGHUP is not handled (%s): call reload() to re-read "
                           "the file, or build the registry on the main thread", path, reason)
        elif install_sighup is not False:
            try:
                reg.install_sighup()
            except BaseException:
                reg.close()
                raise
        return reg

    # -- using pools ------------------------------------------------------------------------

    def get(self, name: str) -> PoolHandle:
        """A handle on the pool called ``name`` (it follows reloads)."""
        handle = self._handles.get(name)
        if handle is None:
            if self._closed:
                raise PoolError("the registry is closed")
            if name not in self._gen.pools:
                raise self._unknown(name)
            handle = self._handles.setdefault(name, PoolHandle(self, name))
        return handle

    def __getitem__(self, name: str) -> PoolHandle:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._gen.pools

    def names(self) -> list[str]:
        return list(self._gen.pools)

    @property
    def config(self) -> RegistryConfig:
        return self._gen.config

    @property
    def generation(self) -> int:
        return self._gen.number

    @property
    def path(self) -> Path | None:
        return self._path

    def _unknown(self, name: str) -> UnknownPoolError:
        return UnknownPoolError(name, list(self._gen.pools))

    def _putconn(self, name: str, conn: Connection, close: bool) -> None:
        """Give ``conn`` back to the pool that gave it: the named pool, one retired by a
        reload, or (misused handle) any other pool of this registry."""
        gen = self._gen
        current = gen.pools.get(name)
        candidates = [current] if current is not None else []
        candidates += [p for p in list(self._draining) if p is not current]
        candidates += [p for n, p in gen.pools.items() if n != name]
        for pool in candidates:
            if pool.owns(conn):
                pool.putconn(conn, close)
                if pool.closed:
                    self._prune_draining()
                return
        if current is None:
            raise self._unknown(name)
        current.putconn(conn, close)  # raises the pool's own precise error

    def stats(self) -> dict[str, Any]:
        """``{pool name: pool.stats()}``, plus ``"_registry"``: generation, reloads, the last
        reload's time, result and error, and pools still draining."""
        gen = self._gen
        out: dict[str, Any] = {name: pool.stats() for name, pool in gen.pools.items()}
        for name, s in out.items():
            fb = self._fallbacks.stats(name)
            if fb is not None:
                s["fallback"] = fb
            listeners = self._listeners_of(name)
            if listeners:
                s["listeners"] = [*s.get("listeners", []), *(lst.stats() for lst in listeners)]
        result = self._last_result
        if self._draining:
            self._prune_draining()
        out["_registry"] = {
            "path": str(self._path) if self._path else None,
            "generation": gen.number,
            "reloads": self._reloads,
            "reload_errors": self._reload_errors,
            "last_reload_at": (
                _dt.datetime.fromtimestamp(self._last_reload_at, _dt.timezone.utc).isoformat()
                if self._last_reload_at else None
            ),
            "last_reload_result": result.as_dict() if result else None,
            "last_reload_error": self._last_reload_error,
            "draining": [p.name for p in self._draining],
        }
        return out

    def add_pool_observer(self, observer: Callable[[ConnectionPool], None]) -> None:
        """Call ``observer(pool)`` for every pool of the registry now and for each pool a later
        reload builds (the metrics integrations attach their timing listeners this way)."""
        self._pool_observers.append(observer)
        for name in self.names():
            observer(self._gen.pools[name])

    def remove_pool_observer(self, observer: Callable[[ConnectionPool], None]) -> None:
        with contextlib.suppress(ValueError):
            self._pool_observers.remove(observer)

    def register_prometheus(self, collector_registry: Any = None) -> Any:
        """Expose this registry's pools (by name; reloads are followed) and its reload figures
        through prometheus_client: registers a collector with ``collector_registry`` (default:
        prometheus_client's global ``REGISTRY``) and returns it (``unregister`` it to stop).
        Needs the ``prometheus`` extra (``pip install 'pgregistry[prometheus]'``); without it,
        ImportError naming the extra. See :mod:`pgregistry.prometheus`."""
        from .prometheus import register_registry

        return register_registry(self, collector_registry)

    def instrument_otel(self, meter_provider: Any = None, *, histograms: bool = True) -> Any:
        """Report this registry's pools (pools built by later reloads too) through
        OpenTelemetry, with the database client connection pool conventions
        (``db.client.connection.*``) and ``pgregistry.*`` figures, on a meter of
        ``meter_provider`` (default: the global meter provider). Returns the instrumentation
        (``.uninstrument()`` to stop). Needs the ``otel`` extra (``pip install
        'pgregistry[otel]'``); without it, ImportError naming the extra. ``histograms=False``
        leaves out the create/wait/use time histograms, whose per-checkout recording sends the
        pools' checkouts and returns through their slow paths (see :mod:`pgregistry.otel`)."""
        from .otel import instrument_registry

        return instrument_registry(self, meter_provider, histograms=histograms)

    # -- reloading --------------------------------------------------------------------------

    def install_sighup(self) -> None:
        """Reload on SIGHUP (main thread only). The handler records the request and wakes the
        supervisor; the reload runs on the supervisor's thread."""
        if self._restore_sighup is None:
            self._restore_sighup = install_sighup(self.request_reload)

    def request_reload(self) -> None:
        """Ask for a reload on the supervisor's thread. Lock-free: safe in a signal handler."""
        self._reload_requested = True
        self._supervisor.request(self._reload_task)

    def reload(self) -> ReloadResult:
        """Read and validate the file again, then apply what changed. On any error the running
        configuration is kept as it is, the error recorded in stats, and ConfigError raised."""
        if self._path is None:
            raise PoolError("this registry was not built from a file; use apply(config)")
        with self._reload_lock:
            self._check_open()
            try:
                config = load_config(self._path, environ=self._environ)
            except ConfigError as exc:
                self._reload_failed(exc)
                raise
            return self._apply_locked(config)

    def apply(self, config: RegistryConfig) -> ReloadResult:
        """Apply a new validated configuration (what reload does after loading)."""
        with self._reload_lock:
            self._check_open()
            return self._apply_locked(config)

    def _reload_failed(self, exc: BaseException) -> None:
        self._reload_errors += 1
        self._last_reload_at = time.time()
        self._last_reload_error = str(exc)
        logger.error(
            "registry %s: reload failed, keeping generation %d as it is:\n%s",
            self._path, self._gen.number, exc,
        )

    def _apply_locked(self, config: RegistryConfig) -> ReloadResult:
        t0 = time.monotonic()
        old = self._gen
        plan = plan_reload(old.config, config)
        if plan.changes_nothing:
            result = ReloadResult(plan, old.number, time.monotonic() - t0)
            self._record(result)
            logger.info("registry %s: reload: nothing changed", self._path)
            return result
        try:
            built = self._build_all(config, {n: config.pools[n]
                                             for n in plan.added + plan.replaced})
        except ConfigError as exc:
            self._reload_failed(exc)
            raise
        dns = config.dns_settings()
        credentials = {}
        for name in plan.retuned:  # a provider that cannot be loaded changes nothing
            creds = config.pools[name].credentials(self._base_dir)
            if creds != old.config.pools[name].credentials(self._base_dir):
                try:
                    Credentials(**creds)  # checked before anything changes
                    credentials[name] = creds
                except (ValueError, TypeError, ImportError, AttributeError) as exc:
                    problem = Problem(path=f"pools.{name}", pool=name, line=None, column=None,
                                      value=None, message=str(exc))
                    error = ConfigError(str(self._path) if self._path else None, [problem])
                    for pool in built.values():
                        pool.close()
                    self._reload_failed(error)
                    raise error from None
        for name in plan.retuned:
            pool = old.pools[name]
            if name in credentials:  # new connections use the new source; open ones stay
                pool.set_credentials(**credentials[name])
            before, after = old.config.pools[name], config.pools[name]
            if before.live() != after.live():
                pool.retune(**{k: v for k, v in after.live().items()
                               if k in ConnectionPool.LIVE_SETTINGS})
            if plan.dns_changed:
                pool.set_dns(dns)
        pools = {name: built.get(name) or old.pools[name] for name in config.pools}
        self._fallbacks.configure(config)
        self._gen = Generation(old.number + 1, config, MappingProxyType(pools))
        for name in plan.replaced + plan.removed:
            self._drain(old.pools[name])
        for name in plan.removed:
            for lst in self._listeners_of(name):
                lst.close()
        result = ReloadResult(plan, self._gen.number, time.monotonic() - t0)
        self._record(result)
        logger.info("registry %s: reload to generation %d: %s", self._path, result.generation,
                    plan.summary())
        return result

    def _record(self, result: ReloadResult) -> None:
        self._reloads += 1
        self._last_reload_at = time.time()
        self._last_result = result
        self._last_reload_error = None

    def _drain(self, pool: ConnectionPool) -> None:
        """Retire a pool: idle connections close now, checked-out ones when they come back."""
        self._draining.append(pool)
        pool.close()
        self._prune_draining()
        self._supervisor.request(self._reload_task)

    def _prune_draining(self) -> None:
        self._draining = [p for p in self._draining if p.stats()["size"] > 0]

    def _maintain(self, now: float) -> float | None:
        """The registry's task on the supervisor: run a requested reload, watch draining."""
        if self._closed:
            return None
        if self._reload_requested:
            self._reload_requested = False
            try:
                self.reload()
            except ConfigError:
                pass  # logged and recorded; the running config stays
            except Exception:
                logger.exception("registry %s: reload failed", self._path)
        if self._draining:
            self._prune_draining()
        return now + 5.0 if self._draining else float("inf")

    # -- listeners --------------------------------------------------------------------------

    def _new_listener(self, handle: PoolHandle, **kwargs: Any) -> Listener:
        self._check_open()
        name = handle.name

        def forget(lst: Listener) -> None:
            with self._listeners_lock:
                kept = [x for x in self._listeners.get(name, []) if x is not lst]
                if kept:
                    self._listeners[name] = kept
                else:
                    self._listeners.pop(name, None)

        lst = Listener(lambda: handle.pool, on_close=forget, **kwargs)
        with self._listeners_lock:
            self._listeners.setdefault(name, []).append(lst)
        if self._closed:  # closed meanwhile
            lst.close()
        return lst

    def _listeners_of(self, name: str) -> list[Listener]:
        with self._listeners_lock:
            return list(self._listeners.get(name, ()))

    # -- building ---------------------------------------------------------------------------

    def _build_all(
        self, config: RegistryConfig, pools: Mapping[str, PoolConfig]
    ) -> dict[str, ConnectionPool]:
        built: dict[str, ConnectionPool] = {}
        problems: list[Problem] = []
        dns = config.dns_settings()
        for name, pc in pools.items():
            try:
                built[name] = ConnectionPool(
                    name=name, dns=dns, supervisor=self._supervisor, clock=self._clock,
                    **pc.pool_kwargs(self._base_dir),
                )
            except (ValueError, TypeError, ImportError, AttributeError) as exc:
                problems.append(Problem(path=f"pools.{name}", pool=name, line=None,
                                        column=None, value=None, message=str(exc)))
        if problems:
            for pool in built.values():
                pool.close()
            raise ConfigError(str(self._path) if self._path else None, problems)
        for observer in self._pool_observers:
            for pool in built.values():
                try:
                    observer(pool)
                except Exception:
                    logger.exception("registry: a pool observer failed on pool %s", pool.name)
        return built

    @staticmethod
    def _describe(config: RegistryConfig) -> str:
        return "; ".join(f"{name} ({pc!r})" for name, pc in config.pools.items())

    # -- closing ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError("the registry is closed")

    def close(self) -> None:
        """Close every pool (checked-out connections close when they come back) and put the
        SIGHUP handler back. Idempotent."""
        with self._reload_lock:
            if self._closed:
                return
            self._closed = True
        if self._restore_sighup is not None:
            self._restore_sighup()
            self._restore_sighup = None
        self._supervisor.unregister(self._reload_task)
        for name in list(self._listeners):
            for lst in self._listeners_of(name):
                lst.close()
        for pool in list(self._gen.pools.values()) + self._draining:
            pool.close()
        self._draining = []
        logger.info("registry %s: closed", self._path)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._gen.pools)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"generation {self._gen.number}"
        return f"<Registry {self._path or ''} pools={list(self._gen.pools)} {state}>"

    def _after_fork_in_child(self) -> None:
        self._reload_lock = threading.Lock()


_live_registries: weakref.WeakSet[Registry] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for reg in list(_live_registries):
        reg._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
