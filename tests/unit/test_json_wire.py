"""The typed JSON control protocols: K1 (sgxvtpm.wire.k1), hostd's CONTROL
(sgxvtpm.wire.control) and the manager's admin requests (sgxvtpm.wire.admin),
over their shared form (sgxvtpm.wire.jsonmsg)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgxvtpm.errors import LocalProtocolError, RemoteProtocolError
from sgxvtpm.wire import admin, control, k1
from sgxvtpm.wire import fleet as fleetwire
from sgxvtpm.wire.jsonmsg import Message, Refused, Reply, Request

CODECS: dict[str, tuple[ModuleType, type[RemoteProtocolError], type[LocalProtocolError]]] = {
    "k1": (k1, k1.K1ProtocolError, k1.K1UsageError),
    "control": (control, control.ControlProtocolError, control.ControlUsageError),
    "admin": (admin, admin.AdminProtocolError, admin.AdminUsageError),
    "fleet": (fleetwire, fleetwire.FleetProtocolError, fleetwire.FleetUsageError),
}
REQUESTS: dict[str, tuple[type[Request[Any]], ...]] = {
    "k1": typing.get_args(k1.K1Request),
    "control": typing.get_args(control.ControlRequest),
    "admin": typing.get_args(admin.AdminRequest),
    "fleet": typing.get_args(fleetwire.FleetRequest),
}
codec_names = pytest.mark.parametrize("name", sorted(CODECS))

# Fields whose check (field metadata) limits their values.
_CHECKED: dict[str, st.SearchStrategy[Any]] = {
    "instance_id": st.text("0123456789abcdef", min_size=32, max_size=32),
    "vm_spki_sha256": st.binary(min_size=32, max_size=32),
    "key": st.binary(min_size=32, max_size=32),
    "token": st.binary(min_size=32, max_size=32),
    "evidence": st.binary(min_size=1, max_size=40),
}


def values(tp: Any) -> st.SearchStrategy[Any]:
    """Any value of a message field's annotation."""
    if tp is str:
        return st.text(max_size=20)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers()
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if tp is bytes:
        return st.binary(max_size=40)
    if isinstance(tp, type) and issubclass(tp, Message):
        return messages(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is types.UnionType:
        (inner,) = (a for a in args if a is not type(None))
        return st.none() | values(inner)
    if origin is tuple:
        return st.lists(values(args[0]), max_size=3).map(tuple)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), values(args[1]), max_size=3)
    raise AssertionError(f"no strategy for {tp!r}")


def messages(cls: type[Any]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: _CHECKED[f.name] if f.name in _CHECKED else values(hints[f.name])
        for f in dataclasses.fields(cls)
    }
    return st.builds(cls, **fields)


def requests_of(name: str) -> st.SearchStrategy[Request[Any]]:
    return st.one_of([messages(cls) for cls in REQUESTS[name]])


def exchanges_of(name: str) -> st.SearchStrategy[tuple[Request[Any], Reply | Refused]]:
    """A request of protocol ``name`` and a reply of the type that answers it (or a refusal)."""
    return st.one_of(
        [
            st.tuples(messages(cls), messages(cls.REPLY) | st.builds(Refused, st.text()))
            for cls in REQUESTS[name]
        ]
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=10,
)


# ------------------------------------------------------------------ round trips


@codec_names
@given(data=st.data())
def test_request_round_trip(name: str, data: st.DataObject) -> None:
    module, _, _ = CODECS[name]
    request = data.draw(requests_of(name))
    assert module.decode_request(module.encode_request(request)) == request


@codec_names
@given(data=st.data())
def test_reply_round_trip(name: str, data: st.DataObject) -> None:
    module, _, _ = CODECS[name]
    request, reply = data.draw(exchanges_of(name))
    assert module.decode_reply(request, module.encode_reply(reply)) == reply


# ------------------------------------------------------------------ anything the peer sends


@codec_names
@given(data=st.binary(max_size=200))
def test_any_bytes_decode_as_a_request_or_raise_the_protocol_error(name: str, data: bytes) -> None:
    module, error, _ = CODECS[name]
    try:
        request = module.decode_request(data)
    except error:
        return
    assert isinstance(request, REQUESTS[name])


