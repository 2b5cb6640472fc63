"""Start and stop a real hostd (the SGX module) for integration tests.

The operator's and the VMs' credentials are in a credentials directory
(sgxvtpm/vmm/credentials.py): by default the session's (tests/conftest.py
points SGXVTPM_CONFIG_DIR at a temporary one), or ``credentials``, which
hostd is started with and :meth:`Hostd.vmm` and :meth:`Hostd.binding` use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sgxvtpm.endpoint.k2 import VmBinding
from sgxvtpm.host.control import hostd_control
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.vmm.client import VmmClient
from sgxvtpm.vmm.credentials import ENV as CREDENTIALS_ENV
from sgxvtpm.vmm.credentials import Credentials
from sgxvtpm.wire.control import Refused, WaitReady


class Hostd:
    def __init__(
        self, state_dir: Path, *, credentials: Path | None = None, args: Sequence[str] = ()
    ) -> None:
        self.state = StateDir(state_dir)
        self.credentials = Credentials.at(credentials)
        self.args = list(args)
        self.log_path = state_dir.parent / f"{state_dir.name}-hostd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept for the process's life
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sgxvtpm.cli", "hostd", "--state-dir", str(self.state.root),
             *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, CREDENTIALS_ENV: str(self.credentials.root)},
        )
        log.close()
        wait_ready(self.state.socket, timeout, self.proc)

    def vmm(self) -> VmmClient:
        return VmmClient(self.state, credentials=self.credentials)

    def vm_dir(self, name: str) -> Path:
        """Where VM ``name``'s binding is (key, certificates, instance.json)."""
        return self.credentials.host(self.state).vm(name)

    def binding(self, name: str) -> VmBinding:
        return VmBinding.load(self.state, name, credentials=self.credentials)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)

    def kill(self) -> None:
        """kill -9 hostd and everything it started (its process group)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):  # nothing of it left
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_ready(sock: Path, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until hostd answers and its manager has restored every instance."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"hostd exited with {proc.returncode}")
        if sock.exists():
            try:
                reply = asyncio.run(hostd_control(sock, WaitReady()))
                if not isinstance(reply, Refused):
                    return
            except (OSError, TimeoutError, ConnectionError):
                pass
        time.sleep(0.05)
    raise TimeoutError(f"hostd at {sock} not ready after {timeout}s")


@contextmanager
def running_hostd(
    state_dir: Path, *, credentials: Path | None = None, args: Sequence[str] = ()
) -> Iterator[Hostd]:
    hostd = Hostd(state_dir, credentials=credentials, args=args)
    hostd.start()
    try:
        yield hostd
    finally:
        if hostd.proc is not None and hostd.proc.poll() is None:
            hostd.stop()
