"""State blobs that leave an instance enclave (GET/SET_STATEBLOB): sealed and fresh.

QEMU stores a vTPM's state blobs in its migration stream or savevm image,
on the untrusted host. The instance hands them out only sealed to itself:
AES-256-GCM under its own sealing key, with the instance id and the blob
type (its seal kind) in the authenticated header, so the host sees
ciphertext, cannot swap a permanent blob for a volatile one or one
instance's blob for another's, and any modification is refused.

Freshness. A sealed blob alone would let the host keep every blob it was
ever given and put an old one back: a TPM NV counter taken from 11 back to 2,
a DA lockout undone, a revoked NV index restored. So each export carries a
version, and the instance takes back only its latest export, and only while
the guest has not changed the TPM since:

- an export is the blobs GET_STATEBLOB hands out between two changes of the
  TPM. The first GET after a change records a new export in the sealed state
  (a commit: the version is durable and above every earlier one, the platform
  counter guarantees it across restarts); the other blob types of the same
  snapshot get the same version. QEMU's savevm/migration gets the permanent,
  volatile and savestate blobs one after the other, with the VM paused.
- a change is anything the guest does to the TPM: any TPM command, and
  RESET_TPMESTABLISHED. It forgets the export (the sealed state records that
  at its next commit). Power events that QEMU itself sends (INIT, STOP,
  SHUTDOWN, with the TPM2_Shutdown the core sends for the guest) are not
  changes: between QEMU's save and its restore on this host, the old QEMU
  sends SHUTDOWN as it exits and the new one INIT at machine reset, STOP,
  then SET_STATEBLOB x3 and INIT. Restoring the latest save keeps working,
  also after hostd or the instance restarted in between.
- SET_STATEBLOB of any other blob is refused with TPM_BAD_PARAMETER, as a
  tampered one is, and logged (``vtpm.state_refused``): an older export, an
  export the guest has used the TPM after (the VM ran on after the save: a
  restore would revert what it did), or a blob of another instance or host.

So reverting a VM to an older snapshot on the same instance is refused by
design, as rolling its TPM back would be. What is not closed: after an
instance crash, its latest export can replace TPM changes the crash lost
anyway (only volatile ones: every NV change is committed and forgets the
export). Moving state to another host is not done with these blobs (their
seal key is this platform's), but by an attested instance-to-instance
transfer, not built yet (docs/ARCHITECTURE.md, "Where new work goes").
"""

from __future__ import annotations

from sgxvtpm.enclaves.sealing import Sealer, SealError, SealKind
from sgxvtpm.enclaves.state import SealedStateStore
from sgxvtpm.enclaves.vtpm_core import BlobCipherError
from sgxvtpm.platform.base import EnclavePlatform, PlatformError
from sgxvtpm.tpm.engine import StateType

_KINDS = {
    StateType.PERMANENT: SealKind.STATE_BLOB_PERMANENT,
    StateType.VOLATILE: SealKind.STATE_BLOB_VOLATILE,
    StateType.SAVESTATE: SealKind.STATE_BLOB_SAVESTATE,
}


class SealedBlobCipher:
    """vtpm_core.BlobCipher for one instance, versioned by its sealed state ``store``."""

    def __init__(
        self, platform: EnclavePlatform, instance_id: str, store: SealedStateStore
    ) -> None:
        self._sealers = {t: Sealer(platform, k, instance_id) for t, k in _KINDS.items()}
        self._store = store

    def state_changed(self) -> None:
        # Called for every TPM command: an attribute store, nothing durable.
        self._store.bundle.exported = 0

    def encrypt(self, kind: StateType, blob: bytes) -> bytes:
        bundle = self._store.bundle
        if not bundle.exported:
            bundle.exported = self._store.file.version + 1
            try:
                self._store.commit()
            except (OSError, SealError, PlatformError) as exc:
                bundle.exported = 0
                raise BlobCipherError(f"cannot record the export: {exc}") from None
        return self._sealers[kind].seal(blob, bundle.exported, "")

    def decrypt(self, kind: StateType, blob: bytes) -> bytes:
        try:
            header, plaintext = self._sealers[kind].unseal(blob)
        except SealError as exc:
            raise BlobCipherError(str(exc)) from None
        latest = self._store.bundle.exported
        if header.version == latest:
            return plaintext
        if not latest:
            why = "the TPM has been used since it was exported"
        elif header.version < latest:
            why = f"a newer export exists (version {latest})"
        else:
            why = f"this instance never made that export (latest {latest})"
        raise BlobCipherError(
            f"state blob is from export version {header.version}, but {why}: rollback refused"
        )
