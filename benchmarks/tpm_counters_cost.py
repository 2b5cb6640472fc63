"""What a VM's NV_Write costs when the instance's counter is in a host TPM.

``python -m benchmarks.tpm_counters_cost [--writes N] [--platform sim]``:
starts hostd twice on a fresh state directory each time, with the sim
platform's counters and with ``--counters tpm:swtpm:path=...`` on Debian's
swtpm (an RSA EK made persistent at 0x81010001), creates one VM and times N
TPM2_NV_Write commands of 8 bytes over K2 (each one is a sealed commit: a
durable write, then one counter increment). Prints the median and the
quartiles per mode. With host TPM counters each commit is four host TPM
commands through hostd (NV_ReadPublic, StartAuthSession, NV_Increment,
NV_Read; tpm/nvcounter.py).

Not part of ``make bench``: a small measurement for docs/REAL-SGX.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.swtpm import Swtpm
from sgxvtpm.endpoint.k2 import K2Client, VmBinding
from sgxvtpm.host.host_tpm import HostTpm
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.testing import HostdProcess
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_RH, TPM2_SU, TPMA_NV
from sgxvtpm.tpm.nv import execute
from sgxvtpm.vmm.client import VmmClient
from sgxvtpm.vmm.credentials import Credentials

INDEX = 0x01500002
ATTRS = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD
EK_HANDLE = 0x81010001


def _host_tpm(directory: Path) -> Swtpm:
    tpm = Swtpm(directory)
    tpm.wait_answering()
    transact = HostTpm(f"swtpm:path={tpm.path}").transact
    template = wire.create_primary(wire.rsa2048_template(), TPM2_RH.ENDORSEMENT)
    transient = wire.parse_create_primary(execute(transact, template)).handle
    execute(transact, wire.evict_control(transient, EK_HANDLE))
    execute(transact, wire.flush_context(transient))
    return tpm


def measure(root: Path, platform: str, counters: str, writes: int) -> list[float]:
    root.mkdir(parents=True)
    state = StateDir(root / "state")
    credentials = Credentials.at(root / "credentials")
    args = ["--platform", platform, "--counters", counters]
    hostd = HostdProcess(state, credentials=credentials, log_path=root / "hostd.log", args=args)
    hostd.start()
    try:
        asyncio.run(VmmClient(state, credentials=credentials).create("vm1"))
        times: list[float] = []
        with K2Client(VmBinding.load(state, "vm1", credentials=credentials)) as t:
            t.power_on()
            execute(t.transact, wire.startup(TPM2_SU.CLEAR))
            execute(t.transact, wire.nv_define_space(INDEX, 8, ATTRS))
            for i in range(writes):
                command = wire.nv_write(INDEX, i.to_bytes(8, "big"))
                start = time.perf_counter()
                execute(t.transact, command)
                times.append(time.perf_counter() - start)
        return times
    finally:
        hostd.stop()


def _summary(times: list[float]) -> str:
    q1, median, q3 = statistics.quantiles(times, n=4)
    return f"median {median * 1e3:.2f} ms (quartiles {q1 * 1e3:.2f}-{q3 * 1e3:.2f} ms)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--platform", default="sim", choices=["sim", "gramine-sim"])
    options = parser.parse_args()
    os.environ["SGXVTPM_PLATFORM"] = options.platform  # how clients verify the enclaves
    with tempfile.TemporaryDirectory(prefix="tpmcost-") as tmp:
        root = Path(tmp)
        sim = measure(root / "sim", options.platform, "sim", options.writes)
        tpm = _host_tpm(root / "swtpm")
        try:
            host = measure(
                root / "tpm", options.platform, f"tpm:swtpm:path={tpm.path}", options.writes
            )
        finally:
            tpm.close()
    print(f"{options.platform}, {options.writes} NV_Write of 8 bytes over K2 each:")
    print(f"  sim counters:           {_summary(sim)}")
    print(f"  host TPM (swtpm) counters: {_summary(host)}")
    added = statistics.median(host) - statistics.median(sim)
    print(f"  added per NV_Write:     {added * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
