"""``sgxvtpm demo`` and the QEMU guest it boots: private, not an API.

Nothing here runs in an enclave (enclaves/specs.py refuses an enclave
import of this package), and nothing but ``sgxvtpm demo`` and the tests
imports it.
"""
