"""Statistics of the benchmark: quantiles, medians, Jain's fairness index."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank of ``values`` (any order)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def jain(counts: Sequence[int]) -> float:
    """Jain's fairness index: 1 = every thread got the same share, 1/n = one got everything."""
    total = sum(counts)
    squares = sum(c * c for c in counts)
    return (total * total) / (len(counts) * squares) if squares else math.nan


def summarise_latencies(lat: list[float]) -> dict[str, float]:
    return {
        "n": len(lat), "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "p99.9": pct(lat, 0.999),
        "max": max(lat) if lat else math.nan, "over_1ms": sum(1 for x in lat if x > 1e-3),
    }
