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

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .addresses import AddressBook, check_membership_window
from .roles import ROLES

if TYPE_CHECKING:
    from .bag import Bag
    from .maintenance import Maintenance
    from .pool import ConnectionPool
    from .returning import Restorer

__all__ = [
    "LIVE_SETTINGS",
    "Setting",
    "apply_checkout_settings",
    "check_arguments",
    "check_non_negative",
    "check_reuse",
    "check_sizes",
    "retune",
]

logger = logging.getLogger(__name__)

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


def retune(pool: ConnectionPool, bag: Bag, book: AddressBook, wake: Callable[[], None],
           settings: dict[str, Any]) -> None:
    """Apply live ``settings`` to ``pool`` in place (``ConnectionPool.retune``): the address
    book's placement and bans, the bag's reuse order, then each setting by name (through its
    ``Setting``), ``recycle`` last (it decides ``test_on_borrow``), and the sizes through
    ``pool.resize``. Raises ``ValueError`` for a setting not in :data:`LIVE_SETTINGS` or a
    negative value, before anything changes. ``wake`` asks for a maintenance step."""
    unknown = set(settings) - pool.LIVE_SETTINGS
    if unknown:
        raise ValueError(f"cannot change {sorted(unknown)} on a running pool")
    settings = dict(settings)
    maxconn = settings.pop("maxconn", pool.maxconn)
    minconn = settings.pop("minconn", pool.minconn)
    check_non_negative(**{k: v for k, v in settings.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if "placement" in settings:
        book.set_placement(settings.pop("placement"))
    if "address_ban" in settings or "address_ban_max" in settings:
        book.set_bans(settings.pop("address_ban", book.ban_initial),
                      settings.pop("address_ban_max", book.ban_max))
    if "reuse" in settings:
        reuse = settings.pop("reuse")
        check_reuse(reuse)
        bag.set_reuse(reuse == "fifo")
    settings.pop("background_prewarm", None)  # only meaningful at start
    recycle = settings.pop("recycle", pool.recycle)
    if "dns_membership_window" in settings:
        check_membership_window(settings["dns_membership_window"])
    for key, value in settings.items():
        setattr(pool, key, value)
    pool.recycle = recycle  # last: a recycle mode decides test_on_borrow
    if (maxconn, minconn) != (pool.maxconn, pool.minconn):
        pool.resize(maxconn, minconn)
    else:
        wake()
    logger.info("pool %s: retuned %s", pool.name, sorted(settings) or "sizes")


def apply_checkout_settings(bag: Bag, restorer: Restorer, maintenance: Maintenance, *,
                            ping_after: float, leak_threshold: float | None, role: str,
                            recycle: str | None) -> None:
    """What the hot path needs from the settings: ``ping_after`` (seconds since return past
    which a checkout pings; ``inf``: never), whether every checkout takes the slow path (a
    role, leak detection, timings) and every return (a reset, a role check, ``recycle``
    ``clean``, timings), and leak detection's hooks; then every idle connection's
    ``fresh_until`` is recomputed."""
    bag.ping_after = ping_after
    bag.always_slow = role != "any" or bool(leak_threshold) or bag.timings is not None
    bag.return_hooks = (restorer.reset is not None or restorer.role_changed is not None
                        or recycle == "clean" or bag.timings is not None)
    bag.on_slow_checkout = maintenance.note_checkout if leak_threshold else None
    maintenance.leak_threshold = leak_threshold
    bag.refresh_fresh_until()
