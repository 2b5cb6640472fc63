"""The VMM's requests to the manager enclave, inside K1 (sans-IO).

K1 delivers whole messages: each is one JSON object in the form of
:mod:`sgxvtpm.wire.jsonmsg`, a request from the operator's client
(``vmm/client.py``) or the manager's reply (``enclaves/manager.py``).

=========  =====================================  ===========================================
op         request fields                         reply (``ok``)
=========  =====================================  ===========================================
create     name, vm_spki_der (hex), pcr_banks,    instance, vm_cert_pem (for the VM key,
           ek (EK algorithms), incoming           issued by the manager's CA), ca_cert_pem
destroy    name                                   -
list       -                                      instances (sorted by name)
show       name                                   instance
ca         -                                      ca_cert_pem
fleet_     -                                      token (hex, shown once), expires (epoch s)
invite
fleet_     host, port, token (hex)                fleet (FleetInfo)
join
fleet_     -                                      fleet
show
fleet_     -                                      fleet (empty: no longer a member)
leave
fleet_     member (platform id hex)               fleet
remove
migrate_   name                                   instance
cancel
migrate    name, host, port (a member's fleet port)  instance (``migrated``)
=========  =====================================  ===========================================

``instance`` is an :class:`InstanceInfo`: the manager's record of the VM and
what it knows of its instance now. The manager decides which names it takes
(``enclaves/registry.py: check_vm_name``); this codec only checks the form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

from sgxvtpm.errors import LocalProtocolError, RemoteProtocolError
from sgxvtpm.wire.jsonmsg import (
    Codec,
    Done,
    JsonObject,
    Message,
    Refused,
    Reply,
    Request,
    from_json,
    to_json,
)

__all__ = [
    "CaCertificate",
    "CreateVm",
    "Created",
    "DestroyVm",
    "Done",
    "FleetInfo",
    "FleetInvitation",
    "FleetInvite",
    "FleetJoin",
    "FleetLeave",
    "FleetMember",
    "FleetRemove",
    "FleetShow",
    "FleetStatus",
    "GetCaCertificate",
    "InstanceInfo",
    "Instances",
    "K1ProtocolError",
    "K1Request",
    "K1UsageError",
    "ListVms",
    "MigrateCancel",
    "MigrateVm",
    "Refused",
    "ShowVm",
    "Shown",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
]

DEFAULT_PCR_BANKS = ("sha256",)


class K1ProtocolError(RemoteProtocolError):
    """A K1 message that is not one of this protocol's requests or replies.

    The manager refuses such a request (the VMM sees why); a malformed reply
    means the manager is of another version than this client: run the
    ``sgxvtpm`` installed with hostd.
    """


class K1UsageError(LocalProtocolError):
    """This program built a K1 message that cannot be sent. Nothing was sent; fix the caller."""


@dataclass(frozen=True)
class InstanceInfo(Message):
    """One VM as the manager describes it (``vm show``, ``instance.json``).

    The registry's record (hex strings for identities and certificates, as
    the operator sees them) and, from hostd and the instance now: ``pid``,
    ``alive``, ``state`` (``running``, ``error``, ``stopped``, ...) and why.
    """

    name: str
    instance_id: str
    pcr_banks: tuple[str, ...] = DEFAULT_PCR_BANKS
    ek: tuple[str, ...] = ()
    created: float = 0.0
    state: str = "unknown"
    mrenclave: str = ""
    mrsigner: str = ""
    ek_certificates: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    alive: bool = False
    reason: str = ""
    #: The VM's connected endpoint, as its instance knows it (see admin.InstanceStatus).
    endpoint_pid: int | None = None
    endpoint: str = ""
    endpoint_since: float = 0.0

    def to_json(self) -> JsonObject:
        """The JSON object of this description (what ``vm show --json`` prints)."""
        return to_json(self, K1UsageError)

    @classmethod
    def from_json(cls, obj: object) -> InstanceInfo:
        """The description in ``obj``; K1ProtocolError if it is none."""
        return from_json(cls, obj, K1ProtocolError)


# ------------------------------------------------------------------ replies


@dataclass(frozen=True)
class Created(Reply):
    instance: InstanceInfo
    vm_cert_pem: str
    ca_cert_pem: str


@dataclass(frozen=True)
class Instances(Reply):
    instances: tuple[InstanceInfo, ...]


@dataclass(frozen=True)
class Shown(Reply):
    instance: InstanceInfo


@dataclass(frozen=True)
class CaCertificate(Reply):
    ca_cert_pem: str


# ------------------------------------------------------------------ requests


@dataclass(frozen=True)
class CreateVm(Request[Created]):
    """Create VM ``name`` bound to the VM key ``vm_spki_der`` (a DER SubjectPublicKeyInfo)."""

    OP = "create"
    REPLY = Created
    name: str
    vm_spki_der: bytes
    pcr_banks: tuple[str, ...] = DEFAULT_PCR_BANKS
    ek: tuple[str, ...] = ()
    incoming: bool = False


@dataclass(frozen=True)
class DestroyVm(Request[Done]):
    OP = "destroy"
    REPLY = Done
    name: str


@dataclass(frozen=True)
class ListVms(Request[Instances]):
    OP = "list"
    REPLY = Instances


@dataclass(frozen=True)
class ShowVm(Request[Shown]):
    OP = "show"
    REPLY = Shown
    name: str


@dataclass(frozen=True)
class GetCaCertificate(Request[CaCertificate]):
    OP = "ca"
    REPLY = CaCertificate


@dataclass(frozen=True)
class FleetMember(Message):
    """One manager of the fleet: its platform, its fleet address, when it joined."""

    platform_id: str
    address: str
    joined: float
    mrenclave: str = ""


@dataclass(frozen=True)
class FleetInfo(Message):
    """This manager's view of its fleet (``fleet_id`` empty: not in a fleet)."""

    fleet_id: str
    self_id: str
    members: tuple[FleetMember, ...] = ()

    def to_json(self) -> JsonObject:
        return to_json(self, K1UsageError)


