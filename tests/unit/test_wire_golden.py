"""The bytes on the wire do not change when the declarations do.

One request per op of each JSON protocol (K1, CONTROL, admin, fleet) and a
reply of the type that answers it, built from fixed field values, encode to
the bytes recorded here (taken from the encoders before the message classes
were declared by class keyword); and the swtpm control and TPMA tables keep
their members and values.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgxvtpm.tpm import wire as tpmwire
from sgxvtpm.tpm.constants import TPMA_NV, TPMA_OBJECT, TPMA_SESSION
from sgxvtpm.wire import admin, control, fleet, k1
from sgxvtpm.wire.jsonmsg import Message, Request
from sgxvtpm.wire.swtpm_ctrl import CtrlCmd, PtmCap

_INSTANCE_ID = "0123456789abcdef" * 2


def _value(name: str, tp: Any) -> Any:
    """A fixed value of a field's annotation (32 bytes for ``bytes``: a digest, key or token)."""
    if name == "instance_id":
        return _INSTANCE_ID
    if tp is str:
        return name
    if tp is bool:
        return True
    if tp is int:
        return 7
    if tp is float:
        return 1.5
    if tp is bytes:
        return bytes(range(32))
    if isinstance(tp, type) and issubclass(tp, Message):
        return sample(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is types.UnionType:
        (inner,) = (a for a in args if a is not type(None))
        return _value(name, inner)
    if origin is tuple:
        return (_value(name, args[0]),)
    if origin is dict:
        return {"k": _value(name, args[1])}
    raise AssertionError(f"no value for {tp!r}")


def sample(cls: type[Any]) -> Any:
    """``cls`` with every field set to its fixed value."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _value(f.name, hints[f.name]) for f in dataclasses.fields(cls)})


MODULES: dict[str, tuple[ModuleType, Any]] = {
    "k1": (k1, k1.K1Request),
    "control": (control, control.ControlRequest),
    "admin": (admin, admin.AdminRequest),
    "fleet": (fleet, fleet.FleetRequest),
}

#: The Shown reply of the sample instance (show, migrate_cancel, ...).
_SHOWN = (
    b'{"ok":true,"instance":{"name":"name","instance_id":"0123456789ab'
    b'cdef0123456789abcdef","pcr_banks":["pcr_banks"],"ek":["ek"],"cre'
    b'ated":1.5,"state":"state","mrenclave":"mrenclave","mrsigner":"mr'
    b'signer","ek_certificates":{"k":"ek_certificates"},"pid":7,"alive'
    b'":true,"reason":"reason","endpoint_pid":7,"endpoint":"endpoint",'
    b'"endpoint_since":1.5}}'
)

#: Recorded before the declarations changed (protocol: op: (class, request, reply)); so are
#: the tables below.
GOLDEN = {
    "k1": {
        "create": (
            "CreateVm",
            (
                b'{"op":"create","name":"name","vm_spki_der":"00010203040506070809'
                b'0a0b0c0d0e0f101112131415161718191a1b1c1d1e1f","pcr_banks":["pcr_'
                b'banks"],"ek":["ek"],"incoming":true}'
            ),
            (
                b'{"ok":true,"instance":{"name":"name","instance_id":"0123456789ab'
                b'cdef0123456789abcdef","pcr_banks":["pcr_banks"],"ek":["ek"],"cre'
                b'ated":1.5,"state":"state","mrenclave":"mrenclave","mrsigner":"mr'
                b'signer","ek_certificates":{"k":"ek_certificates"},"pid":7,"alive'
                b'":true,"reason":"reason","endpoint_pid":7,"endpoint":"endpoint",'
                b'"endpoint_since":1.5},"vm_cert_pem":"vm_cert_pem","ca_cert_pem":'
                b'"ca_cert_pem"}'
            ),
        ),
        "destroy": (
            "DestroyVm",
            b'{"op":"destroy","name":"name"}',
            b'{"ok":true}',
        ),
        "list": (
            "ListVms",
            b'{"op":"list"}',
            (
                b'{"ok":true,"instances":[{"name":"name","instance_id":"0123456789'
                b'abcdef0123456789abcdef","pcr_banks":["pcr_banks"],"ek":["ek"],"c'
                b'reated":1.5,"state":"state","mrenclave":"mrenclave","mrsigner":"'
                b'mrsigner","ek_certificates":{"k":"ek_certificates"},"pid":7,"ali'
                b've":true,"reason":"reason","endpoint_pid":7,"endpoint":"endpoint'
                b'","endpoint_since":1.5}]}'
            ),
        ),
        "show": (
            "ShowVm",
            b'{"op":"show","name":"name"}',
            _SHOWN,
        ),
        "ca": (
            "GetCaCertificate",
            b'{"op":"ca"}',
            b'{"ok":true,"ca_cert_pem":"ca_cert_pem"}',
        ),
        "fleet_invite": (
            "FleetInvite",
            b'{"op":"fleet_invite","address":"address"}',
            (
                b'{"ok":true,"token":"000102030405060708090a0b0c0d0e0f101112131415'
                b'161718191a1b1c1d1e1f","expires":1.5}'
            ),
        ),
        "fleet_join": (
            "FleetJoin",
            (
                b'{"op":"fleet_join","host":"host","port":7,"token":"0001020304050'
                b'60708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f","address":"'
                b'address"}'
            ),
            (
                b'{"ok":true,"fleet":{"fleet_id":"fleet_id","self_id":"self_id","m'
                b'embers":[{"platform_id":"platform_id","address":"address","joine'
                b'd":1.5,"mrenclave":"mrenclave"}]}}'
            ),
        ),
        "fleet_show": (
            "FleetShow",
            b'{"op":"fleet_show"}',
            (
                b'{"ok":true,"fleet":{"fleet_id":"fleet_id","self_id":"self_id","m'
                b'embers":[{"platform_id":"platform_id","address":"address","joine'
                b'd":1.5,"mrenclave":"mrenclave"}]}}'
            ),
        ),
        "fleet_leave": (
            "FleetLeave",
            b'{"op":"fleet_leave"}',
            (
                b'{"ok":true,"fleet":{"fleet_id":"fleet_id","self_id":"self_id","m'
                b'embers":[{"platform_id":"platform_id","address":"address","joine'
                b'd":1.5,"mrenclave":"mrenclave"}]}}'
            ),
        ),
        "fleet_remove": (
            "FleetRemove",
            b'{"op":"fleet_remove","member":"member"}',
            (
                b'{"ok":true,"fleet":{"fleet_id":"fleet_id","self_id":"self_id","m'
                b'embers":[{"platform_id":"platform_id","address":"address","joine'
                b'd":1.5,"mrenclave":"mrenclave"}]}}'
            ),
        ),
        "migrate_cancel": (
            "MigrateCancel",
            b'{"op":"migrate_cancel","name":"name"}',
            _SHOWN,
        ),
        "migrate": (
            "MigrateVm",
            b'{"op":"migrate","name":"name","host":"host","port":7}',
            _SHOWN,
        ),
    },
    "control": {
        "ping": (
            "Ping",
            b'{"op":"ping"}',
            b'{"ok":true,"manager_ready":true}',
        ),
        "wait_ready": (
            "WaitReady",
            b'{"op":"wait_ready"}',
            b'{"ok":true}',
        ),
        "platform_root": (
            "GetPlatformRoot",
            b'{"op":"platform_root"}',
            b'{"ok":true,"root_ca_pem":"root_ca_pem"}',
        ),
        "manager_ready": (
            "ManagerReady",
            b'{"op":"manager_ready"}',
            b'{"ok":true}',
        ),
        "manager_refused": (
            "ManagerRefused",
            b'{"op":"manager_refused","reason":"reason"}',
            b'{"ok":true}',
        ),
        "launch_instance": (
            "LaunchInstance",
            (
                b'{"op":"launch_instance","instance_id":"0123456789abcdef012345678'
                b'9abcdef","manager_cert_pem":"manager_cert_pem"}'
            ),
            (
                b'{"ok":true,"pid":7,"mrenclave":"mrenclave","already_running":tru'
                b'e}'
            ),
        ),
        "stop_instance": (
            "StopInstance",
            (
                b'{"op":"stop_instance","instance_id":"0123456789abcdef0123456789a'
                b'bcdef","erase":true}'
            ),
            b'{"ok":true}',
        ),
        "instance_info": (
            "QueryInstance",
            (
                b'{"op":"instance_info","instance_id":"0123456789abcdef0123456789a'
                b'bcdef"}'
            ),
            b'{"ok":true,"alive":true,"pid":7,"reason":"reason"}',
        ),
        "handoff": (
            "Handoff",
            b'{"op":"handoff","session":7}',
            b'{"ok":true}',
        ),
        "fleet_dial": (
            "FleetDial",
            b'{"op":"fleet_dial","host":"host","port":7}',
            b'{"ok":true,"target":"target"}',
        ),
    },
    "admin": {
        "status": (
            "GetStatus",
            b'{"op":"status"}',
            (
                b'{"ok":true,"state":"state","reason":"reason","mrenclave":"mrencl'
                b'ave","mrsigner":"mrsigner","version":7,"imported":7,"origin":"or'
                b'igin","endpoint_pid":7,"endpoint":"endpoint","endpoint_since":1.'
                b'5}'
            ),
        ),
        "provision": (
            "Provision",
            (
                b'{"op":"provision","vm_id":"vm_id","vm_spki_sha256":"000102030405'
                b'060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f","pcr_banks'
                b'":["pcr_banks"],"ek":["ek"]}'
            ),
            (
                b'{"ok":true,"eks":[{"alg":"alg","public_area":"000102030405060708'
                b'090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"}],"tpm_spec":{"f'
                b'amily":"family","level":7,"revision":7,"manufacturer":"manufactu'
                b'rer","model":"model","version":"version"}}'
            ),
        ),
        "certify": (
            "Certify",
            (
                b'{"op":"certify","ek_certificates":{"k":"000102030405060708090a0b'
                b'0c0d0e0f101112131415161718191a1b1c1d1e1f"},"platform_certificate'
                b'":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1'
                b'e1f"}'
            ),
            (
                b'{"ok":true,"state":"state","reason":"reason","mrenclave":"mrencl'
                b'ave","mrsigner":"mrsigner","version":7,"imported":7,"origin":"or'
                b'igin","endpoint_pid":7,"endpoint":"endpoint","endpoint_since":1.'
                b'5}'
            ),
        ),
        "destroy": (
            "Destroy",
            b'{"op":"destroy"}',
            b'{"ok":true}',
        ),
        "incoming": (
            "ProvisionIncoming",
            (
                b'{"op":"incoming","vm_id":"vm_id","vm_spki_sha256":"0001020304050'
                b'60708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f","pcr_banks"'
                b':["pcr_banks"]}'
            ),
            (
                b'{"ok":true,"state":"state","reason":"reason","mrenclave":"mrencl'
                b'ave","mrsigner":"mrsigner","version":7,"imported":7,"origin":"or'
                b'igin","endpoint_pid":7,"endpoint":"endpoint","endpoint_since":1.'
                b'5}'
            ),
        ),
        "blob_key": (
            "SetBlobKey",
            (
                b'{"op":"blob_key","key":"000102030405060708090a0b0c0d0e0f10111213'
                b'1415161718191a1b1c1d1e1f","vm":"vm","origin":"origin"}'
            ),
            (
                b'{"ok":true,"state":"state","reason":"reason","mrenclave":"mrencl'
                b'ave","mrsigner":"mrsigner","version":7,"imported":7,"origin":"or'
                b'igin","endpoint_pid":7,"endpoint":"endpoint","endpoint_since":1.'
                b'5}'
            ),
        ),
        "migrated": (
            "MarkMigrated",
            b'{"op":"migrated","version":7,"to":"to"}',
            (
                b'{"ok":true,"state":"state","reason":"reason","mrenclave":"mrencl'
                b'ave","mrsigner":"mrsigner","version":7,"imported":7,"origin":"or'
                b'igin","endpoint_pid":7,"endpoint":"endpoint","endpoint_since":1.'
                b'5}'
            ),
        ),
        "cancel_migration": (
            "CancelMigration",
            b'{"op":"cancel_migration"}',
            (
                b'{"ok":true,"state":"state","reason":"reason","mrenclave":"mrencl'
                b'ave","mrsigner":"mrsigner","version":7,"imported":7,"origin":"or'
                b'igin","endpoint_pid":7,"endpoint":"endpoint","endpoint_since":1.'
                b'5}'
            ),
        ),
        "export": (
            "ExportState",
            b'{"op":"export"}',
            (
                b'{"ok":true,"blobs":{"k":"000102030405060708090a0b0c0d0e0f1011121'
                b'31415161718191a1b1c1d1e1f"}}'
            ),
        ),
        "import": (
            "ImportState",
            (
                b'{"op":"import","blobs":{"k":"000102030405060708090a0b0c0d0e0f101'
                b'112131415161718191a1b1c1d1e1f"}}'
            ),
            (
                b'{"ok":true,"state":"state","reason":"reason","mrenclave":"mrencl'
                b'ave","mrsigner":"mrsigner","version":7,"imported":7,"origin":"or'
                b'igin","endpoint_pid":7,"endpoint":"endpoint","endpoint_since":1.'
                b'5}'
            ),
        ),
    },
    "fleet": {
        "join": (
            "Join",
            (
                b'{"op":"join","token":"000102030405060708090a0b0c0d0e0f1011121314'
                b'15161718191a1b1c1d1e1f","evidence":"000102030405060708090a0b0c0d'
                b'0e0f101112131415161718191a1b1c1d1e1f","address":"address"}'
            ),
            (
                b'{"ok":true,"fleet_id":"fleet_id","member_id":"member_id","epheme'
                b'ral":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c'
                b'1d1e1f","wrapped":"000102030405060708090a0b0c0d0e0f1011121314151'
                b'61718191a1b1c1d1e1f","members":[{"platform_id":"platform_id","ad'
                b'dress":"address","joined":1.5,"mrenclave":"mrenclave"}]}'
            ),
        ),
        "moved": (
            "Moved",
            (
                b'{"op":"moved","vm":"vm","version":7,"to":"to","proof":"000102030'
                b'405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"}'
            ),
            b'{"ok":true}',
        ),
        "move": (
            "Move",
            (
                b'{"op":"move","vm":"vm","origin":"origin","blobs":{"k":"000102030'
                b'405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"},"proof'
                b'":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1'
                b'e1f"}'
            ),
            b'{"ok":true,"to":"to"}',
        ),
    },
}
CtrlCmd_VALUES = {
    "GET_CAPABILITY": 0x1, "INIT": 0x2, "SHUTDOWN": 0x3, "GET_TPMESTABLISHED": 0x4,
    "SET_LOCALITY": 0x5, "HASH_START": 0x6, "HASH_DATA": 0x7, "HASH_END": 0x8, "CANCEL_TPM_CMD":
    0x9, "STORE_VOLATILE": 0xa, "RESET_TPMESTABLISHED": 0xb, "GET_STATEBLOB": 0xc,
    "SET_STATEBLOB": 0xd, "STOP": 0xe, "GET_CONFIG": 0xf, "SET_DATAFD": 0x10, "SET_BUFFERSIZE":
    0x11, "GET_INFO": 0x12, "LOCK_STORAGE": 0x13,
}
PtmCap_VALUES = {
    "INIT": 0x1, "SHUTDOWN": 0x2, "GET_TPMESTABLISHED": 0x4, "SET_LOCALITY": 0x8, "HASHING":
    0x10, "CANCEL_TPM_CMD": 0x20, "STORE_VOLATILE": 0x40, "RESET_TPMESTABLISHED": 0x80,
    "GET_STATEBLOB": 0x100, "SET_STATEBLOB": 0x200, "STOP": 0x400, "GET_CONFIG": 0x800,
    "SET_DATAFD": 0x1000, "SET_BUFFERSIZE": 0x2000, "GET_INFO": 0x4000, "SEND_COMMAND_HEADER":
    0x8000, "LOCK_STORAGE": 0x10000,
}
TPMA_NV_VALUES = {
    "PPWRITE": 0x1, "OWNERWRITE": 0x2, "AUTHWRITE": 0x4, "POLICYWRITE": 0x8, "TPM_NT_COUNTER":
    0x10, "TPM_NT_BITS": 0x20, "TPM_NT_EXTEND": 0x40, "TPM_NT_PIN_FAIL": 0x80,
    "TPM_NT_PIN_PASS": 0x90, "POLICY_DELETE": 0x400, "WRITELOCKED": 0x800, "WRITEALL": 0x1000,
    "WRITEDEFINE": 0x2000, "WRITE_STCLEAR": 0x4000, "GLOBALLOCK": 0x8000, "PPREAD": 0x10000,
    "OWNERREAD": 0x20000, "AUTHREAD": 0x40000, "POLICYREAD": 0x80000, "NO_DA": 0x2000000,
    "ORDERLY": 0x4000000, "CLEAR_STCLEAR": 0x8000000, "READLOCKED": 0x10000000, "WRITTEN":
    0x20000000, "PLATFORMCREATE": 0x40000000, "READ_STCLEAR": 0x80000000,
}
TPMA_OBJECT_VALUES = {
    "FIXEDTPM": 0x2, "STCLEAR": 0x4, "FIXEDPARENT": 0x10, "SENSITIVEDATAORIGIN": 0x20,
    "USERWITHAUTH": 0x40, "ADMINWITHPOLICY": 0x80, "NODA": 0x400, "ENCRYPTEDDUPLICATION": 0x800,
    "RESTRICTED": 0x10000, "DECRYPT": 0x20000, "SIGN_ENCRYPT": 0x40000, "X509SIGN": 0x80000,
}
TPMA_SESSION_VALUES = {
    "CONTINUESESSION": 0x1, "AUDITEXCLUSIVE": 0x2, "AUDITRESET": 0x4, "DECRYPT": 0x20,
    "ENCRYPT": 0x40, "AUDIT": 0x80,
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_protocol_keeps_its_ops_and_their_classes(name: str) -> None:
    _, union = MODULES[name]
    requests: tuple[type[Request[Any]], ...] = typing.get_args(union)
    assert {cls.OP: cls.__name__ for cls in requests} == {
        op: cls_name for op, (cls_name, _, _) in GOLDEN[name].items()
    }


@pytest.mark.parametrize(
    ("name", "op"), [(name, op) for name, table in GOLDEN.items() for op in table]
)
def test_one_message_per_op_encodes_to_the_recorded_bytes(name: str, op: str) -> None:
    module, union = MODULES[name]
    (cls,) = (c for c in typing.get_args(union) if op == c.OP)
    _, request_bytes, reply_bytes = GOLDEN[name][op]
    request = sample(cls)
    assert module.encode_request(request) == request_bytes
    assert module.decode_request(request_bytes) == request
    reply = sample(cls.REPLY)
    assert module.encode_reply(reply) == reply_bytes
    assert module.decode_reply(request, reply_bytes) == reply


TABLES = [
    (CtrlCmd, CtrlCmd_VALUES),
    (PtmCap, PtmCap_VALUES),
    (TPMA_NV, TPMA_NV_VALUES),
    (TPMA_OBJECT, TPMA_OBJECT_VALUES),
    (TPMA_SESSION, TPMA_SESSION_VALUES),
]


@pytest.mark.parametrize(("table", "recorded"), TABLES)
def test_constant_tables_keep_their_members_and_values(
    table: type[Any], recorded: dict[str, int]
) -> None:
    assert {name: int(member) for name, member in table.__members__.items()} == recorded


@pytest.mark.parametrize(("table", "recorded"), TABLES[1:])
@given(value=st.integers(0, 2**32 - 1), other=st.integers(0, 2**32 - 1))
def test_flag_tables_declared_by_bit_number_behave_as_flags_declared_by_mask(
    table: type[enum.IntFlag], recorded: dict[str, int], value: int, other: int
) -> None:
    reference = enum.IntFlag(table.__name__, recorded)  # type: ignore[misc]
    flags, expected = table(value), reference(value)
    assert int(flags) == int(expected) == value
    assert str(flags) == str(expected) and repr(flags) == repr(expected)
    assert [m.name for m in flags] == [m.name for m in expected]
    assert int(flags & table(other)) == int(expected & reference(other))
    assert int(~flags) == int(~expected)


#: NV commands, with the owner's authorisation and with the index's own (password "pw").
NV_COMMANDS = [
    (lambda: tpmwire.nv_write(0x1500016, b"abc", 5),
     "8002000000260000013740000001015000160000000940000009000000000000036162630005"),
    (lambda: tpmwire.nv_write(0x1500016, b"abc", 0, 0x1500016, b"pw"),
     "8002000000280000013701500016015000160000000b400000090000000002707700036162630000"),
    (lambda: tpmwire.nv_increment(0x1500020),
     "80020000001f00000134400000010150002000000009400000090000000000"),
    (lambda: tpmwire.nv_increment(0x1500020, 0x4000000C, b"x"),
     "800200000020000001344000000c015000200000000a40000009000000000178"),
    (lambda: tpmwire.nv_read(0x1500016, 32, 2),
     "8002000000230000014e40000001015000160000000940000009000000000000200002"),
    (lambda: tpmwire.nv_read(0x1500016, 32, 0, 0x1500016, b"pw"),
     "8002000000250000014e01500016015000160000000b400000090000000002707700200000"),
]


@pytest.mark.parametrize(("build", "recorded"), NV_COMMANDS)
def test_nv_commands_encode_to_the_recorded_bytes(
    build: typing.Callable[[], bytes], recorded: str
) -> None:
    assert build().hex() == recorded
