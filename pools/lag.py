"""Lag-aware readers: keep new checkouts off replicas that lag more than ``max_replica_lag``.

Where the lag comes from:
- with Aurora topology discovery, ``replica_lag_in_msec`` of each instance in the cluster's
  shared topology (``aurora_replica_status()``; see ``topology``);
- otherwise, measured on each address of the pool: a streaming replica's lag is
  ``now() - pg_last_xact_replay_timestamp()`` while WAL it received is not yet replayed, and 0
  when it has replayed all it received (nothing is waiting, so nothing read there is stale);
  a primary's is 0 (PostgreSQL documentation, "Recovery Control Functions" and "Monitoring").

Invariants:
- the supervisor only decides (``step``); measuring runs on a short-lived worker thread, one
  at a time per pool, over one monitor connection per address kept between rounds (not in the
  pool's books, never handed out); a round that outlives :data:`ROUND_BUDGET_S` is abandoned
  (its result dropped) and the next one starts with fresh connections;
- an address over the limit becomes *lagging*: its idle connections close now, its checked-out
  ones when they come back (reason ``replica_lag``), and new connections go elsewhere (the
  address book orders lagging addresses after the others); when every measured address is over
  the limit, the least lagging one stays usable, so reads go on;
- back under the limit, the address is healthy again and rebalancing gives it its share back;
- an address whose lag cannot be measured keeps its last state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions as ext

from .clock import Clock
from .connector import Connector
from .stats import summarise_error

__all__ = ["LagMonitor", "LAG_CHECK_INTERVAL_S", "LAG_SQL"]

logger = logging.getLogger(__name__)

#: Seconds between measurements.
LAG_CHECK_INTERVAL_S = 1.0
#: A measuring round taking longer than this is abandoned.
ROUND_BUDGET_S = 10.0

#: A server's replication lag in seconds (0 on a primary, and on a replica with nothing left
#: to replay).
LAG_SQL = """
SELECT CASE
  WHEN NOT pg_is_in_recovery() THEN 0
  WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0
  ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)
