"""Hostile input to every codec and socket-facing parser (RELIABILITY.md scenario 4):
an error or a clean refusal, never a crash, a hang or unbounded memory.

Two parts:
- every kept input (seed corpus and regression cases of fixed findings) runs
  in-process through its target: the parser answers with its protocol error
  or a result, nothing else;
- atheris (coverage-guided libFuzzer) runs each target in its own process:
  2,000 inputs each in ``make test``, 100,000 each in ``make stress``; a
  crash, an unexpected exception, a hang (10 s per input) or RSS above
  1 GiB fails the test and names the input file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.fuzz import targets

ROOT = Path(__file__).resolve().parents[2]
FAST_RUNS = 2_000
STRESS_RUNS = 100_000


def _kept_inputs() -> list[tuple[str, Path]]:
    out = []
    for name in targets.NAMES:
        for base in (targets.CORPUS, targets.REGRESSIONS):
            directory = base / name
            if directory.is_dir():
                out += [(name, p) for p in sorted(directory.iterdir()) if p.is_file()]
    return out


def test_every_target_has_seeds() -> None:
    for name in targets.NAMES:
        assert any((targets.CORPUS / name).iterdir()), name


@pytest.mark.parametrize(("name", "path"), _kept_inputs(), ids=lambda v: getattr(v, "name", v))
def test_kept_input(name: str, path: Path) -> None:
    targets.check(name, path.read_bytes())


def test_valid_seeds_verify() -> None:
    """The quote and certificate seeds are valid, so the fuzzer starts deep in the parser."""
    for path in (targets.CORPUS / "quote").iterdir():
        targets.quote(path.read_bytes())
    for path in (targets.CORPUS / "ra_tls_cert").iterdir():
        targets.ra_tls_cert(path.read_bytes())


def _fuzz(name: str, runs: int, tmp_path: Path) -> int:
    pytest.importorskip("atheris")
    artifacts = tmp_path / "artifacts"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", name, f"--runs={runs}",
         f"--work={tmp_path / 'work'}", f"--artifacts={artifacts}", "--seed=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        )},
    )
    found = sorted(artifacts.glob("*")) if artifacts.exists() else []
    assert proc.returncode == 0 and not found, (
        f"fuzz target {name} failed (rc {proc.returncode}); inputs: {found}\n{proc.stderr[-3000:]}"
    )
    match = re.search(r"stat::number_of_executed_units: (\d+)", proc.stderr)
    assert match, proc.stderr[-2000:]
    done = int(match.group(1))
    print(f"\n[fuzz] target={name} inputs={done}")
    return done


@pytest.mark.parametrize("name", targets.NAMES)
def test_fuzz_fast(name: str, tmp_path: Path) -> None:
    assert _fuzz(name, FAST_RUNS, tmp_path) >= FAST_RUNS


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", targets.NAMES)
def test_fuzz_stress(name: str, tmp_path: Path) -> None:
    assert _fuzz(name, STRESS_RUNS, tmp_path) >= STRESS_RUNS
