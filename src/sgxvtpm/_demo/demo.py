"""``sgxvtpm demo``: the patent's method, step by step, on this machine.

Starts hostd (the SGX module) in a state directory, creates a VM's vTPM
through the manager enclave over K1, uses it over K2, checks the EK chain
down to the manager's quote, runs an AK attestation round with tpm2-pytss
over the in-process K2 TCTI, boots a real QEMU guest whose TPM is
``sgxvtpm vm attach``, restarts hostd to show the sealed state coming back,
and destroys the instance. Every indented line it prints is something it
just checked; any failed check makes the exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from sgxvtpm.host.statedir import StateDir
from sgxvtpm.testing import HostdProcess, terminate
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU, TPMA_NV
from sgxvtpm.tpm.nv import execute
from sgxvtpm.vmm.credentials import Credentials

VM = "demo-vm"
NV_INDEX = 0x01500016
EK_RSA_HANDLE = 0x81010001
BOOT_TIMEOUT = 60.0
_NV_ATTRS = (
    TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | (TPMA_NV.NO_DA)
)


class Checks:
    """Prints each checked fact on one line and remembers whether all held."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, step: str, passed: bool, detail: str = "") -> bool:
        mark = "" if passed else "  <-- FAILED"
        print(f"  {step:<48} {detail}{mark}", flush=True)
        if not passed:
            self.failed.append(step)
        return passed


# ---------------------------------------------------------------- processes


def _hostd(state: StateDir, creds: Credentials, log_path: Path) -> HostdProcess:
    """hostd started (as ``sgxvtpm hostd``) and ready."""
    hostd = HostdProcess(state, credentials=creds, log_path=log_path)
    hostd.start()
    return hostd


