"""Small statistics helpers (no numpy needed)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ``values``, linearly interpolated."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values."""
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(min, max) of the values that are numbers, or (NaN, NaN)."""
    clean = [v for v in values if v == v]
    return (min(clean), max(clean)) if clean else (float("nan"), float("nan"))
