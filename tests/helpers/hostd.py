"""Start and stop a real hostd (the SGX module) for integration tests.

A :class:`sgxvtpm.testing.HostdProcess` with the clients' shortcuts. The
operator's and the VMs' credentials are in a credentials directory
(sgxvtpm/vmm/credentials.py): by default the session's (tests/conftest.py
points SGXVTPM_CONFIG_DIR at a temporary one), or ``credentials``, which
hostd is started with and :meth:`Hostd.vmm` and :meth:`Hostd.binding` use.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sgxvtpm.endpoint.k2 import VmBinding
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.testing import HostdProcess, wait_ready
from sgxvtpm.vmm.client import VmmClient
from sgxvtpm.vmm.credentials import Credentials

__all__ = ["Hostd", "running_hostd", "wait_ready"]


class Hostd(HostdProcess):
    def __init__(
        self,
        state_dir: Path,
        *,
        credentials: Path | None = None,
        args: Sequence[str] = (),
        launcher: Sequence[str] = (),
    ) -> None:
        super().__init__(
            StateDir(state_dir),
            credentials=Credentials.at(credentials),
            log_path=state_dir.parent / f"{state_dir.name}-hostd.log",
            args=args,
            launcher=launcher,
        )

    def vmm(self) -> VmmClient:
        return VmmClient(self.state, credentials=self.credentials)

    def vm_dir(self, name: str) -> Path:
        """Where VM ``name``'s binding is (key, certificates, instance.json)."""
        return self.credentials.host(self.state).vm(name)

    def binding(self, name: str) -> VmBinding:
        return VmBinding.load(self.state, name, credentials=self.credentials)


@contextmanager
def running_hostd(
    state_dir: Path,
    *,
    credentials: Path | None = None,
    args: Sequence[str] = (),
    launcher: Sequence[str] = (),
) -> Iterator[Hostd]:
    hostd = Hostd(state_dir, credentials=credentials, args=args, launcher=launcher)
    hostd.start()
    try:
        yield hostd
    finally:
        if hostd.running():
            hostd.stop()
