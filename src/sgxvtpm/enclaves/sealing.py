"""Sealed state at rest (SECURITY.md properties 12 and 15).

A sealed blob is AES-256-GCM under a key derived (HKDF-SHA256) from the
platform SEAL key (EGETKEY, MRSIGNER policy, so an upgraded enclave of the
same signer can still read it) and the owner's id. The header is the AAD and
holds the format version, the kind of blob, the owner (instance) id, the VM
id and the state version; so a blob of another instance, another kind, or an
altered header does not open.

Freshness is the caller's: the state version in the header is compared
with a platform monotonic counter. The write order that makes a crash safe is
*write blob v+1 durably, then increment the counter to v+1*; on load a blob
whose version is the counter or the counter + 1 is current, anything lower is
a rollback.

Layout (all integers big-endian)::

    magic "SGXVTPMS" | u16 format | u8 kind | u8 0 | u64 version
    | u16 len + owner id | u16 len + vm id | 12-byte nonce | ciphertext+tag
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.platform.base import EnclavePlatform, KeyName, KeyPolicy, KeyRequest

MAGIC = b"SGXVTPMS"
FORMAT_VERSION = 1
_FIXED = struct.Struct(">8sHBBQ")
_NONCE = 12
MAX_ID = 256


class SealKind(enum.IntEnum):
    INSTANCE_STATE = 1
    MANAGER_REGISTRY = 2
    # GET/SET_STATEBLOB blobs handed to the host (blobcipher.py), one kind per
    # blob type so one type cannot be passed off as another.
    STATE_BLOB_PERMANENT = 3
    STATE_BLOB_VOLATILE = 4
    STATE_BLOB_SAVESTATE = 5
    # An instance's resume records (resume.py), in its slot files.
    RESUME_RECORD = 6


class SealError(SgxvtpmError):
    """A sealed blob was refused: damaged, foreign, or older than the platform counter.

    The message is for the operator's log and ``vm show``; it says what is
    wrong, never any content. Restore the right file or recreate the instance.
    """


@dataclass(frozen=True)
class SealHeader:
    kind: SealKind
    version: int
    owner_id: str
    vm_id: str

    def encode(self) -> bytes:
        owner = self.owner_id.encode()
        vm = self.vm_id.encode()
        if len(owner) > MAX_ID or len(vm) > MAX_ID:
            raise ValueError("id too long")
        return (
            _FIXED.pack(MAGIC, FORMAT_VERSION, self.kind, 0, self.version)
            + struct.pack(">H", len(owner))
            + owner
            + struct.pack(">H", len(vm))
            + vm
        )


def parse_header(blob: bytes) -> tuple[SealHeader, int]:
    """The header and the offset of the nonce; SealError for anything malformed."""
    if len(blob) < _FIXED.size:
        raise SealError("sealed file is truncated")
    magic, fmt, kind, reserved, version = _FIXED.unpack_from(blob)
    if magic != MAGIC:
        raise SealError("not a sealed sgxvtpm file")
    if fmt != FORMAT_VERSION:
        raise SealError(f"unsupported sealed format {fmt}")
    if reserved:  # one encoding per header: it is the AAD
        raise SealError("sealed file header is damaged")
    try:
        seal_kind = SealKind(kind)
    except ValueError:
        raise SealError("unknown sealed blob kind") from None
    offset = _FIXED.size
    ids: list[str] = []
    for _ in range(2):
        if len(blob) < offset + 2:
            raise SealError("sealed file is truncated")
        (length,) = struct.unpack_from(">H", blob, offset)
        offset += 2
        if length > MAX_ID or len(blob) < offset + length:
            raise SealError("sealed file is truncated")
        try:
            ids.append(blob[offset : offset + length].decode())
        except UnicodeDecodeError:
            raise SealError("sealed file header is damaged") from None
        offset += length
    if len(blob) < offset + _NONCE + 16:
        raise SealError("sealed file is truncated")
    return SealHeader(seal_kind, version, ids[0], ids[1]), offset


class Sealer:
    """Seals and unseals one owner's blobs with a key only this enclave can derive."""

    def __init__(self, platform: EnclavePlatform, kind: SealKind, owner_id: str) -> None:
        seal_key = platform.get_key(
            KeyRequest(
                key_name=KeyName.SEAL,
                key_policy=KeyPolicy.MRSIGNER,
                isv_svn=platform.identity.isv_svn,
            )
        )
        self._aead = AESGCM(
            HKDF(
                algorithm=hashes.SHA256(),
                length=32,
                salt=b"sgxvtpm seal v1",
                info=bytes([kind]) + owner_id.encode(),
            ).derive(seal_key)
        )
        self.kind = kind
        self.owner_id = owner_id

    def seal(self, plaintext: bytes, version: int, vm_id: str) -> bytes:
        header = SealHeader(self.kind, version, self.owner_id, vm_id).encode()
        nonce = os.urandom(_NONCE)
        return header + nonce + self._aead.encrypt(nonce, plaintext, header)

    def seal_bare(self, plaintext: bytes, aad: bytes) -> bytes:
        """nonce + AEAD(plaintext, aad), no header: for per-request records
        (resume.py), whose key already binds kind and owner and whose content
        carries its own version. Cheaper than :meth:`seal` on the hot path."""
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def unseal_bare(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext of :meth:`seal_bare`'s ``blob``; SealError if it does not verify."""
        try:
            return self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], aad)
        except (InvalidTag, ValueError):
            raise SealError("sealed record failed authentication (tampered or foreign)") from None

    def unseal(self, blob: bytes) -> tuple[SealHeader, bytes]:
        header, offset = parse_header(blob)
        if header.kind != self.kind:
            raise SealError("sealed file is of another kind")
        if header.owner_id != self.owner_id:
            raise SealError("sealed file belongs to another instance")
        nonce = blob[offset : offset + _NONCE]
        try:
            plaintext = self._aead.decrypt(nonce, blob[offset + _NONCE :], blob[:offset])
        except InvalidTag:
            raise SealError("sealed file failed authentication (tampered or foreign)") from None
        return header, plaintext


def check_fresh(version: int, counter: int) -> bool:
    """True when ``version`` is current for a counter at ``counter`` (see module doc).

    Returns whether the counter must be advanced to ``version`` (the crash
    happened between the blob write and the counter increment).
    """
    if version == counter:
        return False
    if version == counter + 1:
        return True
    if version < counter:
        raise SealError(
            f"sealed state is older than the platform counter (version {version} < {counter}):"
            " rollback refused"
        )
    raise SealError(f"sealed state is from the future (version {version} > {counter} + 1)")
