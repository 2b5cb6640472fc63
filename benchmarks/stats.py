"""Summaries of latency samples (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Median and 99th percentile of ``n`` samples, in microseconds."""

    n: int
    median_us: float
    p99_us: float

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "median_us": self.median_us, "p99_us": self.p99_us}

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> Summary:
        return cls(int(data["n"]), float(data["median_us"]), float(data["p99_us"]))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted values, nearest-rank method.

    Nearest rank reports a value that was really observed, which is what a
    tail latency should be.
    """
    if not sorted_values:
        raise ValueError("no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def median(sorted_values: Sequence[float]) -> float:
    n = len(sorted_values)
    if n == 0:
        raise ValueError("no samples")
    mid = n // 2
    if n % 2:
        return float(sorted_values[mid])
    return (sorted_values[mid - 1] + sorted_values[mid]) / 2


def summarize_ns(samples_ns: Sequence[int]) -> Summary:
    """Median and p99 of nanosecond samples, reported in microseconds."""
    ordered = sorted(samples_ns)
    return Summary(len(ordered), median(ordered) / 1000, percentile(ordered, 99) / 1000)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator
