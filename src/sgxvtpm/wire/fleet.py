"""Manager-to-manager messages inside a fleet session (sans-IO).

A fleet session is an RA-TLS session one manager enclave opens to another
through ``hostd --fleet-listen`` (docs/ARCHITECTURE.md, "Many hosts"). The
TLS server (the member) is attested by its certificate; the client (the
joiner) is attested in the message, by its own RA-TLS certificate
(``evidence``), whose quote binds the key the fleet key is wrapped to.

=====  ==========================================  ===========================================
op     request fields                              reply (``ok``)
=====  ==========================================  ===========================================
join   token (hex), evidence (DER hex), address    fleet_id, member_id, ephemeral (SEC1 hex),
                                                   wrapped (hex), members
moved  vm, version, to (platform id), proof (hex)  -
move   vm, origin (platform id), blobs (type: hex), to (the destination's platform id)
       proof (hex)
=====  ==========================================  ===========================================

``move``: a cold move (``vm migrate NAME --to``): the source's manager sends
the stopped TPM's portable blobs to the destination's, whose incoming
instance for ``vm`` takes them; ``proof`` is an HMAC under the VM's fleet key
over the VM, the origin and the blobs (enclaves/fleet.py: ``move_proof``).

``moved``: the destination's manager tells the source's that VM ``vm`` runs on
platform ``to`` from export ``version``; ``proof`` is an HMAC under the VM's
fleet key (enclaves/fleet.py: ``moved_proof``), so only a member can say it.
"""

from __future__ import annotations

from dataclasses import field
from typing import TypeAlias

from sgxvtpm.errors import LocalProtocolError, RemoteProtocolError
from sgxvtpm.wire.jsonmsg import Codec, Done, Refused, Reply, Request, check_with
from sgxvtpm.wire.k1 import FleetMember

__all__ = [
    "FleetProtocolError",
    "FleetRequest",
    "FleetUsageError",
    "Join",
    "Joined",
    "Move",
    "Moved",
    "MovedIn",
    "Refused",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
]

TOKEN_SIZE = 32
MAX_EVIDENCE = 64 * 1024


class FleetProtocolError(RemoteProtocolError):
    """A fleet message that is not one of this protocol's."""


class FleetUsageError(LocalProtocolError):
    """This program built a fleet message that cannot be sent."""


def _check_token(value: bytes) -> None:
    if len(value) != TOKEN_SIZE:
        raise ValueError(f"a fleet token is {TOKEN_SIZE} bytes, not {len(value)}")


def _check_evidence(value: bytes) -> None:
    if not 0 < len(value) <= MAX_EVIDENCE:
        raise ValueError(f"evidence of {len(value)} bytes")


class Joined(Reply):
    fleet_id: str
    member_id: str
    ephemeral: bytes
    wrapped: bytes
    members: tuple[FleetMember, ...]


class Join(Request[Joined], op="join"):
    """Make the sender a member: ``token`` from ``fleet invite``, ``evidence`` its
    RA-TLS certificate (DER), ``address`` its own fleet port (may be empty)."""

    token: bytes = field(metadata=check_with(_check_token))
    evidence: bytes = field(metadata=check_with(_check_evidence))
    address: str = ""


class Moved(Request[Done], op="moved"):
    vm: str
    version: int
    to: str
    proof: bytes


class MovedIn(Reply):
    to: str


class Move(Request[MovedIn], op="move"):
    vm: str
    origin: str
    blobs: dict[str, bytes]
    proof: bytes


FleetRequest: TypeAlias = Join | Moved | Move

_CODEC: Codec[FleetRequest] = Codec("fleet", FleetRequest, FleetProtocolError, FleetUsageError)

encode_request = _CODEC.encode_request
decode_request = _CODEC.decode_request
encode_reply = _CODEC.encode_reply
decode_reply = _CODEC.decode_reply
