"""Enclave measurement: MRENCLAVE and MRSIGNER (SDM 38.7, 39.1 in spirit).

On hardware, ECREATE/EADD/EEXTEND hash every page the loader adds and EINIT
fixes the result as MRENCLAVE. The simulation hashes what makes up one of our
enclaves instead: the entry point, each code file (its *relative name* and
its bytes, in spec order) and the configuration. The hash is deterministic
and independent of where the code is installed, so a verifier can compute
the expected MRENCLAVE itself from the code it has installed (SECURITY.md
property 13).

Relative name of a file: inside a Python package (its directory has an
``__init__.py``) it is the path from the top-level package's parent, e.g.
``sgxvtpm/enclaves/instance.py``; otherwise it is the file's base name, e.g.
``libtpms.so.0`` (symlinks are not resolved, so the name is the one listed).

MRSIGNER is SHA-256 of the signer's public key (on hardware: of the SIGSTRUCT
modulus); here of the DER SubjectPublicKeyInfo.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sgxvtpm.platform.base import (
    SGX_FLAGS_DEBUG,
    SGX_FLAGS_EINITTOKENKEY,
    SGX_FLAGS_INITTED,
    SGX_FLAGS_KSS,
    SGX_FLAGS_MODE64BIT,
    SGX_FLAGS_PROVISIONKEY,
    EnclaveIdentity,
    EnclaveSpec,
    PlatformError,
    QuoteVerifier,
)

__all__ = [
    "SGX_FLAGS_DEBUG",
    "SGX_FLAGS_EINITTOKENKEY",
    "SGX_FLAGS_INITTED",
    "SGX_FLAGS_KSS",
    "SGX_FLAGS_MODE64BIT",
    "SGX_FLAGS_PROVISIONKEY",
]

_MRENCLAVE_TAG = b"sgxvtpm-sim MRENCLAVE v1\x00"

# A production (non-debug) 64-bit enclave with XFRM = x87 | SSE, as the
# loader launches it; a debug launch adds FLAGS.DEBUG.
ENCLAVE_ATTRIBUTES = struct.pack("<QQ", SGX_FLAGS_INITTED | SGX_FLAGS_MODE64BIT, 0x3)
DEBUG_ENCLAVE_ATTRIBUTES = struct.pack(
    "<QQ", SGX_FLAGS_INITTED | SGX_FLAGS_MODE64BIT | SGX_FLAGS_DEBUG, 0x3
)


def attributes_of(debug: bool) -> bytes:
    return DEBUG_ENCLAVE_ATTRIBUTES if debug else ENCLAVE_ATTRIBUTES


@dataclass(frozen=True)
class CodeFile:
    """One measured file: its relative name, the path it was read from, its bytes."""

    name: str
    path: Path
    data: bytes

    @property
    def module_name(self) -> str | None:
        """The Python module this file defines, or None for a non-Python file."""
        if not self.name.endswith(".py"):
            return None
        parts = self.name[: -len(".py")].split("/")
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts) if parts else None

    @property
    def is_package(self) -> bool:
        return self.name.endswith("/__init__.py") or self.name == "__init__.py"


def relative_name(path: Path) -> str:
    """The install-location-independent name of ``path`` (see module docstring)."""
    path = path.absolute()
    parts = [path.name]
    parent = path.parent
    while (parent / "__init__.py").is_file() and parent != parent.parent:
        parts.insert(0, parent.name)
        parent = parent.parent
    return "/".join(parts)


def read_code(code_files: Sequence[Path]) -> list[CodeFile]:
    """Read every code file once; these bytes are both measured and run."""
    files = []
    names: set[str] = set()
    for path in code_files:
        name = relative_name(Path(path))
        if name in names:
            raise PlatformError(f"two code files share the relative name {name!r}")
        names.add(name)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise PlatformError(f"cannot read enclave code file {path}: {exc}") from exc
        files.append(CodeFile(name, Path(path).absolute(), data))
    return files


def mrenclave_of(entry: str, code: Sequence[CodeFile], config: bytes) -> bytes:
    """SHA-256 over the entry, each (name, contents) in order, and the config.

    Every field is length-prefixed so that no two different enclaves hash the
    same byte string.
    """
    h = hashlib.sha256(_MRENCLAVE_TAG)
    _absorb(h, entry.encode())
    h.update(struct.pack("<I", len(code)))
    for f in code:
        _absorb(h, f.name.encode())
        _absorb(h, f.data)
    _absorb(h, config)
    return h.digest()


def _absorb(h: hashlib._Hash, data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def measure_mrenclave(spec: EnclaveSpec) -> bytes:
    """The MRENCLAVE the loader gives an enclave built from ``spec``."""
    return mrenclave_of(spec.entry, read_code(spec.code_files), spec.config)


def mrsigner_of(public_key_der: bytes) -> bytes:
    """MRSIGNER: SHA-256 of the enclave signer's DER SubjectPublicKeyInfo."""
    return hashlib.sha256(public_key_der).digest()


def identity_of(
    entry: str,
    code: Sequence[CodeFile],
    config: bytes,
    signer_public_key: bytes,
    isv_prod_id: int,
    isv_svn: int,
    debug: bool = False,
) -> EnclaveIdentity:
    """The identity EINIT would give: measurement plus SIGSTRUCT fields.

    ``signer_public_key`` must be the key that verified the SIGSTRUCT.
    """
    for field_name, value in (("isv_prod_id", isv_prod_id), ("isv_svn", isv_svn)):
        if not 0 <= value <= 0xFFFF:
            raise PlatformError(f"{field_name} {value} does not fit the SIGSTRUCT's u16")
    if ":" not in entry:
        raise PlatformError(f"enclave entry {entry!r} is not 'module:function'")
    return EnclaveIdentity(
        mrenclave=mrenclave_of(entry, code, config),
        mrsigner=mrsigner_of(signer_public_key),
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        attributes=attributes_of(debug),
    )


def identity_of_spec(spec: EnclaveSpec, signer_public_key: bytes) -> EnclaveIdentity:
    """Read ``spec``'s code and compute its identity under ``signer_public_key``."""
    return identity_of(
        spec.entry,
        read_code(spec.code_files),
        spec.config,
        signer_public_key,
        spec.isv_prod_id,
        spec.isv_svn,
        spec.debug,
    )


class SimMeasuredKind:
    """What the sim and gramine-sim kinds (base.PlatformKind) share: the sim's
    measurement, and quotes checked as sim quotes (or with DCAP collateral, when given)."""

    def measure(self, spec: EnclaveSpec) -> bytes:
        return measure_mrenclave(spec)

    def quote_verifier(self, root_pem: bytes, collateral: str | None = None) -> QuoteVerifier:
        if collateral is None:
            from sgxvtpm.platform.sim.quote import SimQuoteVerifier

            return SimQuoteVerifier(root_pem)
        from sgxvtpm.platform import dcap

        return dcap.pinned_verifier(root_pem, collateral)
