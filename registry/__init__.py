"""pgregistry: every PostgreSQL connection pool an application needs, from one YAML file.

    from pgregistry import Registry, UnknownPoolError
    reg = Registry.from_yaml("pools.yaml")
    with reg.get("readers").conn() as conn: ...

The repository's folders map onto this package: ``registry/`` is ``pgregistry`` itself,
``pools/`` is ``pgregistry.pools``, ``schemas/`` is ``pgregistry.schemas`` and
``pools/compat/`` is ``pgregistry.compat``. Everything public is re-exported here.

Metrics: ``stats()`` without extras; ``registry.register_prometheus()`` (module
:mod:`pgregistry.prometheus`, extra ``prometheus``) and ``registry.instrument_otel()`` (module
:mod:`pgregistry.otel`, extra ``otel``) plug into what the application already exposes.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from .pools import (
    BadConnectionError,
    ConnectError,
    ConnectionPool,
    PoolClosed,
    PoolError,
    PoolTimeout,
    PoolTooManyWaiters,
)
from .registry import PoolHandle, Registry, UnknownPoolError
from .reload import ReloadPlan, ReloadResult, plan_reload
from .schemas import ConfigError, PoolConfig, RegistryConfig, load_config

try:
    __version__ = _version("pgregistry")
except PackageNotFoundError:  # pragma: no cover - running from a tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "Registry",
    "PoolHandle",
    "UnknownPoolError",
    "ConnectionPool",
    "PoolError",
    "PoolClosed",
    "PoolTimeout",
    "PoolTooManyWaiters",
    "ConnectError",
    "BadConnectionError",
    "RegistryConfig",
    "PoolConfig",
    "ConfigError",
    "load_config",
    "ReloadPlan",
    "ReloadResult",
    "plan_reload",
]
