"""Relay frames: many sessions over one byte stream (sans-IO).

hostd's switch (``sgxvtpm.host.switch``) multiplexes TLS sessions between
clients and enclaves on a single stream per connection. Each frame is::

    u8 type | u32 session id | u32 payload length | payload      (big-endian)

=========  ==========  ===================================================
type       session id  payload
=========  ==========  ===================================================
OPEN (1)   != 0        target name (UTF-8); towards a target: source label
DATA (2)   != 0        opaque bytes (TLS records; the relay never looks in)
CLOSE (3)  != 0        reason (UTF-8, informational, unauthenticated)
CONTROL(4) == 0        a JSON object, to or from hostd itself
HANDOFF(5) != 0        empty; sent by hostd to an enclave together with
                       the client connection's file descriptor (SCM_RIGHTS)
TPM (6)    == 0        one TPM command (enclave to hostd) or its response
                       (hostd to enclave) for the host's TPM, opaque to
                       hostd; an empty response: hostd has no host TPM
=========  ==========  ===================================================

HANDOFF takes the relay off a session's path once it is authenticated: a
client asks with CONTROL {"op": "handoff", "session": sid}; hostd stops
reading that connection, passes its descriptor to the enclave with HANDOFF
and answers {"ok": true}; from then on the session's TLS records flow raw
between the client and the enclave on that connection (the host's kernel
still carries them, hostd's userspace no longer does). In real SGX the
untrusted runtime in the enclave's own process does this I/O.

Session ids are local to one connection; the relay maps them. A connection
numbers the sessions it opens from 1 below :data:`RELAY_ASSIGNED`; the relay
numbers the sessions it opens towards a connection (incoming OPEN) from
:data:`RELAY_ASSIGNED` up, so the two never collide. Payloads are at most
:data:`MAX_PAYLOAD` bytes.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sgxvtpm.errors import LocalProtocolError, RemoteProtocolError
from sgxvtpm.wire._codes import member

HEADER = struct.Struct(">BII")
HEADER_SIZE = HEADER.size  # 9
MAX_PAYLOAD = 256 * 1024
MAX_NAME = 255  # bytes of an OPEN target name
CONTROL_SESSION = 0
RELAY_ASSIGNED = 0x8000_0000
#: CLOSE reason hostd gives an OPEN to an instance that was destroyed (its
#: directory is gone), so its endpoint stops retrying; hostd is untrusted, so
#: this only ever ends an endpoint, which hostd could do anyway.
DESTROYED = b"destroyed"


class RelayProtocolError(RemoteProtocolError):
    """The peer sent a malformed frame (unknown type, oversize, bad UTF-8 or
    JSON, wrong session id, stream cut mid-frame). Drop the connection; the
    decoder that raised it stays broken."""


class RelayUsageError(LocalProtocolError, ValueError):
    """The local program tried to build or encode an invalid frame. Nothing was
    sent; fix the caller (the message says which field)."""


class FrameType(enum.IntEnum):
    OPEN = 1
    DATA = 2
    CLOSE = 3
    CONTROL = 4
    HANDOFF = 5
    TPM = 6


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    session_id: int
    payload: bytes = b""

    @classmethod
    def open(cls, session_id: int, target: str) -> Frame:
        return cls(FrameType.OPEN, session_id, target.encode("utf-8"))

    @classmethod
    def data(cls, session_id: int, payload: bytes) -> Frame:
        return cls(FrameType.DATA, session_id, payload)

    @classmethod
    def close(cls, session_id: int, reason: str = "") -> Frame:
        return cls(FrameType.CLOSE, session_id, reason.encode("utf-8"))

    @classmethod
    def control(cls, obj: Mapping[str, Any]) -> Frame:
        payload = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")
        return cls(FrameType.CONTROL, CONTROL_SESSION, payload)

    @property
    def text(self) -> str:
        """OPEN target / CLOSE reason (validated UTF-8 on decode)."""
        return self.payload.decode("utf-8")

    def control_object(self) -> dict[str, Any]:
        """The JSON object of a CONTROL frame (validated on decode)."""
        obj = json.loads(self.payload)
        if not isinstance(obj, dict):
            raise RelayUsageError("not a CONTROL frame with a JSON object")
        return obj


def parse_header(header: bytes | bytearray | memoryview) -> tuple[FrameType, int, int]:
    """Decode and check the 9-byte header at the start of ``header``:
    (type, session id, payload length)."""
    raw_type, session_id, length = HEADER.unpack_from(header, 0)
    ftype = member(FrameType, raw_type, RelayProtocolError, "frame type")
    if length > MAX_PAYLOAD:
        raise RelayProtocolError(f"frame payload of {length} bytes exceeds {MAX_PAYLOAD}")
    if (ftype in (FrameType.CONTROL, FrameType.TPM)) != (session_id == CONTROL_SESSION):
        raise RelayProtocolError(f"{ftype.name} frame on session {session_id}")
    if ftype is FrameType.OPEN and not 0 < length <= MAX_NAME:
        raise RelayProtocolError(f"OPEN target name of {length} bytes")
    if ftype is FrameType.HANDOFF and length:
        raise RelayProtocolError("HANDOFF frame with a payload")
    return ftype, session_id, length


def check_payload(ftype: FrameType, payload: bytes) -> None:
    """Check what the header cannot: UTF-8 text, JSON objects."""
    if ftype in (FrameType.OPEN, FrameType.CLOSE):
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise RelayProtocolError(f"{ftype.name} payload is not UTF-8") from None
    elif ftype is FrameType.CONTROL:
        try:
            obj = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # deep nesting: not ours
            raise RelayProtocolError("CONTROL payload is not JSON") from None
        if not isinstance(obj, dict):
            raise RelayProtocolError("CONTROL payload is not a JSON object")


def encode_header(ftype: FrameType, session_id: int, length: int) -> bytes:
    """The header alone, for writers that send the payload without copying it."""
    return HEADER.pack(ftype, session_id, length)


def encode(frame: Frame) -> bytes:
    """The wire form of ``frame``; RelayUsageError if it would not decode."""
    try:
        header = HEADER.pack(frame.type, frame.session_id, len(frame.payload))
        parse_header(header)
        check_payload(FrameType(frame.type), frame.payload)
    except (struct.error, RelayProtocolError, ValueError) as exc:
        raise RelayUsageError(f"invalid frame: {exc}") from None
    return header + frame.payload


class RelayDecoder:
    """Bytes in, frames out. ``receive_data(b"")`` marks the end of stream."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._error: RelayProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._eof:
            raise RelayUsageError("receive_data after end of stream")
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_frame(self) -> Frame | None:
        """The next whole frame; None if more bytes are needed (or at a clean end)."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except RelayProtocolError as exc:
            self._error = exc
            self._buf.clear()
            raise

    @property
    def at_clean_end(self) -> bool:
        """True once the stream ended on a frame boundary."""
        return self._eof and not self._buf and self._error is None

    def trailing_data(self) -> bytes:
        """The bytes received after the last whole frame. After a protocol
        switch (a connection handed off, see HANDOFF) they are the first
        bytes of the next protocol, not part of a frame."""
        return bytes(self._buf)

    def _next(self) -> Frame | None:
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            if self._eof and buf:
                raise RelayProtocolError("stream ended inside a frame header")
            return None
        ftype, session_id, length = parse_header(buf)
        end = HEADER_SIZE + length
        if len(buf) < end:
            if self._eof:
                raise RelayProtocolError("stream ended inside a frame payload")
            return None
        payload = bytes(buf[HEADER_SIZE:end])
        del buf[:end]
        check_payload(ftype, payload)
        return Frame(ftype, session_id, payload)
