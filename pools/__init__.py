"""pgregistry pools: thread-safe psycopg2 connection pools kept healthy by one supervisor thread."""

from .clock import REAL_CLOCK, Clock, FakeClock, RealClock
from .errors import (
    BadConnectionError,
    ConnectError,
    PoolClosed,
    PoolError,
    PoolTimeout,
    PoolTooManyWaiters,
)
from .pool import ConnectionPool
from .supervisor import Supervisor, get_supervisor

__all__ = [
    "ConnectionPool",
    "PoolError",
    "PoolClosed",
    "PoolTimeout",
    "PoolTooManyWaiters",
    "ConnectError",
    "BadConnectionError",
    "Supervisor",
    "get_supervisor",
    "Clock",
    "RealClock",
    "FakeClock",
    "REAL_CLOCK",
]
