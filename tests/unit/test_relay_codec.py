"""Relay frame codec (sgxvtpm.wire.relay): round trips, limits, fuzzing."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgxvtpm.wire.relay import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Frame,
    FrameType,
    RelayDecoder,
    RelayProtocolError,
    RelayUsageError,
    encode,
)

session_ids = st.integers(min_value=1, max_value=0xFFFF_FFFF)
text = st.text(max_size=60)
names = st.text(min_size=1, max_size=60)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)

frames = st.one_of(
    st.builds(Frame.open, session_ids, names),
    st.builds(Frame.data, session_ids, st.binary(max_size=2048)),
    st.builds(Frame.close, session_ids, text),
    st.builds(Frame.control, st.dictionaries(st.text(max_size=8), json_values, max_size=5)),
)


def decode_all(data: bytes, *, byte_by_byte: bool) -> list[Frame]:
    decoder = RelayDecoder()
    out: list[Frame] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data][: len(data)]
    for chunk in [*chunks, b""]:
        decoder.receive_data(chunk)
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    assert decoder.at_clean_end
    return out


@given(st.lists(frames, max_size=8))
def test_round_trip_whole_and_byte_by_byte(seq: list[Frame]) -> None:
    wire = b"".join(encode(f) for f in seq)
    assert decode_all(wire, byte_by_byte=False) == seq
    assert decode_all(wire, byte_by_byte=True) == seq


@given(frames)
def test_control_object_round_trips(frame: Frame) -> None:
    (decoded,) = decode_all(encode(frame), byte_by_byte=False)
    if frame.type is FrameType.CONTROL:
        assert decoded.control_object() == json.loads(frame.payload)


def _outcome(data: bytes, *, byte_by_byte: bool) -> tuple[list[Frame], bool]:
    """Frames decoded before the first error, and whether an error occurred."""
    decoder = RelayDecoder()
    got: list[Frame] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data][: len(data)]
    try:
        for chunk in [*chunks, b""]:
            decoder.receive_data(chunk)
            while (frame := decoder.next_frame()) is not None:
                got.append(frame)
    except RelayProtocolError:
        return got, True
    return got, False


# Bias the fuzzer towards plausible headers so it reaches the payload checks.
plausible = st.builds(
    lambda t, sid, payload, tail: struct.pack(">BII", t, sid, len(payload)) + payload + tail,
    st.integers(0, 6),
    st.sampled_from([0, 1, 2, 0x8000_0000, 0xFFFF_FFFF]),
    st.binary(max_size=40) | st.sampled_from([b"{}", b"[]", b'{"a":1}', b"\xff\xfe", b"x"]),
    st.binary(max_size=12),
)


@given(st.binary(max_size=200) | plausible)
def test_any_bytes_parse_or_raise_protocol_error(data: bytes) -> None:
    whole = _outcome(data, byte_by_byte=False)
    split = _outcome(data, byte_by_byte=True)
    assert whole == split


def test_decoder_stays_broken() -> None:
    decoder = RelayDecoder()
    decoder.receive_data(struct.pack(">BII", 9, 1, 0))
    with pytest.raises(RelayProtocolError):
        decoder.next_frame()
    with pytest.raises(RelayProtocolError):
        decoder.next_frame()
    with pytest.raises(RelayProtocolError):
        decoder.receive_data(encode(Frame.data(1, b"x")))


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (struct.pack(">BII", 0, 1, 0), "unknown type 0"),
        (struct.pack(">BII", 6, 1, 0), "unknown type 6"),
        (struct.pack(">BII", 5, 1, 1) + b"x", "HANDOFF with a payload"),
        (struct.pack(">BII", 5, 0, 0), "HANDOFF on the control session"),
        (struct.pack(">BII", 2, 1, MAX_PAYLOAD + 1), "oversize"),
        (struct.pack(">BII", 2, 0, 1) + b"x", "DATA on the control session"),
        (struct.pack(">BII", 4, 7, 2) + b"{}", "CONTROL off session 0"),
        (struct.pack(">BII", 1, 1, 0), "OPEN with an empty target"),
        (struct.pack(">BII", 1, 1, 2) + b"\xc3\x28", "OPEN target not UTF-8"),
        (struct.pack(">BII", 3, 1, 1) + b"\xff", "CLOSE reason not UTF-8"),
        (struct.pack(">BII", 4, 0, 3) + b"[1]", "CONTROL not an object"),
        (struct.pack(">BII", 4, 0, 3) + b"{x}", "CONTROL not JSON"),
        (struct.pack(">BII", 2, 1, 5) + b"abc", "truncated payload"),
        (b"\x02\x00\x00", "truncated header"),
    ],
)
def test_malformed_frames_are_rejected(raw: bytes, why: str) -> None:
    frames_, failed = _outcome(raw, byte_by_byte=False)
    assert failed, why
    assert frames_ == []


def test_oversize_is_rejected_from_the_header_alone() -> None:
    # The decoder must not wait for (and buffer) 4 GiB before refusing.
    decoder = RelayDecoder()
    decoder.receive_data(struct.pack(">BII", 2, 1, 0xFFFF_FFFF))
    with pytest.raises(RelayProtocolError):
        decoder.next_frame()


def test_max_payload_is_accepted() -> None:
    frame = Frame.data(3, bytes(MAX_PAYLOAD))
    wire = encode(frame)
    assert len(wire) == HEADER_SIZE + MAX_PAYLOAD
    assert decode_all(wire, byte_by_byte=False) == [frame]


@pytest.mark.parametrize(
    "frame",
    [
        Frame.data(1, bytes(MAX_PAYLOAD + 1)),
        Frame(FrameType.DATA, 0, b"x"),
        Frame(FrameType.CONTROL, 0, b"not json"),
        Frame(FrameType.OPEN, 1, b""),
        Frame(FrameType.DATA, 1 << 32, b""),
        Frame(FrameType.DATA, -1, b""),
    ],
)
def test_encode_refuses_invalid_frames(frame: Frame) -> None:
    with pytest.raises(RelayUsageError):
        encode(frame)


def test_wire_layout_is_big_endian_type_session_length() -> None:
    assert encode(Frame.open(0x01020304, "manager")) == (
        b"\x01\x01\x02\x03\x04\x00\x00\x00\x07manager"
    )
