"""``sgxvtpm attest verify NAME``: a verifier's check of one VM's vTPM, and its Python API.

The verifier reads what a remote verifier would read from the VM's TPM, the
EK certificates in their TCG NV indices and the EKs themselves (TPM2_ReadPublic
on the persistent handles), and walks the chain down to the manager enclave's
quote with :func:`~sgxvtpm.attest.verify.verify_ek_chain`:

- the TPM is reached in process over K2 (the VM's binding in the
  credentials directory, sgxvtpm/vmm/credentials.py), or through any TCTI
  (``--tcti swtpm:path=...``, e.g. a ``sgxvtpm vm serve`` endpoint or a VM's
  own TPM stack), with tpm2-pytss;
- the CA certificate is the one ``vm create`` stored in the VM's binding (``ca.crt``),
  the manager's current one (``--ca manager``, over K1 as ``ca show``), or a
  file the verifier was given (``--ca PATH``, PEM or DER);
- the quote is checked against this platform's attestation root, as pinned in
  the credentials directory, and the measurement policy of the manager code
  installed here.

Reading never disturbs a running VM: only read commands are sent, and the
TPM is started (INIT, TPM2_Startup) only if nobody has started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sgxvtpm.attest.report import AttestReport
from sgxvtpm.attest.verify import verify_ek_chain
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.platform.base import MeasurementPolicy, QuoteVerifier
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_RC, TPM2_SU
from sgxvtpm.tpm.ek import EkPublic, profile, read_ek_certificate, read_ek_public
from sgxvtpm.tpm.nv import Transact, execute
from sgxvtpm.tpm.wire import TpmResponseError
from sgxvtpm.vmm.credentials import Credentials, CredentialsError

CA_FROM_VM = "vm"
CA_FROM_MANAGER = "manager"
DEFAULT_EKS = ("rsa2048",)
R_NO_EK_CERT = "no EK certificate in the TPM"


class AttestError(SgxvtpmError):
    """The verifier could not read what it checks (TPM, CA certificate); the message says which.

    Start the VM's endpoint (or give the right ``--tcti``), or pass the
    manager's CA certificate (``sgxvtpm ca show --pem``).
    """


@dataclass(frozen=True)
class EkEvidence:
    """What the TPM holds for one EK kind: its certificate (None if absent) and public key."""

    alg: str
    certificate: bytes | None
    public: EkPublic | None
    error: str = ""


# ---------------------------------------------------------------- reading the TPM


def _startup_if_needed(transact: Transact, power_on: Callable[[], None] | None) -> bool:
    """Start the TPM only if nobody did; True if we did (then we shut it down again).

    A probe with TPM2_ReadClock answers TPM_RC_FAILURE when the instance is not
    running (swtpm's answer before CMD_INIT), TPM_RC_INITIALIZE before
    TPM2_Startup (Part 1, 12.2.1), success when a VM is using it.
    """
    rc = wire.response_code(transact(wire.read_clock()))
    if rc == TPM2_RC.SUCCESS:
        return False
    if rc == TPM2_RC.FAILURE and power_on is not None:
        power_on()
        rc = TPM2_RC.INITIALIZE
    if rc != TPM2_RC.INITIALIZE:
        raise AttestError(f"the TPM is not usable: {TpmResponseError(rc)}")
    execute(transact, wire.startup(TPM2_SU.CLEAR))
    return True


def read_evidence(
    transact: Transact, algs: Sequence[str], *, power_on: Callable[[], None] | None = None
) -> list[EkEvidence]:
    """EK certificates and EK public keys of ``algs`` from the TPM behind ``transact``."""
    started = _startup_if_needed(transact, power_on)
    found: list[EkEvidence] = []
    for alg in algs:
        try:
            cert = read_ek_certificate(transact, alg)
        except TpmResponseError as exc:
            found.append(EkEvidence(alg, None, None, f"NV {profile(alg).nv_index:#010x}: {exc}"))
            continue
        try:
            public: EkPublic | None = read_ek_public(transact, alg)
            error = ""
        except TpmResponseError as exc:
            public, error = None, f"EK {profile(alg).handle:#010x}: {exc}"
        found.append(EkEvidence(alg, cert, public, error))
    if started:
        execute(transact, wire.shutdown(TPM2_SU.STATE))
    return found


@contextlib.contextmanager
def _k2_transport(
    state: StateDir, name: str, credentials: Credentials
) -> Iterator[tuple[Transact, Callable[[], None]]]:
    from sgxvtpm.endpoint.k2 import K2Busy, K2Client, VmBinding

    binding = VmBinding.load(state, name, credentials=credentials)
    client = K2Client(binding, label="attest verify")
    try:
        client.connect()
    except K2Busy as exc:  # the VM's endpoint holds its TPM; it can be read through it
        raise exc.with_hint("read the TPM through that endpoint with --tcti") from None
    with client:
        yield client.transact, client.power_on_if_stopped


@contextlib.contextmanager
def _tcti_transport(tcti: str) -> Iterator[tuple[Transact, None]]:
    try:
        from tpm2_pytss.TCTILdr import TCTILdr
    except ImportError:
        raise AttestError("--tcti needs tpm2-pytss (pip install tpm2-pytss)") from None
    try:
        ctx = TCTILdr.parse(tcti)
    except Exception as exc:  # tpm2-pytss raises TSS2_Exception or RuntimeError
        raise AttestError(f"cannot open TCTI {tcti!r}: {exc}") from None

    def transact(command: bytes) -> bytes:
        ctx.transmit(command)
        return bytes(ctx.receive())

    try:
        yield transact, None
    finally:
        ctx.close()


# ---------------------------------------------------------------- the CA certificate


def _load_cert(data: bytes, where: str) -> bytes:
    try:
        cert = (
            x509.load_pem_x509_certificate(data)
            if data.lstrip().startswith(b"-----")
            else x509.load_der_x509_certificate(data)
        )
    except ValueError:
        raise AttestError(f"{where}: not a certificate") from None
    return cert.public_bytes(serialization.Encoding.DER)


def ca_certificate(
    state: StateDir, name: str, source: str = CA_FROM_VM, credentials: Credentials | None = None
) -> bytes:
    """The DER CA certificate to check against, from ``source`` (see the module doc)."""
    credentials = credentials or Credentials.at(None)
    if source == CA_FROM_MANAGER:
        from sgxvtpm.vmm.client import VmmClient

        cert = asyncio.run(VmmClient(state, credentials=credentials).ca_certificate())
        return cert.public_bytes(serialization.Encoding.DER)
    if source == CA_FROM_VM:
        try:
            path = credentials.host(state).existing_vm(name) / "ca.crt"
        except CredentialsError as exc:
            raise AttestError(str(exc)) from None
    else:
        path = Path(source)
    try:
        return _load_cert(path.read_bytes(), str(path))
    except OSError as exc:
        raise AttestError(f"cannot read the CA certificate {path}: {exc.strerror}") from None


def _instance_eks(state: StateDir, name: str, credentials: Credentials) -> tuple[str, ...]:
    try:
        info = json.loads((credentials.host(state).vm(name) / "instance.json").read_text())
        return tuple(str(alg) for alg in info.get("ek") or DEFAULT_EKS)
    except (OSError, ValueError, CredentialsError):
        return DEFAULT_EKS


# ---------------------------------------------------------------- the report


def combine(evidence: Sequence[EkEvidence], ca_der: bytes, *, policy: MeasurementPolicy,
            verifier: QuoteVerifier) -> AttestReport:
    """One report for every EK: the CA checks once, the EK checks per EK kind."""
    combined = AttestReport()
    seen: set[str] = set()
    for item in evidence:
        if item.certificate is None:
            combined.add(f"{item.alg} EK certificate in NV", False, item.error, R_NO_EK_CERT)
            continue
        one = verify_ek_chain(item.certificate, ca_der, policy=policy, verifier=verifier,
                              ek_public=item.public)
        if item.public is None:
            one.add("EK read from the TPM", False, item.error, "the TPM has no such EK")
        for key, value in one.facts.items():
            label = f"{item.alg} EK" if key == "EK key" else key
            combined.facts.setdefault(label, value)
        for check in one.checks:
            is_ek = check.name.startswith("EK")
            if not is_ek and check.name in seen:
                continue
            seen.add(check.name)
            # The combined report keeps the first failure's reason, and the first
            # failing check here is always the first failing check of ``one``.
            reason = f"{item.alg}: {one.reason}" if is_ek else one.reason
            name = f"{item.alg} {check.name}" if is_ek else check.name
            combined.add(name, check.passed, check.detail, reason)
    return combined


def verify_vm(
    state: StateDir,
    name: str,
    *,
    ca: str = CA_FROM_VM,
    tcti: str | None = None,
    eks: Sequence[str] | None = None,
    policy: MeasurementPolicy | None = None,
    verifier: QuoteVerifier | None = None,
    credentials: Credentials | None = None,
) -> AttestReport:
    """Read VM ``name``'s EKs through its TPM and verify them down to the manager's quote.

    Raises :class:`AttestError` (or the transport's error) if the TPM or the CA
    certificate cannot be read; a chain that does not verify is a failing
    report, never an exception.
    """
    credentials = credentials or Credentials.at(None)
    algs = tuple(eks) if eks else _instance_eks(state, name, credentials)
    for alg in algs:
        profile(alg)  # ValueError names the supported kinds
    ca_der = ca_certificate(state, name, ca, credentials)
    if verifier is None:
        try:
            verifier = credentials.host(state).verifier()
        except CredentialsError as exc:
            raise AttestError(str(exc)) from None
    transport = _tcti_transport(tcti) if tcti else _k2_transport(state, name, credentials)
    with transport as (transact, power_on):
        evidence = read_evidence(transact, algs, power_on=power_on)
    if policy is None:
        try:
            policy = credentials.host(state).policy("manager")
        except CredentialsError as exc:
            raise AttestError(str(exc)) from None
    return combine(evidence, ca_der, policy=policy, verifier=verifier)


def run(
    state: StateDir,
    name: str,
    *,
    ca: str,
    tcti: str | None,
    eks: Sequence[str],
    credentials: Credentials | None = None,
    as_json: bool = False,
) -> int:
    """The CLI: print the one-screen report (or JSON); 0 if it passed, 1 if not."""
    report = verify_vm(state, name, ca=ca, tcti=tcti, eks=eks, credentials=credentials)
    if as_json:
        print(json.dumps({"vm": name, **report.to_json()}, indent=2))
        return 0 if report.ok else 1
    print(f"VM {name}")
    print(report.render(), end="")
    return 0 if report.ok else 1
