"""Starting the sim platform's own processes as isolated interpreters."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import subprocess
from collections.abc import Callable, Sequence
from typing import Any, Protocol

# What an isolated interpreter of ours inherits: nothing from the caller's
# environment (no PYTHON*, no LD_PRELOAD/LD_LIBRARY_PATH, no locale tricks).
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8"}


PR_SET_DUMPABLE, PR_SET_NAME = 4, 15  # linux/prctl.h


def set_dumpable(on: bool) -> None:
    """Whether this process may dump core and be ptraced or read (/proc/PID/mem) by
    other processes of its user; OSError if the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl(PR_SET_DUMPABLE, {int(on)}) failed")


def set_process_name(name: str) -> None:
    """The name ``ps`` and /proc/PID/comm show (at most 15 bytes)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def isolated_command(python: str, module: str, args: Sequence[str]) -> list[str]:
    """``python -I -m module``: the installed sgxvtpm, whatever the caller's environment.

    -I: no PYTHON* variables, no user site, neither the cwd nor a script's
    directory on sys.path. So the platform's processes run the package as
    installed for this interpreter: a caller started with a PYTHONPATH to
    another copy (hostd included) cannot change what they run.
    """
    return [python, "-I", "-m", module, *args]


class Child(Protocol):
    """What end_child and the CPU use of a child process (subprocess.Popen has it)."""

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class ForkedChild:
    """A child this process forked without exec, with the part of Popen's interface
    :class:`Child` names; it is reaped here (``returncode`` as Popen's)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._reaped(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            ready, _, _ = select.select([self._pidfd], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            _, status = os.waitpid(self.pid, 0)
            self._reaped(status)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def _reaped(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        os.close(self._pidfd)


def end_child(ctl: socket.socket | None, proc: Child | None, timeout: float) -> None:
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
