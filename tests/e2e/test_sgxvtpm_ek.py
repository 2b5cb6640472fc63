"""EKs and the attestation chain on the real system, read as a verifier would.

One hostd per module; VM ``ek-vm`` is an instance enclave whose EKs the
manager enclave's CA certified at ``vm create``. tpm2-tools reads the
certificates through the real ``sgxvtpm vm serve`` endpoint (tcti-swtpm),
openssl checks them against ``sgxvtpm ca show --pem``, tpm2-tools runs a
full remote-attestation round, and ``sgxvtpm attest verify`` walks the chain
down to the manager's quote: it passes, and fails with a clear reason when
the CA certificate it is given comes from another hostd (another platform).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.helpers.ek_tools import attestation_round, run_tool
from tests.helpers.endpoint import EndpointProcess, start_vm_endpoint
from tests.helpers.hostd import Hostd, running_hostd
from tests.helpers.vmtools import create_vm, sgxvtpm_cli

from sgxvtpm.attest.verify import R_QUOTE_ROOT

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (shutil.which("tpm2_getekcertificate") and shutil.which("openssl")),
        reason="needs tpm2-tools and openssl",
    ),
]
VM = "ek-vm"
NV_INDEX = {"rsa2048": "0x01c00002", "ecc-p256": "0x01c0000a"}


@dataclass
class Vm:
    hostd: Hostd
    tcti: str
    dir: Path
    certs: dict[str, bytes]  # what vm create returned, DER by EK kind
    ca_pem: Path  # sgxvtpm ca show --pem
    endpoint: EndpointProcess  # sgxvtpm vm serve --swtpm

    def serve(self) -> None:
        self.endpoint = start_vm_endpoint(self.hostd.state, VM, "--swtpm",
                                          str(self.dir / "tpm.sock"), log_dir=self.dir)


@contextmanager
def endpoint_stopped(vm: Vm) -> Iterator[None]:
    """``vm serve`` stopped meanwhile: the VM has one endpoint at a time, and a K2
    client (``attest verify`` without --tcti) is one; the TPM keeps running."""
    vm.endpoint.stop()
    try:
        yield
    finally:
        vm.serve()


@pytest.fixture(scope="module")
def vm(sgx_hostd: Hostd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    work = tmp_path_factory.mktemp("ek")
    info = create_vm(sgx_hostd, VM)
    certs = {alg: bytes.fromhex(der) for alg, der in info.ek_certificates.items()}
    shown = sgxvtpm_cli(sgx_hostd.state, "ca", "show", "--pem")
    assert shown.returncode == 0, shown.stderr
    (work / "ca.pem").write_text(shown.stdout)
    ep = start_vm_endpoint(sgx_hostd.state, VM, "--swtpm", str(work / "tpm.sock"), log_dir=work)
    tcti = f"swtpm:path={ep.address}"
    run_tool(tcti, "tpm2_startup", "-c", cwd=work)
    vm = Vm(sgx_hostd, tcti, work, certs, work / "ca.pem", ep)
    yield vm
    assert vm.endpoint.alive(), "vm serve died during the tests"
    vm.endpoint.stop()


@pytest.fixture(scope="module")
def other_ca_pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The manager CA of a second hostd, with its own platform root."""
    work = tmp_path_factory.mktemp("other")
    with running_hostd(work / "state") as other:
        shown = sgxvtpm_cli(other.state, "ca", "show", "--pem")
    assert shown.returncode == 0, shown.stderr
    (work / "other-ca.pem").write_text(shown.stdout)
    return work / "other-ca.pem"


def _der(data: bytes) -> bytes:
    if data.lstrip().startswith(b"-----"):
        return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    return x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.DER)


def _openssl_verify(
    ca_pem: Path, cert_der: bytes, workdir: Path
) -> subprocess.CompletedProcess[str]:
    cert = workdir / "ek-under-test.pem"
    cert.write_bytes(x509.load_der_x509_certificate(cert_der).public_bytes(
        serialization.Encoding.PEM))
    return subprocess.run(["openssl", "verify", "-CAfile", str(ca_pem), str(cert)],
                          capture_output=True, text=True)


def test_vm_create_certified_both_eks(vm: Vm) -> None:
    assert sorted(vm.certs) == ["ecc-p256", "rsa2048"]


