"""platform/sim/spawn.py: which descriptors launch_over_pair keeps and closes; ForkedChild."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import pytest
from tests.helpers.processes import is_open

from sgxvtpm.platform.sim.spawn import ForkedChild, end_child, launch_over_pair


def test_an_accepted_launch_keeps_our_end_and_the_pidfd() -> None:
    passed: list[int] = []
    pidfd_r, pidfd_w = os.pipe()

    def send(fd: int) -> tuple[dict[str, Any], list[int]]:
        passed.append(os.dup(fd))  # what the receiver holds after SCM_RIGHTS
        return {"ok": True}, [pidfd_r]

    reply, launched = launch_over_pair(send)
    assert reply == {"ok": True} and launched is not None
    kept, pidfd = launched
    try:
        assert pidfd == pidfd_r and is_open(pidfd)
        os.write(passed[0], b"hello")  # the passed end reaches the kept end
        assert kept.recv(5) == b"hello"
    finally:
        kept.close()
        for fd in (passed[0], pidfd_r, pidfd_w):
            os.close(fd)


@pytest.mark.parametrize("reply", [{"ok": False, "error": "no"}, {"ok": True}])
@pytest.mark.parametrize("count", [0, 2])
def test_a_refused_or_odd_launch_closes_everything(reply: dict[str, Any], count: int) -> None:
    pipes = [os.pipe() for _ in range(count)]
    received = [r for r, _ in pipes]
    before = set(os.listdir("/proc/self/fd"))
    answer, launched = launch_over_pair(lambda fd: (reply, list(received)))
    assert answer == reply and launched is None
    assert not any(is_open(fd) for fd in received)
    assert set(os.listdir("/proc/self/fd")) <= before  # neither end of the pair is left open
    for _, w in pipes:
        os.close(w)


def test_a_failing_send_closes_both_ends() -> None:
    before = set(os.listdir("/proc/self/fd"))

    def send(fd: int) -> tuple[dict[str, Any], list[int]]:
        raise ConnectionError("the zygote is gone")

    with pytest.raises(ConnectionError):
        launch_over_pair(send)
    assert set(os.listdir("/proc/self/fd")) <= before


def _fork(then: int | None) -> ForkedChild:
    """A forked child that exits with ``then`` at once, or (None) waits to be killed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        if then is None:
            signal.pause()
        os._exit(then or 0)
    return ForkedChild(pid)


def test_a_forked_child_is_polled_waited_for_and_reaped() -> None:
    child = _fork(3)
    assert child.wait(timeout=10) == 3 == child.returncode
    assert child.poll() == 3 and child.wait() == 3  # reaped once, answers after
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)


def test_a_lingering_forked_child_times_out_then_is_killed() -> None:
    child = _fork(None)
    assert child.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.05)
    end_child(None, child, timeout=0.05)  # as the CPU ends its zygote
    assert child.returncode == -signal.SIGKILL
    child.kill()  # once reaped, a no-op
    start = time.monotonic()
    assert child.wait(timeout=1) == -signal.SIGKILL and time.monotonic() - start < 1
