"""The layout of a state directory (``--state-dir``, env SGXVTPM_STATE_DIR).

Everything hostd keeps, and where the VMM and the VM endpoints find it::

    hostd.sock            the relay socket (VMM and VM endpoints connect here)
    hostd.lock            one hostd per directory
    platform/             the sim platform (root secret 0600, attestation root)
    operator.key/.crt     the operator (VMM) identity, 0600; pinned by the manager
    manager/              the manager enclave's sealed registry
    instances/ID/         one instance enclave's sealed state
    vms/NAME/             the VM side: vm.key (0600), vm.crt, instance.json
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV = "SGXVTPM_STATE_DIR"


def default_state_dir() -> Path:
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sgxvtpm"


@dataclass(frozen=True)
class StateDir:
    root: Path

    @classmethod
    def at(cls, path: Path | str | None) -> StateDir:
        return cls(Path(path) if path is not None else default_state_dir())

    @property
    def socket(self) -> Path:
        return self.root / "hostd.sock"

    @property
    def lock(self) -> Path:
        return self.root / "hostd.lock"

    @property
    def platform(self) -> Path:
        return self.root / "platform"

    @property
    def operator_key(self) -> Path:
        return self.root / "operator.key"

    @property
    def operator_cert(self) -> Path:
        return self.root / "operator.crt"

    @property
    def manager(self) -> Path:
        return self.root / "manager"

    def instance(self, instance_id: str) -> Path:
        return self.root / "instances" / instance_id

    def vm(self, name: str) -> Path:
        return self.root / "vms" / name

    def ensure(self) -> None:
        for directory in (self.root, self.manager, self.root / "instances", self.root / "vms"):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