@contextlib.contextmanager
def _vm_attach(
    state: StateDir, creds: Credentials, ctrl: Path, log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """The real ``sgxvtpm vm attach`` process, once its control socket listens."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sgxvtpm.cli", "vm", "attach", VM, "--ctrl", str(ctrl),
             "--state-dir", str(state.root), "--credentials", str(creds.root)],
            stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline().decode(errors="replace") if ready else ""
        if not line.startswith("attached "):
            raise RuntimeError(f"vm attach did not start (see {log_path})")
        yield proc
    finally:
        terminate(proc)
        if proc.stdout is not None:
            proc.stdout.close()


# ---------------------------------------------------------------- the steps


def _k2_use(state: StateDir, creds: Credentials, check: Checks) -> bytes:
    """GetRandom, PCR_Extend/Read and an NV write over K2; returns the NV marker."""
    from sgxvtpm.endpoint.k2 import K2Client, VmBinding

    marker = os.urandom(16)
    with K2Client(VmBinding.load(state, VM, credentials=creds)) as tpm:
        tpm.power_on()
        execute(tpm.transact, wire.startup(TPM2_SU.CLEAR))
        rnd = wire.parse_get_random(execute(tpm.transact, wire.get_random(16)))
        check("TPM2_GetRandom(16)", len(rnd) == 16, rnd.hex())
        digest = hashlib.sha256(b"demo measurement").digest()
        execute(tpm.transact, wire.pcr_extend(16, digest))
        pcr = wire.parse_pcr_read(execute(tpm.transact, wire.pcr_read([16]))).digests[0]
        expected = hashlib.sha256(bytes(32) + digest).digest()
        check("PCR_Extend(16) then PCR_Read(16)", pcr == expected, "matches the SHA-256 chain")
        execute(tpm.transact, wire.nv_define_space(NV_INDEX, len(marker), _NV_ATTRS))
        execute(tpm.transact, wire.nv_write(NV_INDEX, marker))
        back = wire.parse_nv_read(execute(tpm.transact, wire.nv_read(NV_INDEX, len(marker))))
        check(f"NV_DefineSpace + NV_Write {NV_INDEX:#010x}", back == marker, marker.hex())
        execute(tpm.transact, wire.shutdown(TPM2_SU.STATE))
    leaked = [p for p in state.root.rglob("*") if p.is_file() and marker in p.read_bytes()]
    check("marker in the clear in any file on the host?", not leaked,
          "no" if not leaked else f"YES: {leaked}")
    return marker


def _attest_chain(state: StateDir, creds: Credentials, check: Checks) -> None:
    from sgxvtpm.attest.cli import verify_vm

    report = verify_vm(state, VM, credentials=creds)
    for line in report.render().splitlines():
        print("    " + line)
    check("sgxvtpm attest verify " + VM, report.ok, "PASS" if report.ok else report.reason)


@dataclass
class AkRound:
    ek_matches_certificate: bool
    activated: bool
    quote_signature: bool
    quote_nonce: bool
    quote_pcrs: bool
    pcrs: str


def _ak_round(state: StateDir, creds: Credentials) -> AkRound:
    """tpm2-pytss over K2Tcti: AK under the EK, credential activation, PCR quote."""
    from cryptography.hazmat.primitives import serialization
    from tpm2_pytss import ESAPI, TPM2_SU, TSS2_Exception

    from sgxvtpm.endpoint.tcti import K2Tcti

    cert = _ek_certificate(state, creds)
    # The TPM step 3 started keeps running, not reset.
    tcti = K2Tcti.open(VM, state.root, credentials=creds.root)
    esapi = ESAPI(tcti)
    try:
        with contextlib.suppress(TSS2_Exception):  # TPM_RC_INITIALIZE: started already
            esapi.startup(TPM2_SU.CLEAR)
        return _ak_round_on(esapi, cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    finally:
        esapi.close()
        tcti.finalize()


def _ek_certificate(state: StateDir, creds: Credentials) -> x509.Certificate:
    """The RSA EK certificate ``vm create`` returned (the one step 4 verified)."""
    info = json.loads((creds.host(state).vm(VM) / "instance.json").read_text())
    return x509.load_der_x509_certificate(bytes.fromhex(info["ek_certificates"]["rsa2048"]))


def _ak_round_on(esapi: Any, ek_cert_spki: bytes) -> AkRound:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from tpm2_pytss import (
        ESYS_TR,
        TPM2_ALG,
        TPM2_SE,
        TPM2_ST,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPMA_OBJECT,
        TPMS_ATTEST,
        TPMT_SIG_SCHEME,
        TPMT_SYM_DEF,
    )
    from tpm2_pytss.utils import make_credential

    def endorsement_session() -> Any:
        # The EK's policy is PolicySecret(TPM_RH_ENDORSEMENT) (EK Credential Profile B.3.3).
        session = esapi.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)
        return session

    def with_ek(call: Any, *args: Any, slot: str = "session1") -> Any:
        """``call`` with the EK authorized by a fresh policy session in ``slot``."""
        session = endorsement_session()
        try:
            if slot == "session2":  # the EK is the second authorized handle
                return call(*args, session1=ESYS_TR.PASSWORD, session2=session)
            return call(*args, session1=session)
        finally:
            esapi.flush_context(session)

    ek = esapi.tr_from_tpmpublic(EK_RSA_HANDLE)
    ek_public, _, _ = esapi.read_public(ek)
    ek_spki = serialization.load_pem_public_key(ek_public.to_pem()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    # A restricted ECDSA signing key: the Attestation Key (TCG "AK").
    ak_attrs = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
                | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
                | TPMA_OBJECT.USERWITHAUTH)  # fmt: skip
    template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=ak_attrs)
    priv, pub, *_ = with_ek(esapi.create, ek, TPM2B_SENSITIVE_CREATE(), template)
    ak = with_ek(esapi.load, ek, priv, pub)
    # The verifier, off-TPM: a secret only the TPM holding this EK and AK can recover.
    secret = os.urandom(32)
    blob, encrypted = make_credential(ek_public, secret, esapi.tr_get_name(ak))
    activated = with_ek(esapi.activate_credential, ak, ek, blob, encrypted, slot="session2")
    nonce = os.urandom(16)
    selection = "sha256:0,1,2,3,4,5,6,7,16"
    quoted, signature = esapi.quote(ak, selection, nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
    # TPM2_PCR_Read returns at most 8 digests per call (Part 3, 22.4).
    pcrs = b"".join(bytes(d) for d in esapi.pcr_read("sha256:0,1,2,3,4,5,6,7")[2])
    pcrs += b"".join(bytes(d) for d in esapi.pcr_read("sha256:16")[2])
    attest, _ = TPMS_ATTEST.unmarshal(bytes(quoted))
    ak_key = serialization.load_pem_public_key(pub.to_pem())
    assert isinstance(ak_key, ec.EllipticCurvePublicKey)
    sig = encode_dss_signature(int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big"),
                               int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big"))
    try:
        ak_key.verify(sig, bytes(quoted), ec.ECDSA(hashes.SHA256()))
        signed = True
    except InvalidSignature:
        signed = False
    esapi.flush_context(ak)
    return AkRound(
        ek_matches_certificate=ek_spki == ek_cert_spki,
        activated=bytes(activated) == secret,
        quote_signature=signed and attest.type == TPM2_ST.ATTEST_QUOTE,
        quote_nonce=bytes(attest.extraData) == nonce,
        quote_pcrs=bytes(attest.attested.quote.pcrDigest) == hashlib.sha256(pcrs).digest(),
        pcrs="0-7,16",
    )


def _guest_boot(state: StateDir, creds: Credentials, tmp: Path, check: Checks) -> None:
    """A real QEMU guest whose TPM is ``sgxvtpm vm attach``; what the guest sees."""
    from sgxvtpm._demo.guest import EventLogError, Guest, build_initramfs, missing_tools
    from sgxvtpm._demo.guest import replay_event_log as replay
    from sgxvtpm.endpoint.k2 import K2Busy, K2Client, VmBinding

    missing = missing_tools()
    if missing:
        check("QEMU guest tools present", False, "missing: " + ", ".join(missing))
        return
    initrd = build_initramfs(tmp)
    ctrl = tmp / "vtpm.ctrl"
    with _vm_attach(state, creds, ctrl, tmp / "attach.log"):
        t0 = time.perf_counter()
        guest = Guest(tmp, initrd, ctrl, "demo-guest")
        try:
            boot = guest.wait_for_boots(1, BOOT_TIMEOUT)[0]
            took = time.perf_counter() - t0
            check("guest kernel found /dev/tpm0", boot.tpm_version == "2",
                  f"TPM {boot.tpm_version or 'none'}.0, booted in {took:.1f} s (-accel tcg)")
            for n in range(8):
                check(f"guest reads PCR {n} (sha256)", len(boot.pcrs.get(n, "")) == 64,
                      boot.pcrs.get(n, "(missing)"))
            try:
                replayed = replay(boot.event_log)
            except EventLogError as exc:
                replayed = {}
                check("firmware event log parses", False, str(exc))
            same = all(replayed.get(n, b"").hex() == boot.pcrs.get(n) for n in range(8))
            check("PCR 0-7 = replay of the firmware's event log", same and bool(replayed),
                  f"{len(boot.event_log)} bytes of SeaBIOS measurements")
            # The guest's endpoint holds its TPM: another session (which could
            # reset it and erase what the firmware measured) is refused.
            try:
                with K2Client(VmBinding.load(state, VM, credentials=creds)) as tpm:
                    tpm.power_on()
                refused = False
            except K2Busy:
                refused = True
            check("a second K2 session while the guest runs", refused,
                  "refused: one endpoint per VM")
        finally:
            check("QEMU quit cleanly", guest.stop() == 0)


# ---------------------------------------------------------------- the demo


def run_demo(state: StateDir | None = None) -> int:
    """The demo on ``state`` with the user's credentials directory, or on a throwaway
    state directory with a throwaway credentials directory next to it."""
    with tempfile.TemporaryDirectory(prefix="sgxvtpm-demo-") as tmp:
        creds = Credentials.at(None) if state else Credentials(Path(tmp) / "credentials")
        state = state or StateDir(Path(tmp) / "state")
        state.ensure()
        return _demo(state, creds, Path(tmp))


def _demo(state: StateDir, creds: Credentials, tmp: Path) -> int:
    from sgxvtpm.enclaves.specs import expected_policy
    from sgxvtpm.endpoint.k2 import K2Client, VmBinding
    from sgxvtpm.vmm.client import VmmClient

    check = Checks()
    started = time.perf_counter()
    print("sgxvtpm demo: the vTPM manager and each VM's vTPM run in (simulated) SGX enclaves\n")
    log_path = tmp / "hostd.log"
    print("1. hostd, the SGX module, loads the platform and launches the manager enclave E1")
    hostd = _hostd(state, creds, log_path)
    try:
        vmm = VmmClient(state, credentials=creds)
        ca = asyncio.run(vmm.ca_certificate())
        check("K1 to E1: quote verified, operator key pinned", True, ca.subject.rfc4514_string())

        print("2. vm create: E1 has the loader launch instance enclave E2, verifies, provisions it")
        t0 = time.perf_counter()
        info = asyncio.run(vmm.create(VM))
        check("instance enclave E2 running", info.state == "running",
              f"pid {info.pid}, {time.perf_counter() - t0:.2f} s")
        mrenclave = bytes.fromhex(info.mrenclave)
        expected = expected_policy("instance", creds.host(state).platform)
        check("E2 MRENCLAVE = the instance code installed here",
              mrenclave in expected.mrenclaves, info.mrenclave[:32] + "...")
        check("EKs manufactured, certified by E1's CA", sorted(info.ek_certificates) ==
              sorted(info.ek), ", ".join(info.ek))

        print("3. the VM talks TPM 2.0 to E2 over K2 (hostd relays only TLS records)")
        marker = _k2_use(state, creds, check)

        print("4. attestation: the EK certificates chain to E1's CA, whose quote is checked")
        _attest_chain(state, creds, check)

        print("5. AK attestation round (tpm2-pytss ESAPI over the in-process K2 TCTI)")
        ak = _ak_round(state, creds)
        check("EK at 0x81010001 is the certified key", ak.ek_matches_certificate)
        check("AK created under the EK (ECC P-256, restricted)", True)
        check("credential made off-TPM to the EK, activated", ak.activated, "secret recovered")
        check("quote signed by the AK", ak.quote_signature, "TPM2_ST_ATTEST_QUOTE")
        check("quote carries the verifier's nonce", ak.quote_nonce)
        check(f"quote PCR digest = PCRs {ak.pcrs} read back", ak.quote_pcrs)

        print("6. a QEMU guest boots with its TPM on `sgxvtpm vm attach` (K2 to E2)")
        _guest_boot(state, creds, tmp, check)

        print("7. hostd restarts; the instance comes back from its sealed state")
        hostd.stop()
        hostd = _hostd(state, creds, log_path)
        with K2Client(VmBinding.load(state, VM, credentials=creds)) as tpm:
            tpm.power_on()
            execute(tpm.transact, wire.startup(TPM2_SU.CLEAR))
            data = wire.parse_nv_read(execute(tpm.transact, wire.nv_read(NV_INDEX, len(marker))))
            execute(tpm.transact, wire.shutdown(TPM2_SU.CLEAR))
        check(f"NV_Read {NV_INDEX:#010x} after restart", data == marker, data.hex())

        print("8. vm destroy: binding revoked, enclave stopped, sealed state erased")
        asyncio.run(vmm.destroy(VM))
        left = asyncio.run(vmm.list())
        check("instances left", not left, str(len(left)))
        check("sealed state erased", not state.instance(info.instance_id).exists())
    finally:
        if hostd.running():
            hostd.stop()
    took = time.perf_counter() - started
    if check.failed:
        print(f"\ndemo found a problem ({len(check.failed)} failed checks), {took:.0f} s")
        return 1
    print(f"\ndemo complete: every check passed, {took:.0f} s")
    return 0
