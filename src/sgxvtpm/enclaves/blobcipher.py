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
export).

Many hosts (docs/ARCHITECTURE.md). Once the manager gave the instance its
VM's fleet key (``provisioning["fleet"]``), exports are portable blobs
(enclaves/portable.py) that the VM's instance on another member platform
can open. Such an instance, created ``--incoming``, takes a portable blob of
its VM whose version is at least the highest it ever accepted
(``provisioning["accepted"]``, sealed), and only while it is incoming: the
first TPM command after the import ends that (the VM runs here now), and
from then on only its own latest export comes back, as above. Its own
exports are numbered above what it accepted.
"""

from __future__ import annotations

import contextlib

from sgxvtpm.enclaves import portable
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
        # Called for every TPM command: an attribute store, nothing durable,
        # but once after a migration's import (the VM now runs here).
        self._store.bundle.exported = 0
        prov = self._store.bundle.provisioning
        if prov.get("import_pending"):
            prov["imported"] = prov.pop("import_pending")
            prov["incoming"] = False
            # If this fails, it stays in the bundle: the next commit writes it.
            with contextlib.suppress(OSError, SealError, PlatformError):
                self._store.commit()

    def encrypt(self, kind: StateType, blob: bytes) -> bytes:
        bundle = self._store.bundle
        if not bundle.exported:
            floor = int(bundle.provisioning.get("accepted", 0))
            bundle.exported = max(self._store.file.version, floor) + 1
            try:
                self._store.commit()
            except (OSError, SealError, PlatformError) as exc:
                bundle.exported = 0
                raise BlobCipherError(f"cannot record the export: {exc}") from None
        fleet = bundle.provisioning.get("fleet")
        if fleet:
            header = portable.PortableHeader(
                int(kind), bundle.exported, str(fleet["origin"]), str(fleet["vm"])
            )
            return portable.seal(bytes.fromhex(fleet["key"]), header, blob)
        return self._sealers[kind].seal(blob, bundle.exported, "")

    def _decrypt_portable(self, kind: StateType, blob: bytes) -> bytes:
        bundle = self._store.bundle
        prov = bundle.provisioning
        fleet = prov.get("fleet")
        if not fleet:
            raise BlobCipherError("a portable state blob, but this instance has no fleet key")
        try:
            header, plaintext = portable.unseal(
                bytes.fromhex(fleet["key"]), blob, kind=int(kind), vm=str(fleet["vm"])
            )
        except portable.PortableBlobError as exc:
            raise BlobCipherError(str(exc)) from None
        if bundle.exported and header.version == bundle.exported:
            return plaintext  # our own latest export, unused since
        floor = int(prov.get("accepted", 0))
        if not prov.get("incoming"):
            raise BlobCipherError(
                f"state blob is from export version {header.version} of {header.origin}, but"
                " this instance is not waiting for a migration and made no such export:"
                " rollback refused"
            )
        if header.version < floor:
            raise BlobCipherError(
                f"state blob is from export version {header.version}, below version {floor}"
                " accepted for this VM: rollback refused"
            )
        if header.version > floor or "import_pending" not in prov:
            prov["accepted"] = header.version
            prov["import_pending"] = {"version": header.version, "origin": header.origin}
            try:
                self._store.commit()
            except (OSError, SealError, PlatformError) as exc:
                raise BlobCipherError(f"cannot record the import: {exc}") from None
        return plaintext

    def decrypt(self, kind: StateType, blob: bytes) -> bytes:
        if portable.is_portable(blob):
            return self._decrypt_portable(kind, blob)
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