END::float8
"""


class LagMonitor:
    """Measures the lag of a pool's addresses and marks those over ``max_lag_s``.

    :param max_lag_s: the limit in seconds (> 0); live (``max_lag_s`` attribute).
    :param retire: closes an address's connections (idle now, checked-out on return).
    :param wake: asks the supervisor for the pool's next maintenance step.
    """

    def __init__(self, name: str, connector: Connector, clock: Clock, *, max_lag_s: float,
                 retire: Callable[[list[str], str], None], wake: Callable[[], None]) -> None:
        self.name = name
        self.connector = connector
        self.clock = clock
        self.max_lag_s = max_lag_s
        self.retire = retire
        self.wake = wake
        self._lock = threading.Lock()
        self._round = 0  # the current round's number; a late round's result is dropped
        self._running_since: float | None = None
        self._next_at = 0.0
        self._conns: dict[str, ext.connection] = {}  # label -> monitor connection
        self.rounds = 0
        self.all_over = False  # every measured address over the limit (a fallback may serve)
        self.last_error: str | None = None
        self._closed = False

    @classmethod
    def retune(cls, monitor: LagMonitor | None, max_lag_s: float | None, name: str,
               connector: Connector, clock: Clock, *, retire: Callable[[list[str], str], None],
               wake: Callable[[], None]) -> LagMonitor | None:
        """The monitor for a new ``max_replica_lag`` (seconds > 0, or None: off, every
        address usable again). Raises ``ValueError`` for a bad limit."""
        if max_lag_s is not None and (isinstance(max_lag_s, bool) or not max_lag_s > 0):
            raise ValueError(f"max_replica_lag must be > 0 seconds (or None), got {max_lag_s!r}")
        if max_lag_s is None:
            if monitor is not None:
                monitor.close()
                for label in connector.book.labels(active_only=False):
                    connector.book.set_lag(label, None, False)
                wake()
            return None
        if monitor is not None:
            monitor.max_lag_s = max_lag_s
            return monitor
        wake()
        return cls(name, connector, clock, max_lag_s=max_lag_s, retire=retire, wake=wake)

    def step(self, now: float) -> float:
        """Start a measuring round if one is due (on a worker thread); when to look again."""
        with self._lock:
            if self._closed:
                return math.inf
            running = self._running_since is not None
            if running and now - self._running_since > ROUND_BUDGET_S:  # type: ignore[operator]
                logger.warning("pool %s: replica lag round abandoned after %.0f s", self.name,
                               ROUND_BUDGET_S)
                conns, self._conns = self._conns, {}
                self._round += 1
                self._running_since = None
                running = False
                threading.Thread(target=_close_all, args=(list(conns.values()),),
                                 daemon=True).start()
            if running or now < self._next_at:
                return self._next_at if not running else now + LAG_CHECK_INTERVAL_S
            self._round += 1
            number = self._round
            self._running_since = now
            self._next_at = now + LAG_CHECK_INTERVAL_S
        threading.Thread(target=self._run, args=(number,), name=f"pgregistry-lag-{self.name}",
                         daemon=True).start()
        return self._next_at

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, {}
            self._round += 1
        _close_all(list(conns.values()))

    def stats(self) -> dict[str, Any]:
        return {"max_replica_lag_s": self.max_lag_s, "lag_rounds": self.rounds,
                "all_over": self.all_over, "lag_last_error": self.last_error}

    # -- the worker thread -------------------------------------------------------------------

    def _run(self, number: int) -> None:
        try:
            lags = self._measure()
            with self._lock:
                if number != self._round or self._closed:
                    return  # abandoned or closed meanwhile
                self.rounds += 1
            self._apply(lags)
        except Exception as exc:  # a worker never dies silently
            self.last_error = summarise_error(exc)
            logger.warning("pool %s: replica lag round failed: %s", self.name, self.last_error)
        finally:
            with self._lock:
                if number == self._round:
                    self._running_since = None

    def _measure(self) -> dict[str, float | None]:
        """label -> lag in seconds (None: could not be measured this round)."""
        book = self.connector.book
        labels = book.labels()
        topo = self.connector.topology
        snap = topo.snapshot if topo is not None and topo.unavailable is None else None
        if snap is not None:  # Aurora: the topology's figures, by instance endpoint
            by_host = {i.host: i.replica_lag_ms / 1000.0 for i in snap.instances}
            out: dict[str, float | None] = {}
            for label in labels:
                a = book.get(label)
                out[label] = by_host.get(a.host) if a is not None else None
            return out
        lags: dict[str, float | None] = {}
        for label in labels:
            lags[label] = self._measure_one(label)
        for label in [lb for lb in self._conns if lb not in labels]:  # addresses that left
            _close_all([self._conns.pop(label)])
        return lags

    def _measure_one(self, label: str) -> float | None:
        conn = self._conns.get(label)
        try:
            if conn is None or conn.closed:
                conn = self._conns[label] = self.connector.connect_to(label)
            with conn.cursor() as cur:
                cur.execute(LAG_SQL)
                row = cur.fetchone()
            return float(row[0]) if row is not None and row[0] is not None else None
        except (psycopg2.Error, KeyError, OSError) as exc:
            self.last_error = f"{label}: {summarise_error(exc)}"
            bad = self._conns.pop(label, None)
            if bad is not None:
                _close_all([bad])
            return None
        except Exception as exc:  # e.g. the credential source
            self.last_error = f"{label}: {summarise_error(exc)}"
            return None

    def _apply(self, lags: dict[str, float | None]) -> None:
        limit = self.max_lag_s
        measured = {lb: lag for lb, lag in lags.items() if lag is not None}
        over = {lb for lb, lag in measured.items() if lag > limit}
        was_all_over = self.all_over
        self.all_over = bool(measured) and over == set(measured)
        if self.all_over:  # every one over: keep the least lagging
            over.discard(min(measured, key=measured.__getitem__))
            if not was_all_over:
                logger.warning("pool %s: every replica lags more than max_replica_lag (%g s): "
                               "the least lagging serves (or the pool's fallback)",
                               self.name, limit)
        book = self.connector.book
        became: list[str] = []
        recovered = False
        for label, lag in lags.items():
            if lag is None:
                continue
            a = book.get(label)
            was = a.lagging if a is not None else False
            if book.set_lag(label, lag, label in over):
                became.append(label)
            elif was and label not in over:
                recovered = True
                logger.info("pool %s: replica %s back under max_replica_lag (%.2f s <= %g s)",
                            self.name, label, lag, limit)
        if became:
            logger.warning("pool %s: replica(s) %s over max_replica_lag (%g s): new checkouts "
                           "go elsewhere", self.name,
                           ", ".join(f"{lb} ({lags[lb]:.2f} s)" for lb in became), limit)
            self.retire(became, "replica_lag")
        if became or recovered or self.all_over != was_all_over:
            self.wake()


def _close_all(conns: list[ext.connection]) -> None:
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.close()
