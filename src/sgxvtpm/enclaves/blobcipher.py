"""State blobs that leave an instance enclave (GET/SET_STATEBLOB) are sealed.

QEMU stores a vTPM's state blobs in its migration stream or savevm image,
on the untrusted host. The instance hands them out only sealed to itself:
AES-256-GCM under its own sealing key, with the instance id and the blob
type in the authenticated header, so the host sees ciphertext, cannot swap
a permanent blob for a volatile one or one instance's blob for another's,
and any modification is refused (TPM_BAD_PARAMETER to SET_STATEBLOB).

Scope: save/restore and migration on the same platform. A blob cannot be
opened on another host's platform (its seal key differs); cross-host
migration needs the attested instance-to-instance transfer of DESIGN.md
section 9, which is not built yet.
"""

from __future__ import annotations

from sgxvtpm.enclaves.sealing import Sealer, SealError, SealKind
from sgxvtpm.enclaves.vtpm_core import BlobCipherError
from sgxvtpm.platform.base import EnclavePlatform
from sgxvtpm.tpm.engine import StateType


class SealedBlobCipher:
    """vtpm_core.BlobCipher for one instance."""

    def __init__(self, platform: EnclavePlatform, instance_id: str) -> None:
        self._sealer = Sealer(platform, SealKind.STATE_BLOB, instance_id)

    def encrypt(self, kind: StateType, blob: bytes) -> bytes:
        # The header's version field carries the blob type (authenticated).
        return self._sealer.seal(blob, int(kind), "")

    def decrypt(self, kind: StateType, blob: bytes) -> bytes:
        try:
            header, plaintext = self._sealer.unseal(blob)
        except SealError as exc:
            raise BlobCipherError(str(exc)) from None
        if header.version != int(kind):
            raise BlobCipherError("state blob is of another type")
        return plaintext
