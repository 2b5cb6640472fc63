"""A manager EK CA as the manager enclave makes it, on a real simulated platform."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from sgxvtpm.channel.evidence import EnclaveCredential
from sgxvtpm.enclaves.ekcert import issue_ek_certificate, issue_platform_certificate
from sgxvtpm.platform.base import EnclaveIdentity, MeasurementPolicy
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.platform.sim.quote import SimQuoteVerifier
from sgxvtpm.tpm.ek import EkPublic

MANAGER = EnclaveIdentity(mrenclave=b"\x4d" * 32, mrsigner=b"\x53" * 32, isv_prod_id=1, isv_svn=3)
POLICY = MeasurementPolicy(mrenclaves=frozenset({MANAGER.mrenclave}))


@dataclass
class ManagerCa:
    platform: SimPlatformDir
    credential: EnclaveCredential

    @property
    def cert_der(self) -> bytes:
        return self.credential.cert_der

    @property
    def cert_pem(self) -> bytes:
        return self.credential.cert_pem

    def verifier(self) -> SimQuoteVerifier:
        return SimQuoteVerifier(self.platform.root_certificate_pem)

    def sign_ek(self, ek: EkPublic) -> bytes:
        return issue_ek_certificate(self.credential.key, self.credential.certificate, ek)

    def sign_platform(self, ek: EkPublic) -> bytes:
        return issue_platform_certificate(self.credential.key, self.credential.certificate, ek)


def manager_ca(platform_path: Path, identity: EnclaveIdentity = MANAGER) -> ManagerCa:
    """SimPlatformDir at ``platform_path`` and a CA credential quoted as ``identity``."""
    platform = SimPlatformDir.open_or_create(platform_path)
    cred = EnclaveCredential.create(
        platform.enclave_platform(identity), "sgxvtpm manager CA", is_ca=True
    )
    return ManagerCa(platform, cred)


def pem(der: bytes) -> bytes:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
