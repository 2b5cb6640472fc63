"""The Gramine backend: sgxvtpm's enclaves as Gramine SGX enclaves (docs/REAL-SGX.md).

- :mod:`.manifest`: the manifest template of each enclave role, rendered
  from the measured set and checked (``sgxvtpm gramine manifest``);
- :mod:`.bootstrap`: the first code in the enclave (the manifest's argv):
  launch arguments and the host stream on stdio, then the entry point;
- :mod:`.attestation`: base.EnclavePlatform over /dev/attestation;
- :mod:`.egetkey`: the small trusted EGETKEY helper (``egetkey.c``);
- :mod:`.structs`: TARGETINFO and KEYREQUEST layouts;
- :mod:`.backend`: the ``gramine`` platform kind.

On this machine (no SGX) the same enclave code path runs as
``gramine-sim`` (platform/sim/gramine_sim.py).
"""
