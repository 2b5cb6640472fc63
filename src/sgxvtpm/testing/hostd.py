"""Start ``sgxvtpm hostd`` as a child process and wait until it is ready."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from sgxvtpm.host.statedir import StateDir
from sgxvtpm.testing.control import hostd_control
from sgxvtpm.vmm.credentials import ENV as CREDENTIALS_ENV
from sgxvtpm.vmm.credentials import Credentials
from sgxvtpm.wire.control import Refused, WaitReady

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def wait_ready(
    sock: Path, timeout: float = READY_TIMEOUT, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Until the hostd at ``sock`` answers and its manager has restored every instance.

    RuntimeError as soon as ``proc`` (that hostd's process, if given) has
    exited; TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"hostd exited with status {proc.returncode}")
        if sock.exists():
            try:
                reply = asyncio.run(hostd_control(sock, WaitReady()))
                if not isinstance(reply, Refused):
                    return
            except (OSError, TimeoutError, ConnectionError):
                pass
        time.sleep(0.05)
    raise TimeoutError(f"hostd at {sock} not ready after {timeout:g} s")


def terminate(
    proc: subprocess.Popen[bytes],
    *,
    sig: int | None = signal.SIGTERM,
    group: bool = False,
    timeout: float = STOP_TIMEOUT,
) -> int:
    """Send ``sig`` (SIGTERM; None: the process is ending already, e.g. its
    stdin was closed) to ``proc``; if it has not ended after ``timeout``
    seconds, SIGKILL it (its whole process group if ``group``: a process
    started in its own session). Its exit status."""
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        return proc.wait(10)


class HostdProcess:
    """``sgxvtpm hostd --state-dir STATE`` in a child process of its own session.

    Its operator identity is in ``credentials`` (the hostd gets it as
    SGXVTPM_CONFIG_DIR), stdout and stderr go to ``log_path``; ``args`` are
    more ``hostd`` options, ``env`` more environment variables. ``launcher``
    prefixes hostd's command line with a program that runs hostd as its only
    child (a tracer: ``strace -f -o FILE``, tests/helpers/strace.py); ``pid``
    and the signals of :meth:`stop` are then hostd's, and the launcher ends
    when hostd and its children have.
    """

    def __init__(
        self,
        state: StateDir,
        *,
        credentials: Credentials,
        log_path: Path,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        launcher: Sequence[str] = (),
    ) -> None:
        self.state = state
        self.credentials = credentials
        self.log_path = log_path
        self.args = list(args)
        self.env = dict(env or {})
        self.launcher = list(launcher)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("hostd was not started")
        if not self.launcher:
            return self.proc.pid
        return self._launched_pid(self.proc.pid)

    @staticmethod
    def _launched_pid(launcher: int, timeout: float = 10.0) -> int:
        """The launcher's child (it forks hostd before it execs it: wait for it)."""
        deadline = time.monotonic() + timeout
        while True:
            children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
            if children:
                return int(children[0])
            if time.monotonic() > deadline:
                raise RuntimeError(f"the launcher ({launcher}) started no hostd")
            time.sleep(0.01)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = READY_TIMEOUT) -> float:
        """Start hostd; the seconds until its manager is ready.

        RuntimeError (with the end of hostd's log) if it exits first,
        TimeoutError if it is not ready after ``timeout`` seconds; it is
        stopped then.
        """
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.launcher, sys.executable, "-m", "sgxvtpm.cli", "hostd", "--state-dir",
                 str(self.state.root), *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, CREDENTIALS_ENV: str(self.credentials.root), **self.env},
            )  # fmt: skip
        try:
            wait_ready(self.state.socket, timeout, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise type(exc)(f"{exc}; its log {self.log_path} ends: {self.log_tail()}") from None
        return time.perf_counter() - t0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` (SIGTERM: hostd stops its enclaves and exits), then SIGKILL the
        whole session after ``timeout`` seconds; the exit status."""
        if self.proc is None:
            raise RuntimeError("hostd was not started")
        if self.launcher and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, RuntimeError, FileNotFoundError):
                os.kill(self.pid, sig)
            return terminate(self.proc, sig=None, group=True, timeout=timeout)
        return terminate(self.proc, sig=sig, group=True, timeout=timeout)

    def kill(self) -> None:
        """kill -9 hostd and everything in its session still there (its process group)."""
        if self.proc is None:
            raise RuntimeError("hostd was not started")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 600) -> str:
        return self.log()[-n:]
