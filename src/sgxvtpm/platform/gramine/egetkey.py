"""The EGETKEY helper of a Gramine enclave on SGX hardware (attestation.EgetkeyHelper).

``egetkey.c`` is ~20 lines that execute ENCLU[EGETKEY] on a caller's
KEYREQUEST; built on the SGX host as ``libsgxvtpm_egetkey.so`` next to
this module and listed in ``sgx.trusted_files`` (measured), it is loaded
here with ctypes. Its interface, one 512-byte KEYREQUEST in and one 16-byte
key out, is what gramine-sim serves from the sim CPU and tests; the
instruction itself runs only on SGX hardware (docs/REAL-SGX.md).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from sgxvtpm.platform.base import PlatformError
from sgxvtpm.platform.gramine.structs import KEY_REQUEST_SIZE

LIBRARY = Path(__file__).with_name("libsgxvtpm_egetkey.so")
# EGETKEY's RAX on failure (SDM vol. 3D, 40 "EGETKEY"): the ones a caller can cause.
_ERRORS = {
    4: "SGX_INVALID_ATTRIBUTE (a key the enclave's ATTRIBUTES do not allow)",
    8: "SGX_INVALID_KEYNAME",
    32: "SGX_INVALID_CPUSVN (above the platform's)",
    64: "SGX_INVALID_ISVSVN (above the enclave's)",
}


class NativeEgetkey:
    """ENCLU[EGETKEY] through ``libsgxvtpm_egetkey.so`` (SGX hardware only)."""

    def __init__(self, library: Path = LIBRARY) -> None:
        self._lib = ctypes.CDLL(str(library))
        self._fn = self._lib.sgxvtpm_egetkey
        self._fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        self._fn.restype = ctypes.c_int

    @classmethod
    def load_if_built(cls) -> NativeEgetkey | None:
        return cls() if LIBRARY.is_file() else None

    def egetkey(self, key_request: bytes) -> bytes:
        if len(key_request) != KEY_REQUEST_SIZE:
            raise PlatformError(f"EGETKEY: KEYREQUEST must be {KEY_REQUEST_SIZE} bytes")
        out = ctypes.create_string_buffer(16)
        rc = self._fn(key_request, out)
        if rc != 0:
            raise PlatformError(f"EGETKEY failed: {_ERRORS.get(rc, rc)}")
        return out.raw
