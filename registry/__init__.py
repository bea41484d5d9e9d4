"""pgregistry's registry: named pools from one YAML file, reloaded on SIGHUP.

    from registry import Registry, UnknownPoolError
    reg = Registry.from_yaml("pools.yaml")
    with reg.get("readers").conn() as conn: ...
"""

from .metrics import (
    MetricsServer,
    metrics_text,
    pool_metrics,
    registry_metrics,
    start_metrics_server,
)
from .registry import PoolHandle, Registry, UnknownPoolError
from .reload import ReloadPlan, ReloadResult, plan_reload

__all__ = ["Registry", "PoolHandle", "UnknownPoolError", "ReloadPlan", "ReloadResult",
           "plan_reload", "metrics_text", "registry_metrics", "pool_metrics", "MetricsServer",
           "start_metrics_server"]
