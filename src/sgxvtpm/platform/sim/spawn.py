"""Starting the sim platform's own processes as isolated interpreters."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

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


def launch_over_pair(
    send: Callable[[int], tuple[dict[str, Any], list[int]]],
) -> tuple[dict[str, Any], tuple[socket.socket, int] | None]:
    """Make a socket pair, ``send`` a launch request that passes one end (its
    descriptor, closed here once sent), and keep the other end.

    Returns the reply and, when it is ok with exactly one descriptor (the
    enclave's pidfd), (the kept end, that descriptor); else None, the kept end
    and every descriptor received closed. If ``send`` raises, the kept end is
    closed too.
    """
    kept, passed = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        reply, fds = send(passed.fileno())
    except BaseException:
        kept.close()
        raise
    finally:
        passed.close()
    if not reply.get("ok") or len(fds) != 1:
        kept.close()
        for fd in fds:
            os.close(fd)
        return reply, None
    return reply, (kept, fds[0])
