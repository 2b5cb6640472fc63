"""The Microsoft TPM 2.0 simulator's TCP protocol (tcti-mssim), sans-IO.

Two ports (TPM 2.0 reference code, ``TpmTcpProtocol.h``; tpm2-tss
``tcti-mssim.c``); every integer is big-endian u32 unless noted:

- command port (default 2321): ``TPM_SEND_COMMAND`` (8), u8 locality, u32
  size, the TPM command; the answer is u32 size, the TPM response, u32 0.
  ``TPM_SESSION_END`` (20) and ``TPM_STOP`` (21) end the connection with no
  answer.
- platform port (command port + 1): one u32 signal per request (power on 1,
  power off 2, cancel on 9 / off 10, NV on 11, ...), each answered u32 0,
  except SESSION_END and STOP.

tcti-mssim sends POWER_ON and NV_ON on the platform port when it starts and
TPM_SESSION_END on both ports when it finishes; the client sends
TPM2_Startup itself.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from sgxvtpm.errors import LocalProtocolError, RemoteProtocolError
from sgxvtpm.tpm.constants import HEADER_SIZE, LIBTPMS_MAX_BUFFER
from sgxvtpm.wire._buffered import BufferedDecoder, RequestDecoder
from sgxvtpm.wire._codes import member

_U32 = struct.Struct(">I")
_SEND_HEADER = struct.Struct(">IBI")


class MssimProtocolError(RemoteProtocolError, ValueError):
    """The peer sent bytes that are not an mssim message: close the connection."""


class MssimUsageError(LocalProtocolError, ValueError):
    """This side built an invalid mssim message. Nothing was sent; fix the caller."""


class MssimCmd(enum.IntEnum):
    """Command codes (TpmTcpProtocol.h).

    The command port serves SEND_COMMAND, the platform port the signals in
    :data:`PLATFORM_SIGNALS`; SESSION_END or STOP ends either connection
    (:data:`END_CODES`). A decoder refuses every other code.
    """

    SIGNAL_POWER_ON = 1
    SIGNAL_POWER_OFF = 2
    SIGNAL_PHYS_PRES_ON = 3
    SIGNAL_PHYS_PRES_OFF = 4
    SIGNAL_HASH_START = 5
    SIGNAL_HASH_DATA = 6
    SIGNAL_HASH_END = 7
    SEND_COMMAND = 8
    SIGNAL_CANCEL_ON = 9
    SIGNAL_CANCEL_OFF = 10
    SIGNAL_NV_ON = 11
    SIGNAL_NV_OFF = 12
    SIGNAL_KEY_CACHE_ON = 13
    SIGNAL_KEY_CACHE_OFF = 14
    REMOTE_HANDSHAKE = 15
    SET_ALTERNATIVE_RESULT = 16
    SIGNAL_RESET = 17
    SIGNAL_RESTART = 18
    SESSION_END = 20
    STOP = 21
    TEST_FAILURE_MODE = 30


class Port(enum.Enum):
    COMMAND = "command"
    PLATFORM = "platform"


#: Platform-port signals: a bare u32, answered with u32 0.
PLATFORM_SIGNALS = frozenset(
    {
        MssimCmd.SIGNAL_POWER_ON,
        MssimCmd.SIGNAL_POWER_OFF,
        MssimCmd.SIGNAL_PHYS_PRES_ON,
        MssimCmd.SIGNAL_PHYS_PRES_OFF,
        MssimCmd.SIGNAL_CANCEL_ON,
        MssimCmd.SIGNAL_CANCEL_OFF,
        MssimCmd.SIGNAL_NV_ON,
        MssimCmd.SIGNAL_NV_OFF,
        MssimCmd.SIGNAL_KEY_CACHE_ON,
        MssimCmd.SIGNAL_KEY_CACHE_OFF,
        MssimCmd.SIGNAL_RESET,
        MssimCmd.SIGNAL_RESTART,
    }
)
#: End the connection, on either port; no answer.
END_CODES = frozenset({MssimCmd.SESSION_END, MssimCmd.STOP})


@dataclass(frozen=True)
class MssimRequest:
    """One request: ``code``, and for SEND_COMMAND the locality and TPM command."""

    code: MssimCmd
    locality: int = 0
    command: bytes = b""


class _Buffered(BufferedDecoder):
    usage_error = MssimUsageError
    protocol_error = MssimProtocolError


class MssimRequestDecoder(_Buffered, RequestDecoder[MssimRequest]):
    """Server side: bytes from one port's connection in, :class:`MssimRequest` out."""

    def __init__(self, port: Port, max_command: int = LIBTPMS_MAX_BUFFER) -> None:
        super().__init__()
        self.port = port
        self.max_command = max_command

    def _request(self, raw: int) -> MssimRequest | None:
        code = member(MssimCmd, raw, self._fail, "mssim code", f" on the {self.port.value} port")
        if code in END_CODES:
            self._take(4)
            return MssimRequest(code)
        if self.port is Port.PLATFORM:
            if code not in PLATFORM_SIGNALS:
                raise self._fail(f"code {code.name} is not a platform signal")
            self._take(4)
            return MssimRequest(code)
        if code is not MssimCmd.SEND_COMMAND:
            raise self._fail(f"code {code.name} is not served on the command port")
        if not self._need(_SEND_HEADER.size):
            return None
        _, locality, size = _SEND_HEADER.unpack_from(self._buf)
        if locality > 4:
            raise self._fail(f"locality {locality} out of range")
        if not HEADER_SIZE <= size <= self.max_command:
            raise self._fail(f"command size {size} outside {HEADER_SIZE}..{self.max_command}")
        if not self._need(_SEND_HEADER.size + size):
            return None
        command = self._take(_SEND_HEADER.size + size)[_SEND_HEADER.size :]
        return MssimRequest(code, locality, command)


def encode_command_response(response: bytes) -> bytes:
    """The command port's answer to SEND_COMMAND: u32 size, response, u32 0."""
    return _U32.pack(len(response)) + bytes(response) + _U32.pack(0)


def encode_ack(result: int = 0) -> bytes:
    """The platform port's answer to a signal."""
    return _U32.pack(result)


# ------------------------------------------------------------------ client side


def encode_request(request: MssimRequest) -> bytes:
    """Bytes for ``request`` (a client's side)."""
    if request.code is MssimCmd.SEND_COMMAND:
        if not 0 <= request.locality <= 4:
            raise MssimUsageError(f"locality must be 0..4, got {request.locality}")
        return _SEND_HEADER.pack(request.code, request.locality, len(request.command)) + bytes(
            request.command
        )
    return _U32.pack(request.code)


class MssimResponseDecoder(_Buffered):
    """Client side: answers on one port (command responses, or platform acks)."""

    def __init__(self, port: Port, max_response: int = LIBTPMS_MAX_BUFFER) -> None:
        super().__init__()
        self.port = port
        self.max_response = max_response

    def next_response(self) -> bytes | int | None:
        """A TPM response (command port) or the ack's u32 (platform port)."""
        self._check()
        if self.port is Port.PLATFORM:
            if not self._need(4):
                return None
            return int(_U32.unpack(self._take(4))[0])
        if not self._need(4):
            return None
        size = _U32.unpack_from(self._buf)[0]
        if size > self.max_response:
            raise self._fail(f"response size {size} above {self.max_response}")
        if not self._need(4 + size + 4):
            return None
        message = self._take(4 + size + 4)
        if message[-4:] != bytes(4):
            raise self._fail("response trailer is not u32 0")
        return message[4 : 4 + size]