@codec_names
@given(data=st.binary(max_size=200), choice=st.data())
def test_any_bytes_decode_as_a_reply_or_raise_the_protocol_error(
    name: str, data: bytes, choice: st.DataObject
) -> None:
    module, error, _ = CODECS[name]
    cls = choice.draw(st.sampled_from(REQUESTS[name]))
    request = choice.draw(messages(cls))
    try:
        reply = module.decode_reply(request, data)
    except error:
        return
    assert isinstance(reply, cls.REPLY | Refused)


@codec_names
@given(data=st.data())
def test_any_field_changed_decodes_or_raises_the_protocol_error(
    name: str, data: st.DataObject
) -> None:
    """Valid messages with one field replaced by any JSON value, or removed: random
    bytes rarely parse as JSON, these reach every field's decoder."""
    module, error, _ = CODECS[name]
    request, reply = data.draw(exchanges_of(name))
    for encoded, decode in (
        (module.encode_request(request), module.decode_request),
        (module.encode_reply(reply), lambda b: module.decode_reply(request, b)),
    ):
        obj = json.loads(encoded)
        key = data.draw(st.sampled_from([*obj, "op", "ok", "error", "id", "extra"]))
        if data.draw(st.booleans()):
            obj.pop(key, None)
        else:
            obj[key] = data.draw(json_values)
        try:
            decoded = decode(json.dumps(obj).encode())
        except error:
            continue
        assert isinstance(decoded, Message | Refused)


@codec_names
@given(value=json_values)
def test_any_json_document_decodes_or_raises_the_protocol_error(name: str, value: object) -> None:
    module, error, _ = CODECS[name]
    for op in (None, *(cls.OP for cls in REQUESTS[name])):
        obj = {"op": op, "x": value} if op else value
        try:
            request = module.decode_request(json.dumps(obj).encode())
        except error:
            continue
        assert isinstance(request, REQUESTS[name])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe{}",
        b"[" * 5000,  # nested past the recursion limit
        b'{"op": "status", "x": NaN}',
        b'{"op": "status", "x": Infinity}',
        '{"op": "status"}'.encode("utf-16"),
        b'"status"',
        b'{"op": 1}',
        b'{"op": "nope"}',
    ],
)
def test_malformed_documents_are_refused(data: bytes) -> None:
    with pytest.raises(admin.AdminProtocolError):
        admin.decode_request(data)


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        ({"op": "launch_instance", "manager_cert_pem": "x"}, "missing field 'instance_id'"),
        ({"op": "launch_instance", "instance_id": "A" * 32, "manager_cert_pem": "x"},
         "bad instance id"),
        ({"op": "instance_info", "instance_id": "0" * 31}, "bad instance id"),
        ({"op": "stop_instance", "instance_id": "0" * 32, "erase": 1}, "expected bool"),
        ({"op": "handoff", "session": True}, "expected int"),
        ({"op": "handoff", "session": "1"}, "expected int"),
        ({"op": "manager_refused", "reason": None}, "expected str"),
    ],
)
def test_control_requests_are_checked_field_by_field(obj: dict[str, object], why: str) -> None:
    with pytest.raises(control.ControlProtocolError, match=why):
        control.request_from_json(obj)


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        ({"op": "create", "name": "a", "vm_spki_der": "abc"}, "not hex"),
        ({"op": "create", "name": "a", "vm_spki_der": "zz"}, "not hex"),
        ({"op": "create", "name": "a", "vm_spki_der": "00", "pcr_banks": "sha256"},
         "expected tuple"),
        ({"op": "create", "name": "a", "vm_spki_der": "00", "ek": [1]}, r"ek\[0\]"),
        ({"op": "show"}, "missing field 'name'"),
    ],
)
def test_k1_requests_are_checked_field_by_field(obj: dict[str, object], why: str) -> None:
    with pytest.raises(k1.K1ProtocolError, match=why):
        k1.decode_request(json.dumps(obj).encode())


@pytest.mark.parametrize(
    "obj",
    [
        {"ok": "yes"},
        {"ok": False, "error": 3},
        {"ok": True},  # a status without its fields
        {"ok": True, "state": "running", "reason": "", "mrenclave": "", "mrsigner": "",
         "version": 1.5},
        [],
    ],
)
def test_malformed_replies_are_refused(obj: object) -> None:
    with pytest.raises(admin.AdminProtocolError):
        admin.decode_reply(admin.GetStatus(), json.dumps(obj).encode())


# ------------------------------------------------------------------ what this side builds


