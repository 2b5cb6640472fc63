"""VMs on the real system: a controllable hostd, ``vm create``, VM clients, the TPM calls.

The reliability suite drives hostd through :class:`HostdCtl`; the e2e tests
create VMs on their module's hostd with :func:`create_vm` and run the CLI
with :func:`sgxvtpm_cli`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.helpers.hostd import Hostd

from sgxvtpm.channel import ChannelError
from sgxvtpm.endpoint.k2 import K2Client, K2Error
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_ALG, TPM2_CAP, TPM2_PT, TPM2_SU, TPMA_NV
from sgxvtpm.tpm.nv import execute
from sgxvtpm.vmm.client import VmmClient, VmmError
from sgxvtpm.wire.k1 import InstanceInfo

#: What a broken session, a dead instance or a dead hostd looks like to a VM client.
TRANSIENT = (K2Error, ChannelError, OSError, EOFError, TimeoutError, ConnectionError)
#: ... and to the VMM.
VMM_TRANSIENT = (*TRANSIENT, VmmError)

NV_ATTRS = (
    TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
)
COUNTER_ATTRS = NV_ATTRS | TPMA_NV.TPM_NT_COUNTER
TPM2_RC_INITIALIZE = 0x100
TPM2_RC_VALUE_P1 = 0x1C4  # TPM_RC_VALUE | TPM_RC_P | TPM_RC_1 (Startup(STATE) with no saved state)
TPM2_RC_HANDLE_P1 = 0x18B  # TPM_RC_HANDLE + parameter/handle 1: no such object

T = TypeVar("T")


# ------------------------------------------------------------------ hostd


class HostdCtl:
    """A real hostd and the processes it launched, found from its own log."""

    def __init__(self, state_dir: Path, credentials: Path | None = None) -> None:
        self.h = Hostd(state_dir, credentials=credentials)

    @property
    def state(self) -> Any:
        return self.h.state

    def start(self) -> None:
        self.h.start(timeout=120)

    def stop(self) -> None:
        if self.h.proc is not None and self.h.proc.poll() is None:
            self.h.stop()

    def log(self) -> str:
        return self.h.log()

    @property
    def pid(self) -> int:
        assert self.h.proc is not None
        return self.h.proc.pid

    def enclave_pids(self) -> dict[str, int]:
        """The latest pid hostd logged for each enclave (``manager`` or an instance id)."""
        pids: dict[str, int] = {}
        for line in self.log().splitlines():
            if '"hostd.enclave_launched"' not in line:
                continue
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                pids[str(record["enclave"])] = int(record["pid"])
        return pids

    def kill_enclave(self, enclave: str) -> bool:
        """kill -9 one enclave process; False if it was not running."""
        pid = self.enclave_pids().get(enclave)
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def kill_hostd(self, settle: float = 0.0) -> None:
        """kill -9 hostd alone; after ``settle`` s, -9 whatever of its group is left; restart."""
        assert self.h.proc is not None
        os.kill(self.h.proc.pid, signal.SIGKILL)
        self.h.proc.wait(10)
        time.sleep(settle)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.h.proc.pid, signal.SIGKILL)
        self.start()

    def vmm(self) -> VmmClient:
        return self.h.vmm()

    def create(self, name: str) -> InstanceInfo:
        return asyncio.run(self.vmm().create(name))

    def create_many(self, names: list[str], parallel: int = 8) -> None:
        async def run() -> None:
            client, gate = self.vmm(), asyncio.Semaphore(parallel)

            async def one(name: str) -> None:
                async with gate:
                    await client.create(name)

            await asyncio.gather(*(one(n) for n in names))

        asyncio.run(run())

    def list(self) -> list[InstanceInfo]:
        return asyncio.run(self.vmm().list())

    def show(self, name: str) -> InstanceInfo:
        return asyncio.run(self.vmm().show(name))

    def instance_id(self, name: str) -> str:
        info = json.loads((self.h.vm_dir(name) / "instance.json").read_text())
        return str(info["instance_id"])

    def sealed(self, name: str) -> Path:
        return Path(self.state.instance(self.instance_id(name))) / "state.sealed"

    def wait_all_running(self, timeout: float = 120) -> list[InstanceInfo]:
        """Every VM in the registry running (the manager restored them all)."""
        return retry(self._all_running, timeout)

    def _all_running(self) -> list[InstanceInfo]:
        listed = self.list()
        bad = [(i.name, i.state, i.reason) for i in listed if i.state != "running"]
        if bad:
            raise K2Error(f"not running yet: {bad}")
        return listed


def retry(fn: Callable[[], T], timeout: float, pause: float = 0.1) -> T:
    """``fn()`` until it stops raising a transient error, or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except VMM_TRANSIENT:
            if time.monotonic() > deadline:
                raise
            time.sleep(pause)


