"""Benchmark workers against real TPMs: libtpms in the worker and Debian's swtpm."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchmarks.latency import COMMANDS
from benchmarks.procs import run_worker
from benchmarks.swtpm import Swtpm

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("swtpm") is None, reason="Debian's swtpm is not installed"),
]


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    tpm = Swtpm(tmp_path / "swtpm")
    try:
        tpm.wait_answering()
        yield tpm
    finally:
        tpm.close()


def _check_latency(result: dict[str, object], cheap: int) -> None:
    assert result["ok"], result
    commands = result["commands"]
    assert isinstance(commands, dict)
    assert list(commands) == list(COMMANDS)
    for name, summary in commands.items():
        heavy = name.startswith(("Sign", "CreatePrimary"))
        assert summary["n"] == (max(5, cheap // 10) if heavy else cheap), name
        assert 0 < summary["median_us"] <= summary["p99_us"], name


def test_latency_in_process_engine() -> None:
    _check_latency(run_worker({"job": "latency", "target": {"kind": "engine"}, "cheap": 30}), 30)


def test_latency_swtpm_twice_on_the_same_tpm(swtpm: Swtpm) -> None:
    # The second run finds the TPM started and must clean up after the first.
    target = {"kind": "socket", "path": str(swtpm.path)}
    for _ in range(2):
        _check_latency(run_worker({"job": "latency", "target": target, "cheap": 20}), 20)


def test_load_counts_answered_commands(swtpm: Swtpm, tmp_path: Path) -> None:
    # swtpm serves one data connection at a time: one swtpm per VM.
    second = Swtpm(tmp_path / "second")
    try:
        second.wait_answering()
        paths = [str(swtpm.path), str(second.path)]
        result = run_worker({"job": "load", "paths": paths, "duration": 0.3, "warmup": 0.1})
    finally:
        second.close()
    assert result["ok"], result
    # Two closed loops for 0.3 s on a TPM answering in well under 10 ms.
    assert 60 <= result["completed"] < 0.3 / 1e-6


def test_ping_all_reports_a_dead_instance(swtpm: Swtpm, tmp_path: Path) -> None:
    targets = [
        {"kind": "socket", "path": str(swtpm.path)},
        {"kind": "socket", "path": str(tmp_path / "nobody.sock")},
    ]
    result = run_worker({"job": "ping_all", "targets": targets})
    assert (result["answered"], result["total"]) == (1, 2)
    assert "FileNotFoundError" in result["first_failure"]


def test_failed_target_is_a_reason_not_a_crash(tmp_path: Path) -> None:
    target = {"kind": "socket", "path": str(tmp_path / "nobody.sock")}
    result = run_worker({"job": "latency", "target": target, "cheap": 5})
    assert result["ok"] is False
    assert "FileNotFoundError" in result["reason"]
