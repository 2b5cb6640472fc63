"""A code read off the wire as its enum member (sgxvtpm.wire._codes), and the stream
decoders' peek at the u32 a message starts with (sgxvtpm.wire._buffered)."""

from __future__ import annotations

import enum

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgxvtpm.wire._codes import member
from sgxvtpm.wire.mssim import MssimProtocolError, MssimRequestDecoder, Port
from sgxvtpm.wire.relay import FrameType, RelayProtocolError
from sgxvtpm.wire.swtpm_ctrl import CtrlProtocolError, CtrlRequestDecoder


class _Color(enum.IntEnum):
    RED = 1
    BLUE = 3


class _Refusal(ValueError):
    pass


@given(raw=st.integers(-(2**40), 2**40))
def test_a_code_is_its_member_or_the_protocol_error_naming_it(raw: int) -> None:
    if raw in (1, 3):
        assert member(_Color, raw, _Refusal, "color") is _Color(raw)
        return
    with pytest.raises(_Refusal, match=f"^unknown color {raw} on the left$") as caught:
        member(_Color, raw, _Refusal, "color", " on the left")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_the_error_may_be_a_decoder_method_that_records_it() -> None:
    seen: list[str] = []

    def fail(message: str) -> Exception:
        seen.append(message)
        return RelayProtocolError(message)

    assert member(FrameType, int(FrameType.CONTROL), fail, "frame type") is FrameType.CONTROL
    with pytest.raises(RelayProtocolError, match="unknown frame type 250"):
        member(FrameType, 250, fail, "frame type")
    assert seen == ["unknown frame type 250"]


def test_an_unknown_mssim_code_breaks_the_decoder_and_names_the_port() -> None:
    decoder = MssimRequestDecoder(Port.PLATFORM)
    decoder.receive_data((99).to_bytes(4, "big"))
    with pytest.raises(MssimProtocolError, match="unknown mssim code 99 on the platform port"):
        decoder.next_request()
    with pytest.raises(MssimProtocolError, match="decoder is broken after"):
        decoder.next_request()


@given(data=st.binary(max_size=3))
def test_a_decoder_waits_for_the_four_bytes_a_message_starts_with(data: bytes) -> None:
    for decoder in (MssimRequestDecoder(Port.COMMAND), CtrlRequestDecoder()):
        decoder.receive_data(data)
        assert decoder.next_request() is None
        assert decoder.pending == len(data)


def test_a_broken_control_decoder_stays_broken() -> None:
    decoder = CtrlRequestDecoder(max_blob=8)
    decoder.receive_data((13).to_bytes(4, "big") + bytes(8) + (9).to_bytes(4, "big"))
    with pytest.raises(CtrlProtocolError, match="announces 9 bytes"):
        decoder.next_request()
    with pytest.raises(CtrlProtocolError, match="decoder is broken after"):
        decoder.next_request()
