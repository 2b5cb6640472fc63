"""Remote attestation of a vTPM: EK certificate -> manager CA -> enclave quote."""

from sgxvtpm.attest.report import AttestReport, Check
from sgxvtpm.attest.verify import verify_ek_chain

__all__ = ["AttestReport", "Check", "verify_ek_chain"]
