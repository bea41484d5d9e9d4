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

from pydantic import SecretStr

from .schemas import DnsConfig, RegistryConfig
from .schemas.dsn import redact_dsn

__all__ = ["ReloadPlan", "ReloadResult", "changed_settings", "plan_reload"]

_SHOWN_MAX = 60  # longer values are only said to have changed


@dataclass(frozen=True)
class ReloadPlan:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    retuned: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    dns_changed: bool = False
    #: pool name -> the settings that changed ("maxconn 10 -> 20", "password changed"), for
    #: the retuned and replaced pools; "dns" -> the resolver settings that changed
    changes: dict[str, tuple[str, ...]] = field(default_factory=dict)

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
        """What changed and only that: ``retuned readers (maxconn 10 -> 20); added audit``."""
        parts = []
        for kind, names in self.as_dict().items():
            if not names or kind == "unchanged":
                continue
            if kind == "retuned" and self.dns_changed:  # retuned for the dns alone: said below
                names = [name for name in names if self.changes.get(name)]
            shown = [f"{name} ({', '.join(self.changes[name])})" if self.changes.get(name)
                     else name for name in names]
            if shown:
                parts.append(f"{kind} {', '.join(shown)}")
        if self.dns_changed:
            dns = self.changes.get("dns")
            parts.append(f"dns ({', '.join(dns)})" if dns else "dns settings changed")
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


def _shown(name: str, value: Any) -> str | None:
    """A setting's value for the log, or ``None`` when it must not (or cannot) be shown."""
    if isinstance(value, SecretStr) or "password" in name:
        return None
    if name == "dsn" and isinstance(value, str):
        value = redact_dsn(value)
    text = "null" if value is None else str(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= _SHOWN_MAX else None


def changed_settings(before: Any, after: Any) -> tuple[str, ...]:
    """The settings that differ between two pool (or dns) configs, in field order:
    ``"maxconn 10 -> 20"``, or ``"password changed"`` for secrets and long values."""
    out = []
    for name in type(after).model_fields:
        old, new = getattr(before, name), getattr(after, name)
        if old == new:
            continue
        if isinstance(old, SecretStr) and isinstance(new, SecretStr) and \
                old.get_secret_value() == new.get_secret_value():
            continue
        a, b = _shown(name, old), _shown(name, new)
        out.append(f"{name} {a} -> {b}" if a is not None and b is not None
                   else f"{name} changed")
    return tuple(out)


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
    changes: dict[str, tuple[str, ...]] = {
        name: changed_settings(old.pools[name], new.pools[name]) for name in replaced + retuned}
    if dns_changed:
        changes["dns"] = changed_settings(old.dns or DnsConfig(), new.dns or DnsConfig())
    return ReloadPlan(
        changes=changes,
        added=tuple(added),
        removed=tuple(removed),
        replaced=tuple(replaced),
        retuned=tuple(retuned),
        unchanged=tuple(unchanged),
        dns_changed=dns_changed,
    )
