"""sgxvtpm: a vTPM service whose manager and per-VM TPM instances run in enclaves.

Implements the method of patent CN105389513 on real parts: libtpms as the TPM
engine, TLS 1.3 with enclave attestation (RA-TLS) as the channels K1 and K2,
and a platform layer that simulates Intel SGX (``sim``) or runs on it.
"""

__version__ = "0.1.0"
