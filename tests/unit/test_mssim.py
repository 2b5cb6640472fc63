"""tcti-mssim codec (sgxvtpm.wire.mssim)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.helpers.codecs import decode_in_chunks

from sgxvtpm.wire.mssim import (
    END_CODES,
    PLATFORM_SIGNALS,
    MssimCmd,
    MssimProtocolError,
    MssimRequest,
    MssimRequestDecoder,
    MssimResponseDecoder,
    MssimUsageError,
    Port,
    encode_ack,
    encode_command_response,
    encode_request,
)

commands = st.builds(
    lambda loc, body: MssimRequest(MssimCmd.SEND_COMMAND, loc,
                                   b"\x80\x01" + (10 + len(body)).to_bytes(4, "big") + bytes(4)
                                   + body),
    st.integers(0, 4), st.binary(max_size=40),
)
signals = st.builds(MssimRequest, st.sampled_from(sorted(PLATFORM_SIGNALS)))


def decode_all(port: Port, data: bytes, chunk: int) -> list[MssimRequest]:
    dec = MssimRequestDecoder(port)
    return decode_in_chunks(dec.receive_data, dec.next_request, data, chunk)


@given(st.lists(commands, max_size=4), st.integers(1, 9))
def test_command_port_roundtrip(reqs: list[MssimRequest], chunk: int) -> None:
    data = b"".join(encode_request(r) for r in reqs)
    assert decode_all(Port.COMMAND, data, chunk) == reqs


@given(st.lists(signals, max_size=6), st.integers(1, 5))
def test_platform_port_roundtrip(reqs: list[MssimRequest], chunk: int) -> None:
    data = b"".join(encode_request(r) for r in reqs)
    assert decode_all(Port.PLATFORM, data, chunk) == reqs


@given(st.sampled_from(list(Port)), st.binary(max_size=60), st.integers(1, 9))
def test_request_decoder_any_bytes(port: Port, data: bytes, chunk: int) -> None:
    try:
        requests = decode_all(port, data, chunk)
    except MssimProtocolError:
        return
    assert all(isinstance(r, MssimRequest) for r in requests)


def test_layout_and_errors() -> None:
    cmd = bytes.fromhex("80010000000c000001440000")
    assert encode_request(MssimRequest(MssimCmd.SEND_COMMAND, 3, cmd)) == (
        bytes.fromhex("00000008" "03" "0000000c") + cmd)
    for code in END_CODES:
        assert decode_all(Port.PLATFORM, code.to_bytes(4, "big"), 1) == [MssimRequest(code)]
    for bad_port, data in [
        (Port.PLATFORM, bytes.fromhex("00000008")),  # a TPM command on the platform port
        (Port.COMMAND, bytes.fromhex("00000001")),  # a signal on the command port
        (Port.COMMAND, bytes.fromhex("00000008" "05" "0000000a") + bytes(10)),  # locality 5
        (Port.COMMAND, bytes.fromhex("00000008" "00" "00100000")),  # oversized
        (Port.COMMAND, bytes.fromhex("000000ff")),
    ]:
        with pytest.raises(MssimProtocolError):
            decode_all(bad_port, data, 4)
    with pytest.raises(MssimUsageError):
        encode_request(MssimRequest(MssimCmd.SEND_COMMAND, 9, cmd))


@given(st.binary(max_size=60), st.integers(1, 9))
def test_response_roundtrip(resp: bytes, chunk: int) -> None:
    data = encode_command_response(resp) + encode_command_response(b"x")
    dec = MssimResponseDecoder(Port.COMMAND)
    out = []
    for i in range(0, len(data), chunk):
        dec.receive_data(data[i : i + chunk])
        while (r := dec.next_response()) is not None:
            out.append(r)
    assert out == [resp, b"x"]
    plat = MssimResponseDecoder(Port.PLATFORM)
    plat.receive_data(encode_ack(0))
    assert plat.next_response() == 0


@given(st.binary(max_size=40))
def test_response_decoder_any_bytes(data: bytes) -> None:
    dec = MssimResponseDecoder(Port.COMMAND, max_response=16)
    dec.receive_data(data)
    dec.receive_data(b"")
    responses = []
    try:
        while (response := dec.next_response()) is not None:
            responses.append(response)
    except MssimProtocolError:
        return
    assert all(len(r) <= 16 for r in responses if isinstance(r, bytes))
