"""The command line's edges: the platform choice, and the benchmark suite that is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sgxvtpm.cli import main


def test_hostd_on_a_platform_this_machine_cannot_run_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["hostd", "--state-dir", str(tmp_path / "state"), "--platform", "gramine"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("sgxvtpm: error: platform 'gramine' needs")
    assert not (tmp_path / "state" / "platform").exists()  # nothing provisioned


def test_an_unknown_platform_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["hostd", "--state-dir", str(tmp_path), "--platform", "tdx"])
    assert exited.value.code == 2
    assert "invalid choice: 'tdx'" in capsys.readouterr().err


def test_bench_outside_a_source_checkout_says_where_the_suite_is(tmp_path: Path) -> None:
    """The installed package has no ``benchmarks``: importing the CLI never needs it, and
    ``sgxvtpm bench`` says where it lives instead of a traceback."""
    isolated = [sys.executable, "-I"]  # no cwd (the repository) on sys.path
    subprocess.run([*isolated, "-c", "import sgxvtpm.cli"], cwd=tmp_path, check=True)
    done = subprocess.run([*isolated, "-m", "sgxvtpm.cli", "bench", "--quick"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("sgxvtpm: error: the benchmark suite is not installed")
    assert "Traceback" not in done.stderr


def test_version_prints_the_package_version_and_exits_0(
    capsys: pytest.CaptureFixture[str]
) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"sgxvtpm {version('sgxvtpm')}\n"
