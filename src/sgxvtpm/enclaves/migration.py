"""An instance's part in moving its VM between hosts (docs/ARCHITECTURE.md, "Many hosts").

What the instance keeps in its sealed provisioning record, all of it set by
its manager over their attested admin session (sgxvtpm/wire/admin.py):

- ``fleet``: the VM's per-VM key, its identity and this platform's id; from
  then on QEMU's blobs are portable (blobcipher.py, portable.py);
- ``incoming``: created for a VM whose state comes from another host; the
  first TPM command after the import ends it (blobcipher.py);
- ``migrated_to``: the destination's platform and the export version it
  runs; the instance then answers every request of the VM with an error,
  until the operator cancels the migration (``vm migrate-cancel``).
"""

from __future__ import annotations

from typing import Any

from sgxvtpm.enclaves.state import SealedStateStore
from sgxvtpm.enclaves.vtpm_core import BlobCipherError, VtpmCore
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.tpm.engine import EngineError, StateType
from sgxvtpm.util import log
from sgxvtpm.wire import admin
from sgxvtpm.wire.vtpm import TpmResult, VtpmResponse, encode_response


class MigrationError(SgxvtpmError, ValueError):
    """A cold move's export or import refused; the message goes back to the manager."""

#: The states in which the VM's key may open a session to its instance.
VM_STATES = ("running", "incoming", "migrated")


def state_of(provisioning: dict[str, Any]) -> str:
    if provisioning.get("migrated_to"):
        return "migrated"
    if provisioning.get("incoming"):
        return "incoming"
    return "running"


def reason_of(provisioning: dict[str, Any]) -> str:
    moved = provisioning.get("migrated_to")
    if moved:
        return (
            f"the VM's TPM runs on platform {moved.get('to', '?')} since export"
            f" {moved.get('version', '?')}: it is refused here (vm migrate-cancel runs it here"
            " again)"
        )
    if provisioning.get("incoming"):
        return "waiting for the VM's state from another host (QEMU -incoming)"
    return ""


def refuse(provisioning: dict[str, Any]) -> bytes:
    """The answer to any request of a VM that migrated away: TPM_FAIL, and why in the log."""
    log.log("instance.migrated_refused", reason=reason_of(provisioning))
    return encode_response(VtpmResponse.error(TpmResult.FAIL))


def incoming_provisioning(
    instance_id: str, manager_spki: bytes, request: admin.ProvisionIncoming
) -> dict[str, Any]:
    return {
        "instance_id": instance_id,
        "vm_id": request.vm_id,
        "vm_spki_sha256": request.vm_spki_sha256.hex(),
        "manager_spki": manager_spki.hex(),
        "pcr_banks": list(request.pcr_banks),
        "incoming": True,
    }


def apply(
    store: SealedStateStore,
    request: admin.SetBlobKey | admin.MarkMigrated | admin.CancelMigration,
) -> None:
    """Record ``request`` in the sealed provisioning record (committed before the answer)."""
    prov = store.bundle.provisioning
    if isinstance(request, admin.SetBlobKey):
        wanted = {"key": request.key.hex(), "vm": request.vm, "origin": request.origin}
        if prov.get("fleet") == wanted:
            return
        prov["fleet"] = wanted
    elif isinstance(request, admin.MarkMigrated):
        prov["migrated_to"] = {"to": request.to, "version": request.version}
    else:
        if not prov.pop("migrated_to", None):
            return
    store.commit()


def export_state(core: VtpmCore, provisioning: dict[str, Any]) -> admin.PortableState:
    """A cold move: the stopped TPM's blobs, portable (under the VM's fleet key)."""
    if not provisioning.get("fleet"):
        raise MigrationError("this instance has no fleet key: its host is not in a fleet")
    if provisioning.get("migrated_to") or provisioning.get("incoming"):
        raise MigrationError(f"the VM's TPM is {state_of(provisioning)} here: nothing to move")
    if core.running:
        raise MigrationError(
            "the VM's TPM is running: stop the VM first (or move it with QEMU's migration)"
        )
    blobs: dict[str, bytes] = {}
    try:
        for kind in StateType:
            data = core.engine.get_state(kind)
            if data:
                blobs[str(int(kind))] = core.blob_cipher.encrypt(kind, data)
    except (EngineError, BlobCipherError) as exc:
        raise MigrationError(f"cannot export the TPM state: {exc}") from None
    if str(int(StateType.PERMANENT)) not in blobs:
        raise MigrationError("the TPM has no permanent state to move")
    return admin.PortableState(blobs=blobs)


def import_state(core: VtpmCore, store: SealedStateStore, blobs: dict[str, bytes]) -> None:
    """A cold move's destination: take the blobs (as SET_STATEBLOB does: newest only),
    start the TPM once so libtpms writes them to the sealed store, and end ``incoming``."""
    prov = store.bundle.provisioning
    if not prov.get("incoming"):
        raise MigrationError(f"the instance is {state_of(prov)}, not waiting for a VM's state")
    if core.running:
        raise MigrationError("the instance's TPM is running: stop its endpoint first")
    try:
        kinds = {StateType(int(k)): v for k, v in blobs.items()}
    except ValueError:
        raise MigrationError(f"unknown state blob types {sorted(blobs)}") from None
    if StateType.PERMANENT not in kinds:
        raise MigrationError("no permanent state blob")
    engine = core.engine
    try:
        # Every blob verified before libtpms is given any of them.
        plain = {kind: core.blob_cipher.decrypt(kind, blob) for kind, blob in kinds.items()}
        for kind, data in sorted(plain.items()):
            engine.set_state(kind, data)
        engine.start()
        if StateType.VOLATILE in kinds:
            engine.store_volatile()  # the next INIT resumes it, as after QEMU's load
        engine.stop()
    except (EngineError, BlobCipherError, OSError) as exc:
        engine.stop()
        raise MigrationError(f"the state is refused: {exc}") from None
    prov["imported"] = prov.pop("import_pending")
    prov["incoming"] = False
    store.commit()
