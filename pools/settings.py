"""A pool's settings: their checks, which of them change live, and where each is kept.

Invariants:
- Every argument is checked before anything is built: a bad one raises ``ValueError`` naming
  the setting, its value and its limit, and nothing is left behind (no connection, no task).
- Settings split as HikariCP's do: :data:`LIVE_SETTINGS` change on a running pool
  (``ConnectionPool.retune``, a reload's retune); every other argument is connection identity,
  and a change of it means a new pool.
- A live setting lives in the part that uses it (``Setting``): the pool's attribute reads and
  writes that part's field, so there is one copy of each value.
"""

from __future__ import annotations

import math
from typing import Any

from .roles import ROLES

__all__ = [
    "LIVE_SETTINGS",
    "Setting",
    "check_arguments",
    "check_non_negative",
    "check_reuse",
    "check_sizes",
]

# Settings a running pool takes in place; everything else is connection identity.
LIVE_SETTINGS = frozenset({
    "minconn", "maxconn", "idle_timeout", "reap_idle_interval", "lifetime_timeout",
    "lifetime_jitter", "test_on_borrow", "background_prewarm", "timeout", "max_waiting",
    "reuse", "validation_bypass", "reconnect_backoff", "reconnect_backoff_max", "placement",
    "address_ban", "address_ban_max", "rebalance_fraction", "rebalance_interval",
    "role_check_interval", "leak_detection_threshold", "ping_timeout", "recycle",
    "dns_membership_window",
    "max_replica_lag",
})


class Setting:
    """A live setting of the pool, kept by the part that uses it (``part``.``attr``)."""

    def __init__(self, part: str, attr: str) -> None:
        self.part = part
        self.attr = attr

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.part), self.attr)

    def __set__(self, obj: object, value: Any) -> None:
        setattr(getattr(obj, self.part), self.attr, value)


def check_arguments(
    *,
    minconn: int,
    maxconn: int | float,
    timeout: float,
    idle_timeout: float | None,
    reap_idle_interval: float,
    lifetime_timeout: float | None,
    validation_bypass: float,
    reconnect_backoff: float,
    lifetime_jitter: float,
    reuse: str,
    max_waiting: int,
    role: str,
    rebalance_fraction: float,
) -> None:
    """The checks of ``ConnectionPool``'s arguments; ``ValueError`` on the first bad one."""
    check_sizes(minconn, maxconn)
    check_non_negative(
        timeout=timeout,
        idle_timeout=idle_timeout,
        reap_idle_interval=reap_idle_interval,
        lifetime_timeout=lifetime_timeout,
        validation_bypass=validation_bypass,
        reconnect_backoff=reconnect_backoff,
    )
    if not 0 <= lifetime_jitter < 1:
        raise ValueError(f"lifetime_jitter must be in [0, 1), got {lifetime_jitter!r}")
    check_reuse(reuse)
    if max_waiting < 0:
        raise ValueError(f"max_waiting must be >= 0, got {max_waiting!r}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not 0 < rebalance_fraction <= 1:
        raise ValueError(f"rebalance_fraction must be in (0, 1], got {rebalance_fraction!r}")


def check_sizes(minconn: int, maxconn: int | float) -> None:
    """``minconn`` an integer >= 0, ``maxconn`` an integer >= 1 (or inf), min <= max."""
    if not isinstance(minconn, int) or isinstance(minconn, bool) or minconn < 0:
        raise ValueError(f"minconn must be an integer >= 0, got {minconn!r}")
    if not (maxconn == math.inf or (isinstance(maxconn, int) and not isinstance(maxconn, bool))):
        raise ValueError(f"maxconn must be an integer >= 1 (or inf), got {maxconn!r}")
    if maxconn < 1:
        raise ValueError(f"maxconn must be >= 1, got {maxconn!r}")
    if minconn > maxconn:
        raise ValueError(f"minconn ({minconn}) must not exceed maxconn ({maxconn})")


def check_non_negative(**values: float | None) -> None:
    for key, value in values.items():
        if value is not None and value < 0:
            raise ValueError(f"{key} must be >= 0, got {value!r}")


def check_reuse(reuse: str) -> None:
    if reuse not in ("fifo", "lifo"):
        raise ValueError(f"reuse must be 'fifo' or 'lifo', got {reuse!r}")
