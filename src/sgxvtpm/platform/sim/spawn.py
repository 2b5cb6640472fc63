"""Starting the sim platform's own processes as isolated interpreters."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence

# What an isolated interpreter of ours inherits: nothing from the caller's
# environment (no PYTHON*, no LD_PRELOAD/LD_LIBRARY_PATH, no locale tricks).
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8"}


def isolated_command(python: str, module: str, args: Sequence[str]) -> list[str]:
    """``python -I -m module``: the installed sgxvtpm, whatever the caller's environment.

    -I: no PYTHON* variables, no user site, neither the cwd nor a script's
    directory on sys.path. So the platform's processes run the package as
    installed for this interpreter: a caller started with a PYTHONPATH to
    another copy (hostd included) cannot change what they run.
    """
    return [python, "-I", "-m", module, *args]


def end_child(
    ctl: socket.socket | None, proc: subprocess.Popen[bytes] | None, timeout: float
) -> None:
    """Close a child's control socket (it exits on EOF), wait, kill it if it lingers."""
    if ctl is not None:
        ctl.close()
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
