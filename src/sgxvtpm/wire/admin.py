"""The manager's requests to an instance enclave (sans-IO).

They go over an attested session the manager opens to the instance (the
instance answers them only when the client certificate is the manager's),
one JSON object per message, in the form of :mod:`sgxvtpm.wire.jsonmsg`.
Manufacturing a VM's TPM is ``provision`` then ``certify``: the instance
creates the EKs and returns their public areas, the manager's CA certifies
them, and the certificates go back into the TPM's NV.

==========  ==============================================  ===============================
op          request fields                                  reply (``ok``)
==========  ==============================================  ===============================
status      -                                               state, reason, mrenclave,
                                                            mrsigner, version
provision   vm_id, vm_spki_sha256 (hex), pcr_banks,         eks (alg, public_area hex),
            ek (EK algorithms)                              tpm_spec (family, level, revision)
certify     ek_certificates (alg: DER hex),                 as status
            platform_certificate (DER hex, may be empty)
destroy     -                                               -
incoming    vm_id, vm_spki_sha256 (hex), pcr_banks          as status (``incoming``)
blob_key    key (hex), vm (VM identity), origin              as status
            (this platform's id)
migrated    version, to (the destination's platform id)     as status (``migrated``)
cancel_     -                                               as status
migration
export      -                                               blobs (type: portable blob hex)
import      blobs (type: portable blob hex)                 as status (``running``)
==========  ==============================================  ===============================

``status`` also says what an incoming instance imported (``imported``: the
export version, ``origin``: the source's platform id; 0 and empty until then,
and ``imported`` stays 0 while the instance still waits for its first TPM
command after the import). docs/ARCHITECTURE.md, "Many hosts".
"""

from __future__ import annotations

from dataclasses import field
from typing import TypeAlias

from sgxvtpm.errors import LocalProtocolError, RemoteProtocolError
from sgxvtpm.wire.jsonmsg import (
    Codec,
    Done,
    Message,
    Refused,
    Reply,
    Request,
    check_with,
)

__all__ = [
    "AdminProtocolError",
    "AdminRequest",
    "AdminUsageError",
    "CancelMigration",
    "Certify",
    "Destroy",
    "Done",
    "EkPublicArea",
    "ExportState",
    "GetStatus",
    "ImportState",
    "InstanceStatus",
    "MarkMigrated",
    "PortableState",
    "Provision",
    "ProvisionIncoming",
    "Provisioned",
    "Refused",
    "SetBlobKey",
    "TpmSpec",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
]

SHA256_SIZE = 32


class AdminProtocolError(RemoteProtocolError):
    """A message between the manager and an instance that is not one of this protocol's.

    The instance refuses such a request; the manager treats a malformed reply
    as a failed call (the instance is of another release: relaunch it).
    """


class AdminUsageError(LocalProtocolError):
    """This program built an admin message that cannot be sent. Nothing was sent; fix the caller."""


def _check_sha256(value: bytes) -> None:
    if len(value) != SHA256_SIZE:
        raise ValueError(f"{len(value)} bytes, not a SHA-256 digest")


# ------------------------------------------------------------------ replies


class InstanceStatus(Reply):
    """The instance's state (``unprovisioned``, ``manufacturing``, ``running``,
    ``error``), why if it is ``error``, its identity and its sealed state's version."""

    state: str
    reason: str
    mrenclave: str
    mrsigner: str
    version: int
    imported: int = 0
    origin: str = ""
    #: The endpoint that holds the VM's seat, in its own words (pid, what it
    #: serves) and since when (the enclave's clock); empty when none is connected.
    endpoint_pid: int | None = None
    endpoint: str = ""
    endpoint_since: float = 0.0


class EkPublicArea(Message):
    """One EK the instance created: its algorithm name and TPM2B_PUBLIC."""

    alg: str
    public_area: bytes


class TpmSpec(Message):
    """The TPM's specification (family, level, revision) and attributes (manufacturer,
    model, version: empty from an older instance), for the EK certificate."""

    family: str
    level: int
    revision: int
    manufacturer: str = ""
    model: str = ""
    version: str = ""


class Provisioned(Reply):
    eks: tuple[EkPublicArea, ...]
    tpm_spec: TpmSpec


# ------------------------------------------------------------------ requests


class GetStatus(Request[InstanceStatus], op="status"):
    """The instance's state, identity and sealed state's version."""


class Provision(Request[Provisioned], op="provision"):
    """Bind VM ``vm_id`` (its key's SPKI SHA-256), start a fresh TPM, create the EKs."""

    vm_id: str
    vm_spki_sha256: bytes = field(metadata=check_with(_check_sha256))
    pcr_banks: tuple[str, ...] = ("sha256",)
    ek: tuple[str, ...] = ()


class Certify(Request[InstanceStatus], op="certify"):
    """Store the EK certificates (by algorithm) and the platform certificate, finish the TPM."""

    ek_certificates: dict[str, bytes]
    platform_certificate: bytes = b""


class Destroy(Request[Done], op="destroy"):
    """Erase the instance's sealed state: the VM's TPM is gone for good."""



def _check_key(value: bytes) -> None:
    if len(value) != SHA256_SIZE:
        raise ValueError(f"{len(value)} bytes, not a 32-byte key")


class ProvisionIncoming(Request[InstanceStatus], op="incoming"):
    """Bind VM ``vm_id`` with no TPM yet: its state comes in by SET_STATEBLOB (migration)."""

    vm_id: str
    vm_spki_sha256: bytes = field(metadata=check_with(_check_sha256))
    pcr_banks: tuple[str, ...] = ("sha256",)


class SetBlobKey(Request[InstanceStatus], op="blob_key"):
    """The per-VM key of the fleet: QEMU's state blobs are sealed under it from now on."""

    key: bytes = field(metadata=check_with(_check_key))
    vm: str = ""
    origin: str = ""


class MarkMigrated(Request[InstanceStatus], op="migrated"):
    """The VM runs on platform ``to`` from export ``version``: refuse to run it here."""

    version: int
    to: str


class CancelMigration(Request[InstanceStatus], op="cancel_migration"):
    """The operator's override: run the VM's state here again."""



class PortableState(Reply):
    """A stopped TPM's state blobs, portable (by type: "1", "2", "3"; absent ones left out)."""

    blobs: dict[str, bytes]


class ExportState(Request[PortableState], op="export"):
    """A cold move: the stopped TPM's blobs under the VM's fleet key (a recorded export)."""



class ImportState(Request[InstanceStatus], op="import"):
    """A cold move's other end: an incoming instance takes ``blobs`` and becomes the VM's TPM."""

    blobs: dict[str, bytes]


AdminRequest: TypeAlias = (
    GetStatus | Provision | Certify | Destroy
    | ProvisionIncoming | SetBlobKey | MarkMigrated | CancelMigration | ExportState | ImportState
)

_CODEC: Codec[AdminRequest] = Codec("admin", AdminRequest, AdminProtocolError, AdminUsageError)


encode_request = _CODEC.encode_request
decode_request = _CODEC.decode_request
encode_reply = _CODEC.encode_reply
decode_reply = _CODEC.decode_reply
