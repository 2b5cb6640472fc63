"""The vTPM request protocol inside K2 (sgxvtpm.wire.vtpm)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgxvtpm.wire.vtpm import (
    KEEP,
    MAX_ATTACH_INFO,
    MAX_MESSAGE,
    MAX_RESUME_LOG,
    UNRECORDED,
    TpmResult,
    VtpmOp,
    VtpmProtocolError,
    VtpmRequest,
    VtpmResponse,
    VtpmUsageError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    encode_tpm_command,
    encode_tpm_response,
    recorded_of,
    tpm_command_of,
    tpm_response_of,
    unrecorded,
)

u32 = st.integers(0, 0xFFFFFFFF)
locality = st.integers(0, 4)
requests = st.one_of(
    st.builds(VtpmRequest.tpm_command, st.binary(max_size=200), locality),
    st.builds(VtpmRequest.init, u32),
    st.builds(VtpmRequest.reset_established, locality),
    st.builds(VtpmRequest.set_buffersize, u32),
    st.builds(VtpmRequest.get_stateblob, u32),
    st.builds(VtpmRequest.set_stateblob, u32, st.binary(max_size=200)),
    st.builds(VtpmRequest.get_info, st.integers(0, 2**64 - 1)),
    st.builds(VtpmRequest.attach, u32, st.binary(max_size=MAX_ATTACH_INFO)),
    st.builds(VtpmRequest, st.sampled_from([VtpmOp.SHUTDOWN, VtpmOp.STOP, VtpmOp.GET_ESTABLISHED,
                                            VtpmOp.CANCEL, VtpmOp.STORE_VOLATILE,
                                            VtpmOp.HASH_START, VtpmOp.HASH_END]), locality),
    st.builds(VtpmRequest.hash_data, st.binary(max_size=200), locality),
)


@given(requests)
def test_request_roundtrip(request: VtpmRequest) -> None:
    assert decode_request(encode_request(request)) == request


@given(u32, st.binary(max_size=300))
def test_response_roundtrip(result: int, payload: bytes) -> None:
    response = VtpmResponse(result, payload)
    assert decode_response(encode_response(response)) == response


@given(st.binary(max_size=64))
def test_decode_request_any_bytes(data: bytes) -> None:
    try:
        request = decode_request(data)
    except VtpmProtocolError:
        return
    assert encode_request(request) == data  # whatever parses is canonical


@given(st.binary(max_size=16))
def test_decode_response_any_bytes(data: bytes) -> None:
    try:
        decode_response(data)
    except VtpmProtocolError:
        assert len(data) < 4


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x00\x00",  # short header
        b"\x00\x00\x00\x00",  # op 0
        b"\xff\x00\x00\x00",  # unknown op
        b"\x0e\x04\x00\x00\x00",  # HASH_START with a payload
        b"\x10\x04\x00\x00\x01",  # HASH_END with a payload
        b"\x0d\x00\x00\x00\x00\x00\x01",  # ATTACH without full flags
        b"\x01\x05\x00\x00",  # locality 5
        b"\x01\x00\x00\x01",  # reserved not zero
        b"\x02\x00\x00\x00\x00\x00\x00",  # INIT with 3 bytes
        b"\x03\x00\x00\x00\x00",  # SHUTDOWN with a payload
        b"\x09\x00\x00\x00\x00\x01",  # SET_STATEBLOB without a full type
    ],
)
def test_malformed_requests(data: bytes) -> None:
    with pytest.raises(VtpmProtocolError):
        decode_request(data)


def test_oversized_messages() -> None:
    with pytest.raises(VtpmProtocolError):
        decode_request(b"\x01\x00\x00\x00" + bytes(MAX_MESSAGE))
    with pytest.raises(VtpmUsageError):
        encode_request(VtpmRequest.tpm_command(bytes(MAX_MESSAGE)))
    # An endpoint's description is bounded, and so is the resume log after its NUL.
    for info in (b"x" * (MAX_ATTACH_INFO + 1), b"{}\0" + bytes(MAX_RESUME_LOG + 1)):
        with pytest.raises(VtpmProtocolError):
            decode_request(b"\x0d\x00\x00\x00" + bytes(4) + info)
        with pytest.raises(VtpmUsageError):
            encode_request(VtpmRequest.attach(0, info))
    longest = b"x" * MAX_ATTACH_INFO + b"\0" + bytes(MAX_RESUME_LOG)
    assert decode_request(encode_request(VtpmRequest.attach(0, longest))).data == longest


def test_usage_errors() -> None:
    with pytest.raises(VtpmUsageError):
        encode_request(VtpmRequest.tpm_command(b"", locality=5))
    with pytest.raises(VtpmUsageError):
        encode_request(VtpmRequest.init(1 << 32))
    with pytest.raises(VtpmUsageError):
        encode_response(VtpmResponse(-1))


def test_typed_payloads() -> None:
    assert VtpmResponse.for_buffer_sizes(4096, 2808, 4096).buffer_sizes() == (4096, 2808, 4096)
    assert VtpmResponse.for_established(True).established() is True
    assert VtpmResponse.ok(b'{"a":1}').info() == '{"a":1}'
    for bad in (VtpmResponse.ok(b"\x00\x01"), VtpmResponse.ok(b"")):
        with pytest.raises(VtpmProtocolError):
            bad.established()
    with pytest.raises(VtpmProtocolError):
        VtpmResponse.ok(b"\x00" * 11).buffer_sizes()
    with pytest.raises(VtpmProtocolError):
        VtpmResponse.ok(b"\xff").info()
    assert VtpmResponse.error(TpmResult.FAIL).success is False


def test_wire_layout() -> None:
    """Byte layout as documented: op, locality, reserved, payload; result, payload."""
    assert encode_request(VtpmRequest.tpm_command(b"\x80\x01", 3)) == b"\x01\x03\x00\x00\x80\x01"
    assert encode_request(VtpmRequest.set_stateblob(2, b"ab")) == (
        b"\x09\x00\x00\x00\x00\x00\x00\x02ab")
    assert encode_response(VtpmResponse(0x3D, b"x")) == b"\x00\x00\x00\x3dx"
    assert encode_request(VtpmRequest.attach(1, b"{}")) == b"\x0d\x00\x00\x00\x00\x00\x00\x01{}"


# -- the TPM_COMMAND hot path must be the general codec, byte for byte ----------


@given(st.binary(max_size=64), st.integers(0, 4))
def test_encode_tpm_command_is_encode_request(command: bytes, locality: int) -> None:
    assert encode_tpm_command(command, locality) == encode_request(
        VtpmRequest.tpm_command(command, locality)
    )


@given(st.binary(max_size=64))
def test_encode_tpm_response_is_encode_response(response: bytes) -> None:
    assert encode_tpm_response(response) == encode_response(VtpmResponse.ok(response))


def _request_or_none(data: bytes) -> VtpmRequest | None:
    try:
        return decode_request(data)
    except VtpmProtocolError:
        return None


@given(
    st.one_of(
        st.binary(max_size=16),
        st.builds(lambda op, loc, rest: bytes([op, loc]) + rest,
                  st.integers(0, 14), st.integers(0, 6), st.binary(max_size=12)),
    )
)
def test_tpm_command_of_agrees_with_decode_request(data: bytes) -> None:
    fast = tpm_command_of(data)
    slow = _request_or_none(data)
    if slow is not None and slow.op is VtpmOp.TPM_COMMAND:
        assert fast == (slow.data, slow.locality)
    else:
        assert fast is None


@given(st.one_of(st.binary(max_size=16), st.binary(max_size=12).map(lambda b: b"\0" * 4 + b)))
def test_tpm_response_of_agrees_with_decode_response(data: bytes) -> None:
    fast = tpm_response_of(data)
    try:
        slow: VtpmResponse | None = decode_response(data)
    except VtpmProtocolError:
        slow = None
    if slow is not None and slow.success:
        assert fast == slow.payload
    else:
        assert fast is None


def test_hot_path_refuses_what_the_codec_refuses() -> None:
    with pytest.raises(VtpmUsageError):
        encode_tpm_command(b"x", 5)
    with pytest.raises(VtpmUsageError):
        encode_tpm_command(b"x" * MAX_MESSAGE, 0)
    with pytest.raises(VtpmUsageError):
        encode_tpm_response(b"x" * MAX_MESSAGE)
    assert tpm_command_of(b"\x01\x00\x00\x00" + b"x" * MAX_MESSAGE) is None


@given(st.one_of(st.binary(max_size=16), st.binary(max_size=12).map(lambda b: b"\0" * 4 + b)),
       st.booleans())
def test_unrecorded_marks_only_successes_and_recorded_of_undoes_it(
    data: bytes, keep: bool
) -> None:
    """The instance marks a TPM_COMMAND answer it did not record (and whether the
    endpoint keeps the request); the endpoint gets the same message back and learns
    it was not recorded. Nothing else changes."""
    marked = unrecorded(data, keep)
    is_success = tpm_response_of(data) is not None
    assert (marked != data) == is_success
    if is_success:  # never a success to old readers
        assert decode_response(marked).result == (KEEP if keep else UNRECORDED)
        assert recorded_of(marked) == (data, False, keep)
    else:
        assert marked == data
    if data[:4] not in (UNRECORDED.to_bytes(4, "big"), KEEP.to_bytes(4, "big")):
        assert recorded_of(data) == (data, True, False)
