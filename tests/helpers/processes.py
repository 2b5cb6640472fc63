"""Child processes of the tests: a helper module run as a child, and ending a child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from sgxvtpm.testing.hostd import terminate

ROOT = Path(__file__).resolve().parents[2]


def helper_command(module: str, *args: str) -> list[str]:
    """``python -m tests.helpers.MODULE ARGS``; run it with :func:`helper_env`."""
    return [sys.executable, "-m", f"tests.helpers.{module}", *args]


def helper_env() -> dict[str, str]:
    """This process's environment, with the repository first on PYTHONPATH (so that
    the child imports ``tests.helpers`` whatever its working directory)."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def stop_process(
    proc: subprocess.Popen[bytes],
    *,
    sig: int | None = signal.SIGTERM,
    timeout: float = 10.0,
    group: bool = False,
) -> int:
    """End a child and return its exit code (sgxvtpm.testing's ``terminate``).

    Sends ``sig`` (None: the child is already ending, e.g. its stdin was
    closed), waits ``timeout`` seconds, then SIGKILLs it, or its whole process
    group with ``group`` (a child started with ``start_new_session``).
    """
    return terminate(proc, sig=sig, group=group, timeout=timeout)


def is_open(fd: int) -> bool:
    """Whether this process has ``fd`` open."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fds() -> list[str]:
    """This process's open descriptors (the listing's own is gone by the time it returns)."""
    return [name for name in os.listdir("/proc/self/fd") if is_open(int(name))]