@contextlib.contextmanager
def running(state_dir: Path, credentials: Path | None = None) -> Iterator[HostdCtl]:
    ctl = HostdCtl(state_dir, credentials)
    ctl.start()
    try:
        yield ctl
    finally:
        if ctl.h.proc is not None:
            ctl.stop()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(ctl.h.proc.pid, signal.SIGKILL)


def create_vm(hostd: Hostd, name: str, **kw: object) -> InstanceInfo:
    """``vm create`` through the manager enclave (K1); writes the VM's binding to the
    session's credentials directory (tests/conftest.py)."""
    return asyncio.run(VmmClient(hostd.state).create(name, **kw))  # type: ignore[arg-type]


def sgxvtpm_cli(state: StateDir, *args: str, timeout: float = 120.0
                ) -> subprocess.CompletedProcess[str]:
    """``python -m sgxvtpm.cli ARGS --state-dir STATE``."""
    return subprocess.run(
        [sys.executable, "-m", "sgxvtpm.cli", *args, "--state-dir", str(state.root)],
        capture_output=True, text=True, timeout=timeout,
    )


# ------------------------------------------------------------------ VM side


def client(ctl: HostdCtl, name: str, timeout: float = 120.0, *,
           takeover: bool = False) -> K2Client:
    return K2Client(ctl.h.binding(name), timeout=timeout, takeover=takeover)


def boot(ctl: HostdCtl, name: str) -> K2Client:
    """A VM's cold boot: new session, INIT, Startup(CLEAR)."""
    c = client(ctl, name)
    try:
        c.power_on()
        execute(c.transact, wire.startup(TPM2_SU.CLEAR))
    except BaseException:
        c.close()
        raise
    return c


def rc_of(response: bytes) -> int:
    return wire.response_code(response)


def nv_read(c: K2Client, index: int, size: int) -> bytes:
    return wire.parse_nv_read(execute(c.transact, wire.nv_read(index, size)))


def counter(c: K2Client, index: int) -> int:
    return int.from_bytes(nv_read(c, index, 8), "big")


def pcr(c: K2Client, index: int) -> bytes:
    return wire.parse_pcr_read(execute(c.transact, wire.pcr_read([index]))).digests[0]


def tpm_property(c: K2Client, prop: int) -> int:
    _, props = wire.parse_tpm_properties(
        execute(c.transact, wire.get_capability(TPM2_CAP.TPM_PROPERTIES, prop, 1))
    )
    return props[prop]


def lockout_counter(c: K2Client) -> int:
    return tpm_property(c, TPM2_PT.LOCKOUT_COUNTER)


def ecc_template(unique: bytes) -> bytes:
    """An ECC P-256 signing template whose unique field is ``unique`` (a distinct key)."""
    base = wire.ecc_p256_template(signing=True)
    assert base.endswith(bytes(4)), "template layout changed: unique is not the last field"
    return base[:-4] + wire.tpm2b(unique) + wire.tpm2b(b"")


def read_public_or_none(c: K2Client, handle: int) -> bytes | None:
    response = c.transact(wire.read_public(handle))
    if rc_of(response) != 0:
        return None
    return wire.parse_read_public(response).public


def sha256_extend(old: bytes, digest: bytes) -> bytes:
    import hashlib

    return hashlib.sha256(old + digest).digest()


@dataclass
class Numbers:
    """Figures a test reports (printed with -s, and asserted on)."""

    values: dict[str, float]

    def show(self, title: str) -> None:
        print(f"\n[{title}] " + " ".join(f"{k}={v:g}" for k, v in self.values.items()))


__all__ = ["TPM2_ALG", "HostdCtl", "boot", "client", "nv_read", "rc_of", "running"]
