"""A monotonic counter never reads back below an acknowledged value (SECURITY.md
properties 15 and 16).

A child process increments a counter and prints each value once
counter_increment has returned; the parent SIGKILLs it at random moments
and checks, after every kill, that the counter holds the last acknowledged
value or one more (an increment that was durable but not yet printed).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tests.helpers.processes import helper_command, helper_env
from tests.helpers.sim_counter_child import COUNTER, IDENTITY

from sgxvtpm.platform.sim import SimPlatformDir

pytestmark = pytest.mark.integration

TOTAL = 10_000
KILLS = 20


def _read_counter(platform_dir: Path) -> int:
    platform = SimPlatformDir.open_or_create(platform_dir).enclave_platform(IDENTITY)
    return platform.counter_read(COUNTER)


def _run_child(platform_dir: Path, count: int, kill_after: int | None) -> list[int]:
    """Run a child; SIGKILL it after ``kill_after`` acknowledged values; all values it printed."""
    with subprocess.Popen(
        helper_command("sim_counter_child", str(platform_dir), str(count)),
        stdout=subprocess.PIPE,
        env=helper_env(),
    ) as proc:
        return _ack_and_kill(proc, kill_after)


def _ack_and_kill(proc: subprocess.Popen[bytes], kill_after: int | None) -> list[int]:
    assert proc.stdout is not None
    acked: list[int] = []
    if kill_after is not None:
        while len(acked) < kill_after:
            line = proc.stdout.readline()
            assert line.endswith(b"\n"), "child ended before it was killed"
            acked.append(int(line))
        # A random moment: mid-write or mid-fdatasync of the next value (in its slot).
        time.sleep(random.random() * 0.002)
        os.kill(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait()
    # Values already in the pipe were acknowledged too; a torn last line was not.
    acked += [int(v) for v in rest.split(b"\n")[:-1] if v] if rest else []
    if kill_after is None:
        assert proc.returncode == 0
    else:
        assert proc.returncode == -signal.SIGKILL
    return acked


def test_counter_survives_kill_minus_9(tmp_path: Path) -> None:
    platform_dir = tmp_path / "platform"
    SimPlatformDir.open_or_create(platform_dir)
    rng = random.Random(os.environ.get("SGXVTPM_SEED"))
    step = TOTAL // (KILLS + 1)
    # Kill points spread over the run with jitter; the last child runs to the end.
    cuts = [(i + 1) * step + rng.randint(-step // 3, step // 3) for i in range(KILLS)]
    last_acked = 0
    done = 0
    for i in range(KILLS + 1):
        remaining = TOTAL - done
        kill_after = None if i == KILLS else max(1, cuts[i] - done)
        values = _run_child(platform_dir, remaining, kill_after)
        assert values == sorted(set(values)), "acknowledged values must strictly increase"
        if values:
            assert values[0] >= last_acked + 1
            last_acked = values[-1]
        durable = _read_counter(platform_dir)
        assert last_acked <= durable <= last_acked + 1, (i, last_acked, durable)
        done = durable
    assert done == TOTAL
