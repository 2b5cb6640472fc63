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

from dataclasses import field
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
#: The subject and issuer common name of the manager's CA certificate, which
#: issues the VM certificates of ``create``.
CA_COMMON_NAME = "sgxvtpm manager CA"


class K1ProtocolError(RemoteProtocolError):
    """A K1 message that is not one of this protocol's requests or replies.

    The manager refuses such a request (the VMM sees why); a malformed reply
    means the manager is of another version than this client: run the
    ``sgxvtpm`` installed with hostd.
    """


class K1UsageError(LocalProtocolError):
    """This program built a K1 message that cannot be sent. Nothing was sent; fix the caller."""


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


class Created(Reply):
    instance: InstanceInfo
    vm_cert_pem: str
    ca_cert_pem: str


class Instances(Reply):
    instances: tuple[InstanceInfo, ...]


class Shown(Reply):
    instance: InstanceInfo


class CaCertificate(Reply):
    ca_cert_pem: str


# ------------------------------------------------------------------ requests


class CreateVm(Request[Created], op="create"):
    """Create VM ``name`` bound to the VM key ``vm_spki_der`` (a DER SubjectPublicKeyInfo)."""

    name: str
    vm_spki_der: bytes
    pcr_banks: tuple[str, ...] = DEFAULT_PCR_BANKS
    ek: tuple[str, ...] = ()
    incoming: bool = False


class DestroyVm(Request[Done], op="destroy"):
    name: str


class ListVms(Request[Instances], op="list"):
    """Every VM the manager has (sorted by name)."""


class ShowVm(Request[Shown], op="show"):
    name: str


class GetCaCertificate(Request[CaCertificate], op="ca"):
    """The manager's CA certificate (the issuer of the VM certificates)."""


class FleetMember(Message):
    """One manager of the fleet: its platform, its fleet address, when it joined."""

    platform_id: str
    address: str
    joined: float
    mrenclave: str = ""


class FleetInfo(Message):
    """This manager's view of its fleet (``fleet_id`` empty: not in a fleet)."""

    fleet_id: str
    self_id: str
    members: tuple[FleetMember, ...] = ()

    def to_json(self) -> JsonObject:
        return to_json(self, K1UsageError)


class FleetInvitation(Reply):
    token: bytes
    expires: float


class FleetStatus(Reply):
    fleet: FleetInfo


class FleetInvite(Request[FleetInvitation], op="fleet_invite"):
    """A one-time token for one host to join this manager's fleet (made if there is none)."""

    address: str = ""


class FleetJoin(Request[FleetStatus], op="fleet_join"):
    """Join the fleet of the manager behind the fleet port ``host``:``port``."""

    host: str
    port: int
    token: bytes
    address: str = ""


class FleetShow(Request[FleetStatus], op="fleet_show"):
    """This manager's view of its fleet."""


class FleetLeave(Request[FleetStatus], op="fleet_leave"):
    """Leave the fleet (the reply's fleet is empty: no longer a member)."""


class FleetRemove(Request[FleetStatus], op="fleet_remove"):
    member: str


class MigrateCancel(Request[Shown], op="migrate_cancel"):
    """Run VM ``name`` here again although it migrated to another host (the operator's call)."""

    name: str


class MigrateVm(Request[Shown], op="migrate"):
    """Move VM ``name``'s stopped TPM to the member at the fleet port ``host``:``port``."""

    name: str
    host: str
    port: int


K1Request: TypeAlias = (
    CreateVm | DestroyVm | ListVms | ShowVm | GetCaCertificate
    | FleetInvite | FleetJoin | FleetShow | FleetLeave | FleetRemove | MigrateCancel | MigrateVm
)

_CODEC: Codec[K1Request] = Codec("K1", K1Request, K1ProtocolError, K1UsageError)


encode_request = _CODEC.encode_request
decode_request = _CODEC.decode_request
encode_reply = _CODEC.encode_reply
decode_reply = _CODEC.decode_reply
