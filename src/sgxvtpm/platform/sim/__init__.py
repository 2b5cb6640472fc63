"""The simulated SGX platform (README.md, "What sim mode protects against").

Real cryptography behind Intel SDM names: EGETKEY (AES-CMAC key derivation),
EREPORT (the 432-byte REPORT), DCAP v3 ECDSA-P256 quotes under a simulated
provisioning root, durable monotonic counters, and a zygote loader that runs
each enclave as a hardened child process. It does not give memory isolation
from root on the host; that is what SGX hardware (the gramine backend) is for.
"""

from sgxvtpm.platform.sim import egetkey, sigstruct
from sgxvtpm.platform.sim.enclave import SimEnclavePlatform
from sgxvtpm.platform.sim.loader import SimEnclaveHandle, SimLoader
from sgxvtpm.platform.sim.measure import identity_of_spec, measure_mrenclave, mrsigner_of
from sgxvtpm.platform.sim.platform_dir import SimPlatformDir
from sgxvtpm.platform.sim.quote import SimQuoteVerifier

__all__ = [
    "SimEnclaveHandle",
    "SimEnclavePlatform",
    "SimLoader",
    "SimPlatformDir",
    "SimQuoteVerifier",
    "egetkey",
    "identity_of_spec",
    "measure_mrenclave",
    "mrsigner_of",
    "sigstruct",
]
