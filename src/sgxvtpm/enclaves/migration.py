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
from sgxvtpm.util import log
from sgxvtpm.wire import admin
from sgxvtpm.wire.vtpm import TpmResult, VtpmResponse, encode_response

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
