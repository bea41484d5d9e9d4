"""What the metrics integrations read: labelled ``stats()`` snapshots of a registry or of
standalone pools, taken when a scraper or an exporter asks (never on a timer of our own).

The integrations themselves live beside this module, each behind an optional extra, so that the
base install gains no dependency and ``stats()`` stays the interface without them:

- :mod:`pgregistry.prometheus` (``pip install 'pgregistry[prometheus]'``): a
  ``prometheus_client`` collector, ``registry.register_prometheus()``;
- :mod:`pgregistry.otel` (``pip install 'pgregistry[otel]'``): OpenTelemetry instruments with the
  database client connection pool conventions, ``registry.instrument_otel()``.

This module imports neither library.
"""

from __future__ import annotations

import importlib
import logging
import weakref
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any, Protocol

__all__ = ["CLOSE_REASONS", "CONNECTION_STATES", "StatsSource", "require_extra"]

logger = logging.getLogger(__name__)

#: Why pools close connections. Each is exposed (at 0 until it happens) so that ``rate()`` and
#: ``increase()`` see the first one; a reason not listed here is exposed once it occurs.
CLOSE_REASONS = (
    "idle", "lifetime", "broken", "validation", "garbage_collected", "requested", "resize",
    "pool_closed", "dns_change", "topology_change", "rebalance", "role_change", "demoted_writer",
    "cleared", "reset_failed",
)

#: The states of a pool's connections in ``stats()``: idle, checked out, being opened.
CONNECTION_STATES = ("idle", "in_use", "opening")


class _HasStats(Protocol):
    def stats(self) -> Mapping[str, Any]: ...


class StatsSource:
    """The pools one integration reports on: a registry's (labelled by their names in the
    registry, which follow reloads) or standalone pools (labelled by ``stats()["name"]``).

    ``snapshot()`` returns ``({pool label: pool stats}, registry stats or None)``; a registry's
    pools are read through ``registry.stats()``, so a reload is seen at the next read.

    The source holds its registry or pools weakly: one that is closed or dropped disappears from
    the next read, and a collector left registered never keeps it alive.
    """

    def __init__(self, registry: _HasStats | None = None, pools: tuple[_HasStats, ...] = ()):
        if (registry is None) == (not pools):
            raise TypeError("give either a registry or one or more pools")
        self._registry: weakref.ref[Any] | None = (
            weakref.ref(registry) if registry is not None else None)
        self._pools = tuple(weakref.ref(p) for p in pools)

    @classmethod
    def of_registry(cls, registry: _HasStats) -> StatsSource:
        return cls(registry=registry)

    @classmethod
    def of_pools(cls, *pools: _HasStats) -> StatsSource:
        """Standalone pools. Of two pools with the same name only the first is reported (a
        warning is logged at each read). Raises ``TypeError`` for anything without
        ``stats()``."""
        for pool in pools:
            if not callable(getattr(pool, "stats", None)):
                raise TypeError(f"not a pool (no stats()): {pool!r}")
        return cls(pools=tuple(pools))

    @property
    def registry(self) -> Any:
        """The registry behind the source (None for standalone pools, or once it is gone)."""
        return self._registry() if self._registry is not None else None

    @property
    def pools(self) -> tuple[Any, ...]:
        """The pool objects behind the source right now (a registry's current generation)."""
        if self._registry is not None:
            reg = self._registry()
            if reg is None or getattr(reg, "closed", False):
                return ()
            return tuple(reg.get(name).pool for name in reg.names())
        return tuple(p for p in (ref() for ref in self._pools) if p is not None)

    def snapshot(self) -> tuple[dict[str, Mapping[str, Any]], Mapping[str, Any] | None]:
        if self._registry is not None:
            reg = self._registry()
            if reg is None or getattr(reg, "closed", False):
                return {}, None
            stats = dict(reg.stats())
            own = stats.pop("_registry", None)
            pools = {str(k): v for k, v in stats.items() if isinstance(v, Mapping)}
            return pools, own if isinstance(own, Mapping) else None
        by_name: dict[str, Mapping[str, Any]] = {}
        for pool in self.pools:
            s = pool.stats()
            name = str(s.get("name"))
            if name in by_name:
                logger.warning("metrics: two pools named %r; reporting only the first", name)
                continue
            by_name[name] = s
        return by_name, None

    def __iter__(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        return iter(self.snapshot()[0].items())


def require_extra(module: str, extra: str, integration: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{integration} needs the `{extra}` extra: pip install 'pgregistry[{extra}]' "
            f"(could not import {module}: {exc})",
            name=module,
        ) from exc
