"""Reload planning: what a new configuration changes, pool by pool (pure: no I/O).

- unchanged: the same settings -> the same pool object, its connections untouched;
- retuned: only settings a running pool takes in place changed (sizes, timeouts, ...), or the
  file's ``dns`` section changed -> applied to the running pool;
- replaced: connection identity changed (host, port, dbname, user, password, dsn, TLS,
  target_session_attrs, ...) -> a new pool takes the name, the old one drains;
- removed: drained and closed; added: built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .schemas import RegistryConfig

__all__ = ["ReloadPlan", "ReloadResult", "plan_reload"]


@dataclass(frozen=True)
class ReloadPlan:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    retuned: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    dns_changed: bool = False

    @property
    def changes_nothing(self) -> bool:
        return not (self.added or self.removed or self.replaced or self.retuned)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "replaced": list(self.replaced),
            "retuned": list(self.retuned),
            "unchanged": list(self.unchanged),
        }

    def summary(self) -> str:
        parts = [f"{k} {', '.join(v)}" for k, v in self.as_dict().items() if v and k != "unchanged"]
        if self.dns_changed:
            parts.append("dns settings changed")
        return "; ".join(parts) if parts else "nothing changed"


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did (its plan), and the generation it produced."""

    plan: ReloadPlan
    generation: int
    duration_s: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name in ("added", "removed", "replaced", "retuned", "unchanged", "changes_nothing"):
            return getattr(self.plan, name)
        raise AttributeError(name)

    def as_dict(self) -> dict[str, Any]:
        return {**self.plan.as_dict(), "generation": self.generation,
                "duration_s": self.duration_s}

    def __str__(self) -> str:
        return f"generation {self.generation}: {self.plan.summary()}"


def plan_reload(old: RegistryConfig, new: RegistryConfig) -> ReloadPlan:
    """Compare two validated configurations pool by pool."""
    dns_changed = old.dns_settings() != new.dns_settings()
    added, replaced, retuned, unchanged = [], [], [], []
    for name, pool in new.pools.items():
        before = old.pools.get(name)
        if before is None:
            added.append(name)
        elif before.identity() != pool.identity():
            replaced.append(name)
        elif before != pool or dns_changed:
            retuned.append(name)
        else:
            unchanged.append(name)
    removed = [name for name in old.pools if name not in new.pools]
    return ReloadPlan(
        added=tuple(added),
        removed=tuple(removed),
        replaced=tuple(replaced),
        retuned=tuple(retuned),
        unchanged=tuple(unchanged),
        dns_changed=dns_changed,
    )
