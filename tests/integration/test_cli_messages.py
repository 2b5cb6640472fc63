"""The CLI's errors name the cause and the fix, in one line (real hostd, real CLI processes).

One hostd per module creates VM ``vm1`` and is stopped: the endpoints then
find its binding but no hostd, and a VM that was never created has none.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers.hostd import running_hostd
from tests.helpers.vmtools import create_vm

pytestmark = pytest.mark.integration


def cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sgxvtpm.cli", *args, "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=120,
    )


def one_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single ``sgxvtpm: error:`` line of a failed run."""
    assert done.returncode != 0, done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("sgxvtpm: error: "), done.stderr
    return done.stderr.removeprefix("sgxvtpm: error: ").strip()


@pytest.fixture(scope="module")
def stopped_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A state directory whose hostd created ``vm1`` and is no longer running."""
    state_dir = tmp_path_factory.mktemp("cli") / "state"
    with running_hostd(state_dir) as h:
        create_vm(h, "vm1")
    yield state_dir


@pytest.mark.parametrize("endpoint", [
    ("vm", "serve", "vm1", "--swtpm", "{tmp}/tpm"),
    ("vm", "attach", "vm1", "--ctrl", "{tmp}/ctrl"),
], ids=["serve", "attach"])
def test_an_endpoint_with_hostd_down_says_to_start_hostd(
    stopped_state: Path, tmp_path: Path, endpoint: tuple[str, ...]
) -> None:
    args = [a.format(tmp=tmp_path) for a in endpoint]
    message = one_error(cli(stopped_state, *args))
    assert message.startswith(f"hostd is not reachable at {stopped_state / 'hostd.sock'}")
    assert f"start it with `sgxvtpm hostd --state-dir {stopped_state}`" in message
    assert "INIT" not in message


@pytest.mark.parametrize("command", [
    ("vm", "serve", "nosuch", "--swtpm", "{tmp}/tpm"),
    ("vm", "attach", "nosuch", "--ctrl", "{tmp}/ctrl"),
    ("attest", "verify", "nosuch"),
], ids=["serve", "attach", "attest"])
def test_a_vm_without_credentials_says_to_create_it(
    stopped_state: Path, tmp_path: Path, command: tuple[str, ...]
) -> None:
    args = [a.format(tmp=tmp_path) for a in command]
    message = one_error(cli(stopped_state, *args))
    assert message.startswith("no VM named 'nosuch' has credentials in ")
    assert "`sgxvtpm vm create nosuch`" in message and "--credentials" in message
    assert "Errno" not in message and "ca.crt" not in message
