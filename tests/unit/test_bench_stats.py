"""Latency summaries of the benchmark suite (pure functions)."""

from __future__ import annotations

import pytest
from benchmarks.stats import median, percentile, ratio, summarize_ns
from hypothesis import given
from hypothesis import strategies as st


def test_median_odd_and_even() -> None:
    assert median([1, 2, 9]) == 2
    assert median([1, 2, 4, 9]) == 3


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 50) == 50
    assert percentile([7], 99) == 7


def test_summary_in_microseconds() -> None:
    summary = summarize_ns([3000, 1000, 2000, 100_000])
    assert summary.n == 4
    assert summary.median_us == 2.5
    assert summary.p99_us == 100.0


@pytest.mark.parametrize("bad", [[], ()])
def test_no_samples_is_an_error(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        median(bad)
    with pytest.raises(ValueError):
        percentile(bad, 50)


def test_percentile_range_checked() -> None:
    with pytest.raises(ValueError):
        percentile([1, 2], 101)


def test_ratio_missing_values() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1))
def test_p99_is_an_observed_value_not_below_the_median(samples: list[int]) -> None:
    summary = summarize_ns(samples)
    assert summary.p99_us in [s / 1000 for s in samples]
    assert min(samples) / 1000 <= summary.median_us <= summary.p99_us <= max(samples) / 1000
