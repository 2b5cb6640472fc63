"""hostd's CONTROL requests (sans-IO): what a relay connection asks hostd itself.

They travel as CONTROL frames (:mod:`sgxvtpm.wire.relay`, session 0), one JSON
object each, in the form of :mod:`sgxvtpm.wire.jsonmsg`. The relay adds an
``"id"`` to a request and hostd's switch echoes it in the reply; this codec
ignores it. hostd answers them in the clear, so none carries a secret.

=================  ===================================  ============================
op                 request fields                       reply (``ok``)
=================  ===================================  ============================
ping               -                                    manager_ready
wait_ready         -                                    -  (once the manager is ready)
platform_root      -                                    root_ca_pem (a claim: clients
                                                        pin it on first contact)
manager_ready      -                                    -
manager_refused    reason                               -
launch_instance    instance_id, manager_cert_pem        pid, mrenclave, already_running
stop_instance      instance_id, erase                   -
instance_info      instance_id                          alive, pid (or null), reason
handoff            session                              -
=================  ===================================  ============================

Anyone connected may ask ``ping``, ``wait_ready`` and ``platform_root``
(:data:`PUBLIC`); hostd answers the rest only on the manager enclave's
connection. ``handoff`` (a client passes its connection to the instance
enclave at the other end of its one session) is answered by the switch
(``sgxvtpm.host.switch``), not by hostd's handler. An instance id is 32
lowercase hex digits (:func:`check_instance_id`).
"""

from __future__ import annotations

from dataclasses import field
from typing import TypeAlias

from sgxvtpm.errors import LocalProtocolError, RemoteProtocolError
from sgxvtpm.wire.jsonmsg import (
    Codec,
    Done,
    Refused,
    Reply,
    Request,
    check_with,
)

__all__ = [
    "PUBLIC",
    "ControlProtocolError",
    "ControlRequest",
    "ControlUsageError",
    "Done",
    "GetPlatformRoot",
    "Handoff",
    "InstanceProcess",
    "LaunchInstance",
    "Launched",
    "ManagerReady",
    "ManagerRefused",
    "Ping",
    "PlatformRoot",
    "Pong",
    "QueryInstance",
    "Refused",
    "Reply",
    "StopInstance",
    "WaitReady",
    "check_instance_id",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "reply_from_json",
    "reply_to_json",
    "request_from_json",
    "request_to_json",
]

INSTANCE_ID_LENGTH = 32
_LOWER_HEX = frozenset("0123456789abcdef")


class ControlProtocolError(RemoteProtocolError):
    """A CONTROL request or reply that is not one of this protocol's messages.

    hostd answers such a request with a refusal and keeps the connection; a
    malformed reply from hostd means hostd is broken or is not hostd: stop
    using that connection.
    """


class ControlUsageError(LocalProtocolError):
    """This program built a CONTROL message that cannot be sent (e.g. a bad
    instance id). Nothing was sent; fix the caller."""


def check_instance_id(value: str) -> None:
    """ValueError unless ``value`` is an instance id (32 lowercase hex digits)."""
    if len(value) != INSTANCE_ID_LENGTH or not _LOWER_HEX.issuperset(value):
        raise ValueError("bad instance id")


# ------------------------------------------------------------------ replies


class Pong(Reply):
    manager_ready: bool


class PlatformRoot(Reply):
    root_ca_pem: str


class Launched(Reply):
    """The instance's process; ``already_running`` if it was (then no mrenclave)."""

    pid: int
    mrenclave: str = ""
    already_running: bool = False


class InstanceProcess(Reply):
    """What hostd knows of an instance's process (``pid`` None: never launched)."""

    alive: bool
    pid: int | None
    reason: str = ""


# ------------------------------------------------------------------ requests


class Ping(Request[Pong], op="ping"):
    """Whether hostd is up and the manager ready (anyone may ask)."""


class WaitReady(Request[Done], op="wait_ready"):
    """Answered once the manager has restored every instance (or times out)."""



class GetPlatformRoot(Request[PlatformRoot], op="platform_root"):
    """The platform's root CA: a claim, clients pin it on first contact."""


class ManagerReady(Request[Done], op="manager_ready"):
    """The manager has restored every instance: hostd answers ``wait_ready`` now."""


class ManagerRefused(Request[Done], op="manager_refused"):
    """The manager will not run on its registry, and says why (hostd tells the operator)."""

    reason: str = ""


class LaunchInstance(Request[Launched], op="launch_instance"):
    """The second creation request: launch (or find running) instance ``instance_id``."""

    instance_id: str = field(metadata=check_with(check_instance_id))
    manager_cert_pem: str


class StopInstance(Request[Done], op="stop_instance"):
    """Stop the instance's process; ``erase`` also removes its directory."""

    instance_id: str = field(metadata=check_with(check_instance_id))
    erase: bool = False


class QueryInstance(Request[InstanceProcess], op="instance_info"):
    instance_id: str = field(metadata=check_with(check_instance_id))


class Handoff(Request[Done], op="handoff"):
    """Pass this connection to the enclave at the other end of relay session ``session``."""

    session: int


class FleetTarget(Reply):
    """The relay target name of a fleet connection hostd opened (``fleet-N``)."""

    target: str


class FleetDial(Request[FleetTarget], op="fleet_dial"):
    """Connect to the ``hostd --fleet-listen`` at ``host``:``port`` (the manager only)."""

    host: str
    port: int


ControlRequest: TypeAlias = (
    Ping
    | WaitReady
    | GetPlatformRoot
    | ManagerReady
    | ManagerRefused
    | LaunchInstance
    | StopInstance
    | QueryInstance
    | Handoff
    | FleetDial
)
#: What hostd answers on any connection; the rest only on the manager's.
PUBLIC: tuple[type[ControlRequest], ...] = (Ping, WaitReady, GetPlatformRoot)

_CODEC: Codec[ControlRequest] = Codec(
    "CONTROL", ControlRequest, ControlProtocolError, ControlUsageError
)


request_to_json = _CODEC.request_to_json
request_from_json = _CODEC.request_from_json
encode_request = _CODEC.encode_request
decode_request = _CODEC.decode_request
reply_to_json = _CODEC.reply_to_json
reply_from_json = _CODEC.reply_from_json
encode_reply = _CODEC.encode_reply
decode_reply = _CODEC.decode_reply