@dataclass(frozen=True)
class FleetInvitation(Reply):
    token: bytes
    expires: float


@dataclass(frozen=True)
class FleetStatus(Reply):
    fleet: FleetInfo


@dataclass(frozen=True)
class FleetInvite(Request[FleetInvitation]):
    """A one-time token for one host to join this manager's fleet (made if there is none)."""

    OP = "fleet_invite"
    REPLY = FleetInvitation
    address: str = ""


@dataclass(frozen=True)
class FleetJoin(Request[FleetStatus]):
    """Join the fleet of the manager behind the fleet port ``host``:``port``."""

    OP = "fleet_join"
    REPLY = FleetStatus
    host: str
    port: int
    token: bytes
    address: str = ""


@dataclass(frozen=True)
class FleetShow(Request[FleetStatus]):
    OP = "fleet_show"
    REPLY = FleetStatus


@dataclass(frozen=True)
class FleetLeave(Request[FleetStatus]):
    OP = "fleet_leave"
    REPLY = FleetStatus


@dataclass(frozen=True)
class FleetRemove(Request[FleetStatus]):
    OP = "fleet_remove"
    REPLY = FleetStatus
    member: str


@dataclass(frozen=True)
class MigrateCancel(Request[Shown]):
    """Run VM ``name`` here again although it migrated to another host (the operator's call)."""

    OP = "migrate_cancel"
    REPLY = Shown
    name: str


@dataclass(frozen=True)
class MigrateVm(Request[Shown]):
    """Move VM ``name``'s stopped TPM to the member at the fleet port ``host``:``port``."""

    OP = "migrate"
    REPLY = Shown
    name: str
    host: str
    port: int


K1Request: TypeAlias = (
    CreateVm | DestroyVm | ListVms | ShowVm | GetCaCertificate
    | FleetInvite | FleetJoin | FleetShow | FleetLeave | FleetRemove | MigrateCancel | MigrateVm
)

_CODEC: Codec[K1Request] = Codec(
    "K1",
    (CreateVm, DestroyVm, ListVms, ShowVm, GetCaCertificate,
     FleetInvite, FleetJoin, FleetShow, FleetLeave, FleetRemove, MigrateCancel, MigrateVm),
    K1ProtocolError,
    K1UsageError,
)


encode_request = _CODEC.encode_request
decode_request = _CODEC.decode_request
encode_reply = _CODEC.encode_reply
decode_reply = _CODEC.decode_reply
