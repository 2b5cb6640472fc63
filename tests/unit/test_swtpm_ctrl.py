"""swtpm control-channel and data-channel codecs (sgxvtpm.wire.swtpm_ctrl)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.helpers.codecs import decode_in_chunks

from sgxvtpm.wire.swtpm_ctrl import (
    LOCALITY_AS_READ,
    SEND_COMMAND,
    CommandFramer,
    CtrlCmd,
    CtrlProtocolError,
    CtrlRequest,
    CtrlRequestDecoder,
    CtrlResponse,
    CtrlResponseDecoder,
    CtrlUsageError,
    DataCommand,
    encode_request,
    encode_response,
)

u32 = st.integers(0, 0xFFFFFFFF)
loc = st.integers(0, 255)
requests = st.one_of(
    st.builds(CtrlRequest, st.sampled_from([1, 3, 4, 6, 8, 9, 10, 14, 15, 16, 20, 99, 0])),
    st.builds(lambda f: CtrlRequest(CtrlCmd.INIT, flags=f), u32),
    st.builds(lambda c, v: CtrlRequest(c, locality=v),
              st.sampled_from([CtrlCmd.SET_LOCALITY, CtrlCmd.RESET_TPMESTABLISHED]), loc),
    st.builds(lambda d: CtrlRequest(CtrlCmd.HASH_DATA, data=d), st.binary(max_size=64)),
    st.builds(lambda f, t, o: CtrlRequest(CtrlCmd.GET_STATEBLOB, flags=f, blob_type=t, offset=o),
              u32, u32, u32),
    st.builds(lambda f, t, d: CtrlRequest(CtrlCmd.SET_STATEBLOB, flags=f, blob_type=t, data=d),
              u32, u32, st.binary(max_size=64)),
    st.builds(lambda s: CtrlRequest(CtrlCmd.SET_BUFFERSIZE, size=s), u32),
    st.builds(lambda f, o: CtrlRequest(CtrlCmd.GET_INFO, flags=f, offset=o),
              st.integers(0, 2**64 - 1), u32),
    st.builds(lambda r: CtrlRequest(CtrlCmd.LOCK_STORAGE, retries=r), u32),
)


def decode_all_requests(data: bytes, chunk: int, locality_body: int) -> list[CtrlRequest]:
    dec = CtrlRequestDecoder(locality_body=locality_body)
    return decode_in_chunks(dec.receive_data, dec.next_request, data, chunk)


@given(st.lists(requests, max_size=5), st.sampled_from([1, 4]))
def test_requests_roundtrip_whole_and_bytewise(reqs: list[CtrlRequest], body: int) -> None:
    data = b"".join(encode_request(r, locality_body=body) for r in reqs)
    assert decode_all_requests(data, max(1, len(data)), body) == reqs
    assert decode_all_requests(data, 1, body) == reqs


@given(st.binary(max_size=80), st.integers(1, 8), st.sampled_from([1, 4]))
def test_request_decoder_any_bytes(data: bytes, chunk: int, body: int) -> None:
    """Any input decodes into requests or raises CtrlProtocolError, nothing else."""
    try:
        decoded = decode_all_requests(data, chunk, body)
    except CtrlProtocolError:
        return
    assert all(isinstance(r, CtrlRequest) for r in decoded)


def test_qemu_locality_padding() -> None:
    """QEMU sends sizeof(ptm_loc) = 4 bytes after SET_LOCALITY; the next command follows."""
    data = bytes.fromhex("00000005" "03000000" "0000000e")
    assert decode_all_requests(data, 1, 4) == [
        CtrlRequest(CtrlCmd.SET_LOCALITY, locality=3), CtrlRequest(CtrlCmd.STOP)]
    assert encode_request(CtrlRequest(CtrlCmd.SET_LOCALITY, locality=3), 4) == data[:8]
    with pytest.raises(CtrlUsageError):
        encode_request(CtrlRequest(CtrlCmd.SET_LOCALITY), 2)


def test_oversized_and_truncated() -> None:
    dec = CtrlRequestDecoder(max_blob=16)
    dec.receive_data(bytes.fromhex("0000000d" "00000000" "00000001" "00000011"))
    with pytest.raises(CtrlProtocolError):
        dec.next_request()
    with pytest.raises(CtrlProtocolError):  # stays broken
        dec.next_request()
    dec = CtrlRequestDecoder()
    dec.receive_data(bytes.fromhex("00000002" "0000"))
    assert dec.next_request() is None
    dec.receive_data(b"")
    with pytest.raises(CtrlProtocolError):
        dec.next_request()
    with pytest.raises(CtrlUsageError):
        dec.receive_data(b"x")


responses = st.one_of(
    st.builds(lambda c: CtrlResponse(CtrlCmd.GET_CAPABILITY, caps=c), st.integers(0, 2**64 - 1)),
    st.builds(lambda c, r: CtrlResponse(c, result=r),
              st.sampled_from([2, 3, 5, 9, 10, 11, 13, 14, 16, 18, 19, 77]), u32),
    st.builds(lambda r, e: CtrlResponse(CtrlCmd.GET_TPMESTABLISHED, result=r, established=e),
              u32, st.booleans()),
    st.builds(lambda f, d: CtrlResponse(CtrlCmd.GET_STATEBLOB, flags=f, totlength=len(d), data=d),
              u32, st.binary(max_size=64)),
    st.builds(lambda r, f: CtrlResponse(CtrlCmd.GET_CONFIG, result=r, flags=f), u32, u32),
    st.builds(lambda r, s: CtrlResponse(CtrlCmd.SET_BUFFERSIZE, result=r, sizes=s), u32,
              st.tuples(u32, u32, u32)),
    st.builds(lambda t, d: CtrlResponse(CtrlCmd.GET_INFO, totlength=t, data=d), u32,
              st.binary(max_size=64)),
)


def decode_response(code: int, data: bytes, chunk: int, short: bool) -> CtrlResponse | None:
    dec = CtrlResponseDecoder(code, short_errors=short)
    for i in range(0, len(data), chunk):
        dec.receive_data(data[i : i + chunk])
    return dec.next_response()


def _normal(resp: CtrlResponse) -> CtrlResponse:
    """What survives the wire: errors carry no payload, sizes or flag."""
    if resp.code == CtrlCmd.GET_CAPABILITY or resp.result == 0:
        return resp
    if resp.code == CtrlCmd.GET_TPMESTABLISHED:
        return CtrlResponse(resp.code, result=resp.result, established=resp.established)
    if resp.code in (CtrlCmd.SET_BUFFERSIZE, CtrlCmd.GET_CONFIG):
        return CtrlResponse(resp.code, result=resp.result, flags=resp.flags, sizes=resp.sizes)
    if resp.code == CtrlCmd.GET_STATEBLOB:
        return CtrlResponse(resp.code, result=resp.result, flags=resp.flags)
    return CtrlResponse(resp.code, result=resp.result)


@given(responses, st.integers(1, 9))
def test_responses_roundtrip(resp: CtrlResponse, chunk: int) -> None:
    data = encode_response(resp)  # full-size errors, as our servers send
    assert decode_response(resp.code, data, chunk, short=False) == _normal(resp)


@given(st.sampled_from([4, 12, 17]))
def test_short_errors_as_swtpm_sends_them(code: int) -> None:
    resp = CtrlResponse(code, result=0x0A)
    data = encode_response(resp, short_errors=True)
    assert data == b"\x00\x00\x00\x0a"
    assert decode_response(code, data, 1, short=True) == CtrlResponse(code, result=0x0A)


@given(st.integers(1, 25), st.binary(max_size=40), st.booleans())
def test_response_decoder_any_bytes(code: int, data: bytes, short: bool) -> None:
    """Any input gives a response, nothing yet, or CtrlProtocolError, nothing else."""
    dec = CtrlResponseDecoder(code, short_errors=short)
    dec.receive_data(data)
    dec.receive_data(b"")
    try:
        response = dec.next_response()
    except CtrlProtocolError:
        return
    assert response is None or isinstance(response, CtrlResponse)


def test_response_layouts() -> None:
    """Sizes QEMU reads: 8 for caps and established, 16 for buffer sizes and blob headers."""
    assert encode_response(CtrlResponse(1, caps=0xFFFF)) == bytes.fromhex("000000000000ffff")
    assert len(encode_response(CtrlResponse(4, established=True))) == 8
    assert len(encode_response(CtrlResponse(17, result=9))) == 16
    assert encode_response(CtrlResponse(12, data=b"ab")) == bytes.fromhex(
        "00000000" "00000000" "00000002" "00000002") + b"ab"
    assert encode_response(CtrlResponse(18, totlength=3, data=b"{}\0")) == bytes.fromhex(
        "00000000" "00000003" "00000003") + b"{}\0"


@given(st.lists(st.binary(min_size=0, max_size=30), max_size=4), st.integers(1, 7))
def test_command_framer_roundtrip(bodies: list[bytes], chunk: int) -> None:
    msgs = [b"\x80\x01" + (10 + len(b)).to_bytes(4, "big") + b"\x00\x00\x01\x7b" + b
            for b in bodies]
    data = b"".join(msgs)
    framer = CommandFramer()
    out = []
    for i in range(0, len(data), chunk):
        framer.receive_data(data[i : i + chunk])
        while (m := framer.next_command()) is not None:
            out.append(m)
    assert out == msgs


@given(st.binary(max_size=40), st.integers(1, 7))
def test_command_framer_any_bytes(data: bytes, chunk: int) -> None:
    framer = CommandFramer(max_size=32)
    try:
        for i in range(0, len(data), chunk):
            framer.receive_data(data[i : i + chunk])
            while framer.next_command() is not None:
                pass
        framer.receive_data(b"")
        framer.next_command()
    except CtrlProtocolError as exc:
        assert exc.rc == 0x142


@given(st.lists(st.tuples(requests, st.sampled_from([1, 4])), max_size=6))
def test_locality_as_read_takes_qemu_and_swtpm_ioctl_forms(
    reqs: list[tuple[CtrlRequest, int]],
) -> None:
    """One decoder for QEMU (4-byte locality bodies) and swtpm_ioctl (1 byte): each
    request arrives whole and is answered before the next, as both clients do."""
    dec = CtrlRequestDecoder(locality_body=LOCALITY_AS_READ)
    for req, body in reqs:
        dec.receive_data(encode_request(req, locality_body=body))
        assert dec.next_request() == req
        assert dec.pending == 0 and dec.next_request() is None


def test_locality_as_read_waits_for_the_body_and_keeps_non_padding() -> None:
    """(A request sent behind a 1-byte body without waiting for the answer would
    be taken for padding, as in swtpm; no client does that.)"""
    dec = CtrlRequestDecoder(locality_body=LOCALITY_AS_READ)
    dec.receive_data(bytes.fromhex("00000005"))
    assert dec.next_request() is None  # no locality byte yet
    # The locality byte alone (swtpm_ioctl): a 1-byte body; the next request follows.
    dec.receive_data(bytes.fromhex("04"))
    assert dec.next_request() == CtrlRequest(CtrlCmd.SET_LOCALITY, locality=4)
    dec.receive_data(bytes.fromhex("0000000e"))
    assert dec.next_request() == CtrlRequest(CtrlCmd.STOP)
    # Bytes after the locality that are not zero padding are not taken as padding.
    dec.receive_data(bytes.fromhex("0000000b" "03" "010000" "0000000e"))
    assert dec.next_request() == CtrlRequest(CtrlCmd.RESET_TPMESTABLISHED, locality=3)
    assert dec.pending == 7
    with pytest.raises(CtrlUsageError):
        CtrlRequestDecoder(locality_body=2)


@given(st.binary(max_size=80), st.integers(1, 8))
def test_locality_as_read_any_bytes(data: bytes, chunk: int) -> None:
    try:
        decoded = decode_all_requests(data, chunk, LOCALITY_AS_READ)
    except CtrlProtocolError:
        return
    assert all(isinstance(r, CtrlRequest) for r in decoded)


def prefixed(command: bytes, locality: int) -> bytes:
    return struct.pack(">IBI", SEND_COMMAND, locality, len(command)) + command


tpm_commands = st.builds(
    lambda tag, code, body: struct.pack(">HII", tag, 10 + len(body), code) + body,
    st.sampled_from([0x8001, 0x8002]), u32, st.binary(max_size=40))


@given(st.lists(st.tuples(tpm_commands, st.none() | st.integers(0, 255)), max_size=5),
       st.integers(1, 9))
def test_data_commands_with_and_without_the_tcg_prefix(
    cmds: list[tuple[bytes, int | None]], chunk: int,
) -> None:
    data = b"".join(c if loc is None else prefixed(c, loc) for c, loc in cmds)
    framer = CommandFramer()
    out = decode_in_chunks(framer.receive_data, framer.next_data_command, data, chunk)
    assert out == [DataCommand(c, loc) for c, loc in cmds]


def test_prefixed_response_framing_and_bad_prefixes() -> None:
    response = bytes.fromhex("80010000000a00000000")
    assert DataCommand(b"", None).frame_response(response) == response
    assert DataCommand(b"", 3).frame_response(response) == (
        struct.pack(">I", 10) + response + bytes(4))
    for bad in (struct.pack(">IBI", SEND_COMMAND, 0, 9),            # size below a header
                # the prefix says 10 bytes, the command's size field 11
                struct.pack(">IBI", SEND_COMMAND, 0, 10) + bytes.fromhex("80010000000b00000000")):
        framer = CommandFramer()
        framer.receive_data(bad + bytes(16))
        with pytest.raises(CtrlProtocolError):
            framer.next_data_command()
        with pytest.raises(CtrlProtocolError):  # stays broken
            framer.next_data_command()


@given(st.binary(max_size=60), st.integers(1, 7))
def test_data_command_framer_any_bytes(data: bytes, chunk: int) -> None:
    """Any input: data commands, or CtrlProtocolError (TPM_RC_COMMAND_SIZE), nothing else."""
    framer = CommandFramer(max_size=32)
    try:
        out = decode_in_chunks(framer.receive_data, framer.next_data_command, data, chunk)
    except CtrlProtocolError as exc:
        assert exc.rc == 0x142
        return
    assert all(isinstance(c, DataCommand) and 10 <= len(c.command) <= 32 for c in out)
