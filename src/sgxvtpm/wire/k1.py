"""The VMM's requests to the manager enclave, inside K1 (sans-IO).

K1 delivers whole messages: each is one JSON object in the form of
:mod:`sgxvtpm.wire.jsonmsg`, a request from the operator's client
(``vmm/client.py``) or the manager's reply (``enclaves/manager.py``).

=========  =====================================  ===========================================
op         request fields                         reply (``ok``)
=========  =====================================  ===========================================
create     name, vm_spki_der (hex), pcr_banks,    instance, vm_cert_pem (for the VM key,
           ek (EK algorithms)                     issued by the manager's CA), ca_cert_pem
destroy    name                                   -
list       -                                      instances (sorted by name)
show       name                                   instance
ca         -                                      ca_cert_pem
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
    "GetCaCertificate",
    "InstanceInfo",
    "Instances",
    "K1ProtocolError",
    "K1Request",
    "K1UsageError",
    "ListVms",
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


K1Request: TypeAlias = CreateVm | DestroyVm | ListVms | ShowVm | GetCaCertificate

_CODEC: Codec[K1Request] = Codec(
    "K1",
    (CreateVm, DestroyVm, ListVms, ShowVm, GetCaCertificate),
    K1ProtocolError,
    K1UsageError,
)


encode_request = _CODEC.encode_request
decode_request = _CODEC.decode_request
encode_reply = _CODEC.encode_reply
decode_reply = _CODEC.decode_reply
