"""Portable state blobs: QEMU's GET/SET_STATEBLOB under a VM's fleet key.

An instance whose manager is in a fleet seals the blobs it hands to QEMU
under the VM's per-VM key (HKDF of the fleet key and the VM identity,
enclaves/fleet.py), not under its own platform's sealing key, so the
instance of the same VM on another member platform can open them
(docs/ARCHITECTURE.md, "Many hosts"). Layout, all of it authenticated
(AES-256-GCM, the header as AAD):

  magic (16) | type (u8) | version (u64) | origin (u8 len + platform id, ascii)
  | vm (u16 len + VM identity, utf-8) | nonce (12) | ciphertext + tag

``version`` is the export version (blobcipher.py); ``origin`` the platform
that made the export, so the destination's manager knows whom to tell
that the VM moved. A blob of another VM, type, key or an altered one is
refused; which versions an instance takes is blobcipher.py's decision.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sgxvtpm.errors import SgxvtpmError

MAGIC = b"SGXVTPM-PORTABLE"  # 16 bytes
_NONCE = 12


class PortableBlobError(SgxvtpmError, ValueError):
    """The blob is not a portable blob of this VM and key, or it was altered."""


@dataclass(frozen=True)
class PortableHeader:
    kind: int
    version: int
    origin: str
    vm: str

    def encode(self) -> bytes:
        origin, vm = self.origin.encode("ascii"), self.vm.encode("utf-8")
        if len(origin) > 255 or len(vm) > 0xFFFF:
            raise PortableBlobError("origin or VM identity too long")
        return (
            MAGIC
            + struct.pack(">BQB", self.kind, self.version, len(origin))
            + origin
            + struct.pack(">H", len(vm))
            + vm
        )


def is_portable(blob: bytes) -> bool:
    return blob.startswith(MAGIC)


def seal(key: bytes, header: PortableHeader, plaintext: bytes) -> bytes:
    aad = header.encode()
    nonce = os.urandom(_NONCE)
    return aad + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def parse_header(blob: bytes) -> tuple[PortableHeader, int]:
    """The header and where it ends; PortableBlobError if malformed."""
    try:
        if not is_portable(blob):
            raise PortableBlobError("not a portable state blob")
        off = len(MAGIC)
        kind, version, origin_len = struct.unpack_from(">BQB", blob, off)
        off += 10
        origin = blob[off : off + origin_len].decode("ascii")
        off += origin_len
        (vm_len,) = struct.unpack_from(">H", blob, off)
        off += 2
        vm = blob[off : off + vm_len].decode("utf-8")
        off += vm_len
        if len(origin) != origin_len or len(vm.encode()) != vm_len:
            raise PortableBlobError("truncated portable state blob")
    except (struct.error, UnicodeDecodeError) as exc:
        raise PortableBlobError(f"malformed portable state blob: {exc}") from None
    return PortableHeader(kind, version, origin, vm), off


def unseal(key: bytes, blob: bytes, *, kind: int, vm: str) -> tuple[PortableHeader, bytes]:
    """Open ``blob``: it must be of type ``kind`` and VM ``vm`` and verify under ``key``."""
    header, off = parse_header(blob)
    if header.vm != vm:
        raise PortableBlobError(f"state blob of VM {header.vm!r}, not of {vm!r}")
    if header.kind != kind:
        raise PortableBlobError(f"state blob of type {header.kind}, not {kind}")
    nonce, body = blob[off : off + _NONCE], blob[off + _NONCE :]
    if len(nonce) != _NONCE:
        raise PortableBlobError("truncated portable state blob")
    try:
        plaintext = AESGCM(key).decrypt(nonce, body, blob[:off])
    except InvalidTag:
        raise PortableBlobError(
            "portable state blob does not verify (altered, or another fleet's key)"
        ) from None
    return header, plaintext
