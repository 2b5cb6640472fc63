"""Smoke test: benchmarks/bench_channel.py runs and measures something."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_channel.py"


def test_bench_channel_runs() -> None:
    spec = importlib.util.spec_from_file_location("bench_channel", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.run(iterations=3, sizes=(32, 4096))
    assert results["handshake_ms"] > 0
    for size in (32, 4096):
        assert results[f"plain_us_{size}"] > 0
        assert results[f"ratio_{size}"] == pytest.approx(
            results[f"session_us_{size}"] / results[f"plain_us_{size}"]
        )
