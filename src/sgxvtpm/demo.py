"""``sgxvtpm demo``: the patent's method, step by step, on this machine.

Starts hostd (the SGX module) in a state directory, creates a VM's vTPM
through the manager enclave over K1, uses it over K2, restarts hostd to show
the sealed state coming back, checks the EK chain down to the manager's
quote, and cleans up. Every line it prints is something it just checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sgxvtpm.host.statedir import StateDir
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU, TPMA_NV
from sgxvtpm.tpm.nv import execute

_NV_ATTRS = (
    TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | (TPMA_NV.NO_DA)
)


def _say(step: str, detail: str = "") -> None:
    print(f"  {step:<44} {detail}", flush=True)


def _start_hostd(state: StateDir, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sgxvtpm.cli", "hostd", "--state-dir", str(state.root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait_ready(state, proc)
    return proc


def _wait_ready(state: StateDir, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    from sgxvtpm.vmm.client import VmmClient, VmmError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hostd exited with status {proc.returncode}")
        if state.socket.exists():
            try:
                asyncio.run(VmmClient(state).request({"op": "list"}))
                return
            except (VmmError, OSError, TimeoutError):
                pass
        time.sleep(0.1)
    raise TimeoutError("hostd did not become ready")


def _stop_hostd(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def run_demo(state: StateDir | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="sgxvtpm-demo-") as tmp:
        state = state or StateDir(Path(tmp) / "state")
        state.ensure()
        return _demo(state, Path(tmp))


def _demo(state: StateDir, tmp: Path) -> int:
    from sgxvtpm.attest.verify import verify_ek_chain
    from sgxvtpm.enclaves.specs import expected_policy
    from sgxvtpm.endpoint.k2 import K2Client, VmBinding
    from sgxvtpm.tpm.ek import read_ek_certificate
    from sgxvtpm.vmm.client import VmmClient, platform_verifier

    print("sgxvtpm demo: the vTPM manager and each VM's vTPM run in (simulated) SGX enclaves\n")
    log_path = tmp / "hostd.log"
    print("1. hostd, the SGX module, loads the platform and launches the manager enclave E1")
    proc = _start_hostd(state, log_path)
    try:
        vmm = VmmClient(state)
        ca = asyncio.run(vmm.ca_certificate())
        _say("K1 to E1: quote verified, operator key pinned", ca.subject.rfc4514_string())

        print(
            "2. vm create: E1 has the loader launch instance enclave E2, verifies and provisions it"
        )
        t0 = time.perf_counter()
        info = asyncio.run(vmm.create("demo-vm"))
        _say("instance enclave E2 running", f"pid {info['pid']}, {time.perf_counter() - t0:.2f} s")
        _say("E2 MRENCLAVE", info["mrenclave"][:32] + "…")
        _say("EKs manufactured, certified by E1's CA", ", ".join(info["ek"]))

        print("3. the VM talks TPM 2.0 to E2 over K2 (hostd relays only TLS records)")
        binding = VmBinding.load(state, "demo-vm")
        marker = os.urandom(16)
        with K2Client(binding) as tpm:
            tpm.power_on()
            execute(tpm.transact, wire.startup(TPM2_SU.CLEAR))
            rnd = wire.parse_get_random(execute(tpm.transact, wire.get_random(16)))
            _say("TPM2_GetRandom(16)", rnd.hex())
            digest = hashlib.sha256(b"demo measurement").digest()
            execute(tpm.transact, wire.pcr_extend(16, digest))
            pcr = wire.parse_pcr_read(execute(tpm.transact, wire.pcr_read([16]))).digests[0]
            expected = hashlib.sha256(bytes(32) + digest).digest()
            _say(
                "PCR_Extend(16) then PCR_Read(16)",
                "matches SHA-256 chain" if pcr == expected else "MISMATCH",
            )
            index = 0x01500016
            execute(tpm.transact, wire.nv_define_space(index, len(marker), _NV_ATTRS))
            execute(tpm.transact, wire.nv_write(index, marker))
            _say("NV_DefineSpace + NV_Write 0x01500016", marker.hex())
            ek_der = read_ek_certificate(tpm.transact, "rsa2048")
            execute(tpm.transact, wire.shutdown(TPM2_SU.STATE))
        leaked = [p for p in state.root.rglob("*") if p.is_file() and marker in p.read_bytes()]
        _say("marker in any file under the state dir?", "no" if not leaked else f"YES: {leaked}")

        print("4. attestation: the EK certificate chains to E1's CA, whose quote is checked")
        report = verify_ek_chain(
            ek_der,
            (state.vm("demo-vm") / "ca.crt").read_bytes(),
            policy=expected_policy("manager"),
            verifier=platform_verifier(state),
        )
        for line in report.render().splitlines():
            print("    " + line)

        print("5. hostd restarts; the instance comes back from its sealed state")
        _stop_hostd(proc)
        proc = _start_hostd(state, log_path)
        with K2Client(VmBinding.load(state, "demo-vm")) as tpm:
            tpm.power_on()
            execute(tpm.transact, wire.startup(TPM2_SU.CLEAR))
            data = wire.parse_nv_read(execute(tpm.transact, wire.nv_read(index, len(marker))))
            _say("NV_Read 0x01500016 after restart", data.hex())
            ok = data == marker
            execute(tpm.transact, wire.shutdown(TPM2_SU.CLEAR))

        print("6. vm destroy: binding revoked, enclave stopped, sealed state erased")
        asyncio.run(vmm.destroy("demo-vm"))
        _say("instances left", str(len(asyncio.run(vmm.list()))))
    finally:
        _stop_hostd(proc)
    print("\ndemo complete" if ok and report.ok else "\ndemo found a problem")
    return 0 if ok and report.ok else 1