def test_building_a_message_the_protocol_does_not_allow_is_a_usage_error() -> None:
    with pytest.raises(control.ControlUsageError, match="bad instance id"):
        control.encode_request(control.QueryInstance("not an id"))
    with pytest.raises(admin.AdminUsageError, match="SHA-256"):
        admin.encode_request(admin.Provision("vm", b"short"))
    with pytest.raises(k1.K1UsageError, match="not a K1 request"):
        k1.encode_request(control.Ping())
    with pytest.raises(k1.K1UsageError, match="expected tuple"):
        k1.encode_request(k1.CreateVm("vm", b"", pcr_banks=["sha256"]))  # type: ignore[arg-type]
    with pytest.raises(k1.K1UsageError, match="finite"):
        k1.InstanceInfo("vm", "0" * 32, created=float("nan")).to_json()
    with pytest.raises(control.ControlUsageError, match="not a reply"):
        control.encode_reply(control.Ping())  # type: ignore[arg-type]


# ------------------------------------------------------------------ the bytes on the wire


def test_the_wire_keeps_the_json_field_names() -> None:
    """Same objects as the dicts these protocols were before they were typed."""
    assert json.loads(k1.encode_request(k1.CreateVm("vm1", b"\x30\x59", ("sha256",), ("rsa2048",)))
                      ) == {"op": "create", "name": "vm1", "vm_spki_der": "3059",
                            "pcr_banks": ["sha256"], "ek": ["rsa2048"], "incoming": False}
    assert control.request_to_json(control.StopInstance("a" * 32, erase=True)) == {
        "op": "stop_instance", "instance_id": "a" * 32, "erase": True}
    assert control.request_to_json(control.Handoff(1)) == {"op": "handoff", "session": 1}
    assert json.loads(admin.encode_reply(admin.Provisioned(
        (admin.EkPublicArea("rsa2048", b"\x01"),), admin.TpmSpec("2.0", 0, 164)))) == {
        "ok": True, "eks": [{"alg": "rsa2048", "public_area": "01"}],
        "tpm_spec": {"family": "2.0", "level": 0, "revision": 164, "manufacturer": "",
                     "model": "", "version": ""}}
    assert json.loads(k1.encode_reply(Refused("no VM named 'x'"))) == {
        "ok": False, "error": "no VM named 'x'"}


def test_decoding_ignores_unknown_fields_and_fills_defaults() -> None:
    """The relay's "id", and fields an older peer sent (a provision reply carried the
    status; destroy answered the state), are not errors; missing defaults are filled."""
    request = control.request_from_json({"op": "stop_instance", "instance_id": "b" * 32, "id": 7})
    assert request == control.StopInstance("b" * 32, erase=False)
    reply = control.reply_from_json(control.Ping(), {"ok": True, "manager_ready": False, "id": 7})
    assert reply == control.Pong(manager_ready=False)
    old = {"ok": True, "state": "manufacturing", "reason": "", "mrenclave": "00", "mrsigner": "00",
           "version": 1, "eks": [], "tpm_spec": {"family": "2.0", "level": 0, "revision": 164}}
    assert admin.decode_reply(admin.Provision("vm", b"\0" * 32), json.dumps(old).encode()) == (
        admin.Provisioned((), admin.TpmSpec("2.0", 0, 164)))
    assert admin.decode_reply(admin.Destroy(), b'{"ok": true, "state": "destroyed"}') == (
        admin.Done())
    assert k1.decode_request(b'{"op": "create", "name": "vm", "vm_spki_der": ""}') == (
        k1.CreateVm("vm", b"", ("sha256",), ()))


def test_a_reply_without_ok_is_a_refusal() -> None:
    """hostd's switch answers {"error": "internal error"} when its handler fails."""
    assert control.reply_from_json(control.WaitReady(), {"error": "internal error", "id": 1}) == (
        Refused("internal error"))
    assert control.reply_from_json(control.Handoff(1), {"ok": False}) == Refused()


def test_instance_info_round_trips_through_instance_json() -> None:
    info = k1.InstanceInfo("vm1", "c" * 32, ek_certificates={"rsa2048": "3082"}, pid=12,
                           alive=True, state="running")
    assert k1.InstanceInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    with pytest.raises(k1.K1ProtocolError):
        k1.InstanceInfo.from_json({"name": "vm1"})


def test_protocol_errors_are_remote_and_usage_errors_local() -> None:
    for _, error, usage in CODECS.values():
        assert issubclass(error, RemoteProtocolError)
        assert issubclass(usage, LocalProtocolError)
        assert not issubclass(error, LocalProtocolError | KeyError | TypeError)