def test_tpm2_getekcertificate(vm: Vm) -> None:
    run_tool(vm.tcti, "tpm2_getekcertificate", "-o", "rsa.crt", "-o", "ecc.crt", cwd=vm.dir)
    assert _der((vm.dir / "rsa.crt").read_bytes()) == vm.certs["rsa2048"]
    assert _der((vm.dir / "ecc.crt").read_bytes()) == vm.certs["ecc-p256"]


@pytest.mark.parametrize("alg", ["rsa2048", "ecc-p256"])
def test_tpm2_nvread_and_openssl_verify(vm: Vm, alg: str, other_ca_pem: Path) -> None:
    out = vm.dir / f"nv-{alg}.der"
    run_tool(vm.tcti, "tpm2_nvread", NV_INDEX[alg], "-C", "o", "-o", str(out), cwd=vm.dir)
    der = out.read_bytes()
    assert der == vm.certs[alg]
    ok = _openssl_verify(vm.ca_pem, der, vm.dir)
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stderr
    assert _openssl_verify(other_ca_pem, der, vm.dir).returncode != 0


def test_attestation_round(vm: Vm) -> None:
    result = attestation_round(vm.tcti, vm.dir / "round")
    assert result.activated == result.secret
    assert result.quote_checked and result.wrong_nonce_rejected
    # tpm2_createek re-derived the very key the manager's CA certified.
    ek_cert = x509.load_der_x509_certificate(vm.certs["rsa2048"])
    assert result.ek_spki == ek_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("via", ["k2", "tcti"])
def test_attest_verify_passes(vm: Vm, via: str) -> None:
    if via == "tcti":
        done = sgxvtpm_cli(vm.hostd.state, "attest", "verify", VM, "--tcti", vm.tcti)
    else:
        with endpoint_stopped(vm):
            done = sgxvtpm_cli(vm.hostd.state, "attest", "verify", VM)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "sgxvtpm attestation: PASS" in out and "[FAIL]" not in out and "[SKIP]" not in out
    for line in ("[PASS] CA quote verifies against platform root",
                 "[PASS] quote measurement in policy", "[PASS] quote REPORTDATA binds CA key",
                 "[PASS] rsa2048 EK certificate signed by CA",
                 "[PASS] ecc-p256 EK certificate signed by CA",
                 "[PASS] rsa2048 EK certificate matches the TPM's EK"):
        assert line in out, out
    assert len(out.splitlines()) <= 25


def test_attest_verify_against_the_managers_ca(vm: Vm) -> None:
    done = sgxvtpm_cli(vm.hostd.state, "attest", "verify", VM, "--ca", "manager",
                       "--tcti", vm.tcti)
    assert done.returncode == 0, done.stdout + done.stderr


def test_attest_verify_fails_with_another_hostds_ca(vm: Vm, other_ca_pem: Path) -> None:
    ca_file = vm.hostd.vm_dir(VM) / "ca.crt"
    original = ca_file.read_bytes()
    ca_file.write_bytes(other_ca_pem.read_bytes())
    try:
        done = sgxvtpm_cli(vm.hostd.state, "attest", "verify", VM, "--tcti", vm.tcti)
    finally:
        ca_file.write_bytes(original)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "sgxvtpm attestation: FAIL" in done.stdout
    assert f"reason: {R_QUOTE_ROOT}" in done.stdout
    assert "[FAIL] rsa2048 EK certificate signed by CA" in done.stdout
    # The same CA given as a file with --ca.
    by_flag = sgxvtpm_cli(vm.hostd.state, "attest", "verify", VM, "--ca", str(other_ca_pem),
                          "--tcti", vm.tcti)
    assert by_flag.returncode == 1 and f"reason: {R_QUOTE_ROOT}" in by_flag.stdout
    assert "[FAIL] ecc-p256 EK certificate signed by CA" in by_flag.stdout


def test_attest_verify_error_is_one_line(vm: Vm) -> None:
    done = sgxvtpm_cli(vm.hostd.state, "attest", "verify", "no-such-vm")
    assert done.returncode == 1
    assert done.stderr.startswith("sgxvtpm: error: ") and "Traceback" not in done.stderr
    assert "no-such-vm" in done.stderr
