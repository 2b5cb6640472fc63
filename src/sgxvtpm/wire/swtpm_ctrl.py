"""swtpm's control channel and raw data channel, sans-IO.

The control channel (what QEMU's ``-tpmdev emulator`` and tcti-swtpm speak,
swtpm's ``include/swtpm/tpm_ioctl.h``): a request is a big-endian u32 command
code and a body whose size follows from the code; a response starts with a
u32 TPM_RESULT, except GET_CAPABILITY's, which is a bare u64. There is no
length prefix, so both directions are framed by the code.

Facts checked against swtpm 0.7.1 (Debian 12) by driving ``swtpm socket``
with this codec (tests/e2e/test_ctrl_channel.py):

- GET_CAPABILITY answers 8 bytes: u64 caps (0xffff), no result word.
- Capability bits are PTM_CAP_* (HASHING is one bit for codes 6-8), not
  "bit code-1".
- LOCK_STORAGE (19) is unknown to 0.7.1 (TPM_BAD_ORDINAL); it is 0.8+.
- "TPM not running" and "not while running" answer TPM_BAD_ORDINAL with a
  bare 4-byte result even where the success response is longer
  (GET_TPMESTABLISHED, GET_STATEBLOB, SET_BUFFERSIZE): ``short_errors``.
  QEMU always reads the full success size, so our servers send full-size
  error responses (zeros after the result) to never stall QEMU.
- GET_INFO's totlength counts the terminating NUL, which is sent.
- SET_LOCALITY and RESET_TPMESTABLISHED bodies are sizeof(ptm_loc) = 4
  bytes from QEMU (u8 locality, 3 padding bytes: tpm_emulator.c sends the
  whole union) but 1 byte from tcti-swtpm; swtpm copes because it takes
  whatever one read() returns. Without a length field the decoder must be
  told which: ``locality_body`` (4 for QEMU, 1 for tcti-swtpm), or
  :data:`LOCALITY_AS_READ`, which does what swtpm does for a socket that
  serves both (QEMU and swtpm_ioctl, which sends 1 byte): the body is 4
  bytes if 4 are already buffered and the last 3 are zero padding, else 1.
  That relies on what every client does: wait for the answer before the
  next request.
- With PTM_CAP_SEND_COMMAND_HEADER (swtpm's tpmlib.c) a data-channel command
  may carry the TCG prefix of tcti-mssim's TPM_SEND_COMMAND: u32 8, u8
  locality, u32 size; it is recognised by a first u16 that is not a TPM 2.0
  command tag (0x8001/0x8002). The answer then has a u32 size before and a
  u32 0 after the response, and the locality stays set for the next commands.

The data channel carries raw TPM commands and responses (no prefix); a
:class:`CommandFramer` cuts commands out of the byte stream by their header.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from sgxvtpm.errors import LocalProtocolError, RemoteProtocolError
from sgxvtpm.tpm.constants import HEADER_SIZE, LIBTPMS_MAX_BUFFER, TPM2_RC, BitFlags
from sgxvtpm.wire._buffered import BufferedDecoder, RequestDecoder

#: Largest state blob or hash chunk accepted in one request.
MAX_BLOB = 4 * 1024 * 1024
#: PTM_GETINFO_SIZE: the most JSON one GET_INFO response carries.
GETINFO_CHUNK = 3 * 1024

_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class CtrlProtocolError(RemoteProtocolError, ValueError):
    """The peer sent bytes that are not a valid control (or data) message.

    The stream cannot be resynchronised: answer if the message type allows,
    then close the connection. ``rc`` is the TPM response code to answer a
    data-channel framing error with.
    """

    def __init__(self, message: str, rc: int = TPM2_RC.COMMAND_SIZE) -> None:
        super().__init__(message)
        self.rc = rc


class CtrlUsageError(LocalProtocolError, ValueError):
    """This side asked for an invalid message or misused a codec object.
    Nothing was sent; fix the caller."""


class CtrlCmd(enum.IntEnum):
    """Control commands (tpm_ioctl.h, enum CMD_*)."""

    GET_CAPABILITY = 1
    INIT = 2
    SHUTDOWN = 3
    GET_TPMESTABLISHED = 4
    SET_LOCALITY = 5
    HASH_START = 6
    HASH_DATA = 7
    HASH_END = 8
    CANCEL_TPM_CMD = 9
    STORE_VOLATILE = 10
    RESET_TPMESTABLISHED = 11
    GET_STATEBLOB = 12
    SET_STATEBLOB = 13
    STOP = 14
    GET_CONFIG = 15
    SET_DATAFD = 16
    SET_BUFFERSIZE = 17
    GET_INFO = 18
    LOCK_STORAGE = 19


class PtmCap(BitFlags):
    """PTM_CAP_* bits of the GET_CAPABILITY answer (tpm_ioctl.h)."""

    INIT = 0
    SHUTDOWN = 1
    GET_TPMESTABLISHED = 2
    SET_LOCALITY = 3
    HASHING = 4
    CANCEL_TPM_CMD = 5
    STORE_VOLATILE = 6
    RESET_TPMESTABLISHED = 7
    GET_STATEBLOB = 8
    SET_STATEBLOB = 9
    STOP = 10
    GET_CONFIG = 11
    SET_DATAFD = 12
    SET_BUFFERSIZE = 13
    GET_INFO = 14
    SEND_COMMAND_HEADER = 15
    LOCK_STORAGE = 16


PTM_INIT_FLAG_DELETE_VOLATILE = 1
PTM_STATE_FLAG_DECRYPTED = 1
PTM_STATE_FLAG_ENCRYPTED = 2
#: TPM_RESULT codes of the pre-checks that swtpm answers with a bare result.
_SHORT_ERROR_RESULTS = frozenset({0x03, 0x0A})  # TPM_BAD_PARAMETER, TPM_BAD_ORDINAL

# Request body sizes that do not depend on the body (codes 7 and 13 do).
_FIXED_BODY: dict[int, int] = {
    CtrlCmd.GET_CAPABILITY: 0,
    CtrlCmd.INIT: 4,
    CtrlCmd.SHUTDOWN: 0,
    CtrlCmd.GET_TPMESTABLISHED: 0,
    CtrlCmd.SET_LOCALITY: 1,  # see locality_body
    CtrlCmd.HASH_START: 0,
    CtrlCmd.HASH_END: 0,
    CtrlCmd.CANCEL_TPM_CMD: 0,
    CtrlCmd.STORE_VOLATILE: 0,
    CtrlCmd.RESET_TPMESTABLISHED: 1,  # see locality_body
    CtrlCmd.GET_STATEBLOB: 12,
    CtrlCmd.STOP: 0,
    CtrlCmd.GET_CONFIG: 0,
    CtrlCmd.SET_DATAFD: 0,
    CtrlCmd.SET_BUFFERSIZE: 4,
    CtrlCmd.GET_INFO: 16,
    CtrlCmd.LOCK_STORAGE: 4,
}
_VARIABLE_HEADER: dict[int, int] = {CtrlCmd.HASH_DATA: 4, CtrlCmd.SET_STATEBLOB: 12}
_LOCALITY_CODES = frozenset({CtrlCmd.SET_LOCALITY, CtrlCmd.RESET_TPMESTABLISHED})
#: QEMU's body size for the locality commands: sizeof(ptm_loc) = sizeof(ptm_reset_est).
QEMU_LOCALITY_BODY = 4
#: ``locality_body`` for "1 or 4 bytes, as buffered" (see the module docstring).
LOCALITY_AS_READ = 0
_LOCALITY_BODIES = (LOCALITY_AS_READ, 1, QEMU_LOCALITY_BODY)


@dataclass(frozen=True)
class CtrlRequest:
    """One control request; fields not used by ``code`` stay 0/empty.

    ``flags``: INIT init_flags, GET/SET_STATEBLOB state_flags, GET_INFO flags;
    ``locality``: SET_LOCALITY, RESET_TPMESTABLISHED; ``blob_type`` and
    ``offset``: GET/SET_STATEBLOB (offset also GET_INFO); ``size``:
    SET_BUFFERSIZE; ``retries``: LOCK_STORAGE; ``data``: HASH_DATA, SET_STATEBLOB.
    An unknown ``code`` decodes with an empty body (swtpm answers TPM_BAD_ORDINAL).
    """

    code: int
    flags: int = 0
    locality: int = 0
    blob_type: int = 0
    offset: int = 0
    size: int = 0
    retries: int = 0
    data: bytes = b""


@dataclass(frozen=True)
class CtrlResponse:
    """One control response (the fields ``code`` uses; see the module docstring)."""

    code: int
    result: int = 0
    caps: int = 0
    established: bool = False
    flags: int = 0
    totlength: int = 0
    data: bytes = b""
    sizes: tuple[int, int, int] = field(default=(0, 0, 0))


# ------------------------------------------------------------------ requests


def encode_request(request: CtrlRequest, locality_body: int = 1) -> bytes:
    """Bytes for ``request`` (a client's side); CtrlUsageError if out of range.

    ``locality_body`` pads SET_LOCALITY/RESET_TPMESTABLISHED: 1 as tcti-swtpm
    sends them, 4 as QEMU does.
    """
    code = request.code
    head = _U32.pack(code)
    if locality_body not in (1, QEMU_LOCALITY_BODY):
        raise CtrlUsageError(f"locality_body must be 1 or 4, got {locality_body}")
    try:
        if code == CtrlCmd.INIT:
            return head + _U32.pack(request.flags)
        if code in _LOCALITY_CODES:
            return head + _U8.pack(request.locality) + bytes(locality_body - 1)
        if code == CtrlCmd.HASH_DATA:
            return head + _U32.pack(len(request.data)) + request.data
        if code == CtrlCmd.GET_STATEBLOB:
            return head + struct.pack(">III", request.flags, request.blob_type, request.offset)
        if code == CtrlCmd.SET_STATEBLOB:
            return head + struct.pack(
                ">III", request.flags, request.blob_type, len(request.data)
            ) + request.data
        if code == CtrlCmd.SET_BUFFERSIZE:
            return head + _U32.pack(request.size)
        if code == CtrlCmd.GET_INFO:
            return head + struct.pack(">QII", request.flags, request.offset, 0)
        if code == CtrlCmd.LOCK_STORAGE:
            return head + _U32.pack(request.retries)
    except struct.error as exc:
        raise CtrlUsageError(f"control request {code}: {exc}") from None
    return head


def _parse_request(code: int, body: bytes) -> CtrlRequest:
    if code == CtrlCmd.INIT:
        return CtrlRequest(code, flags=_U32.unpack(body)[0])
    if code in (CtrlCmd.SET_LOCALITY, CtrlCmd.RESET_TPMESTABLISHED):
        return CtrlRequest(code, locality=body[0])
    if code == CtrlCmd.HASH_DATA:
        return CtrlRequest(code, data=body[4:])
    if code == CtrlCmd.GET_STATEBLOB:
        flags, blob_type, offset = struct.unpack(">III", body)
        return CtrlRequest(code, flags=flags, blob_type=blob_type, offset=offset)
    if code == CtrlCmd.SET_STATEBLOB:
        flags, blob_type, _length = struct.unpack_from(">III", body)
        return CtrlRequest(code, flags=flags, blob_type=blob_type, data=body[12:])
    if code == CtrlCmd.SET_BUFFERSIZE:
        return CtrlRequest(code, size=_U32.unpack(body)[0])
    if code == CtrlCmd.GET_INFO:
        flags, offset, _pad = struct.unpack(">QII", body)
        return CtrlRequest(code, flags=flags, offset=offset)
    if code == CtrlCmd.LOCK_STORAGE:
        return CtrlRequest(code, retries=_U32.unpack(body)[0])
    return CtrlRequest(code)


class _Buffered(BufferedDecoder):
    """Byte buffer with EOF and a sticky error, shared by the decoders."""

    usage_error = CtrlUsageError
    protocol_error = CtrlProtocolError


class CtrlRequestDecoder(_Buffered, RequestDecoder[CtrlRequest]):
    """Server side: control bytes in, :class:`CtrlRequest` out.

    ``locality_body``: 4 for QEMU (the default), 1 for tcti-swtpm,
    LOCALITY_AS_READ for both (see the module docstring).
    """

    def __init__(self, max_blob: int = MAX_BLOB, locality_body: int = QEMU_LOCALITY_BODY) -> None:
        super().__init__()
        if locality_body not in _LOCALITY_BODIES:
            raise CtrlUsageError(f"locality_body must be 0, 1 or 4, got {locality_body}")
        self.max_blob = max_blob
        self.locality_body = locality_body

    def _request(self, code: int) -> CtrlRequest | None:
        if code in _VARIABLE_HEADER:
            fixed = _VARIABLE_HEADER[code]
            if not self._need(4 + fixed):
                return None
            length = _U32.unpack_from(self._buf, 4 + fixed - 4)[0]
            if length > self.max_blob:
                raise self._fail(f"control command {code} announces {length} bytes")
            body_size = fixed + length
        elif code in _LOCALITY_CODES:
            body_size = self._locality_size()
            if not body_size:
                return None
        else:
            body_size = _FIXED_BODY.get(code, 0)
        if not self._need(4 + body_size):
            return None
        message = self._take(4 + body_size)
        return _parse_request(code, message[4:])

    def _locality_size(self) -> int:
        """The locality body's size; 0 until it can be told."""
        if self.locality_body != LOCALITY_AS_READ:
            return self.locality_body
        if not self._need(5):
            return 0
        full = 4 + QEMU_LOCALITY_BODY
        if len(self._buf) >= full and not any(self._buf[5:full]):
            return QEMU_LOCALITY_BODY
        return 1


# ------------------------------------------------------------------ responses


_SUCCESS_SIZE: dict[int, int] = {
    CtrlCmd.GET_CAPABILITY: 8,
    CtrlCmd.GET_TPMESTABLISHED: 8,
    CtrlCmd.GET_STATEBLOB: 16,
    CtrlCmd.GET_CONFIG: 8,
    CtrlCmd.SET_BUFFERSIZE: 16,
    CtrlCmd.GET_INFO: 12,
}


def _success_size(code: int) -> int | None:
    """Size of a response to ``code`` before any variable data; None: result only."""
    return _SUCCESS_SIZE.get(code)


def encode_response(response: CtrlResponse, short_errors: bool = False) -> bytes:
    """Bytes for ``response`` (a server's side).

    With ``short_errors=False`` an error still has the success response's
    fixed size (zeros after the result), which is what QEMU reads.
    """
    code, res = response.code, response.result
    if code == CtrlCmd.GET_CAPABILITY:
        return _U64.pack(response.caps)
    # GET_INFO errors are a bare result in swtpm whatever the cause (QEMU never asks).
    if res and (short_errors or _success_size(code) is None or code == CtrlCmd.GET_INFO):
        return _U32.pack(res)
    if code == CtrlCmd.GET_TPMESTABLISHED:
        return struct.pack(">IB3x", res, 1 if response.established else 0)
    if code == CtrlCmd.GET_STATEBLOB:
        data = response.data if res == 0 else b""
        return struct.pack(">IIII", res, response.flags, len(data), len(data)) + data
    if code == CtrlCmd.GET_CONFIG:
        return struct.pack(">II", res, response.flags)
    if code == CtrlCmd.SET_BUFFERSIZE:
        return struct.pack(">IIII", res, *response.sizes)
    if code == CtrlCmd.GET_INFO:
        data = response.data if res == 0 else b""
        return struct.pack(">III", res, response.totlength, len(data)) + data
    return _U32.pack(res)


class CtrlResponseDecoder(_Buffered):
    """Client side: the response to one request of ``code``.

    ``short_errors=True`` follows swtpm 0.7.1, which answers its pre-checks
    (TPM_BAD_PARAMETER, TPM_BAD_ORDINAL) with a bare result.
    """

    def __init__(self, code: int, short_errors: bool = True, max_blob: int = MAX_BLOB) -> None:
        super().__init__()
        self.code = code
        self.short_errors = short_errors
        self.max_blob = max_blob

    def next_response(self) -> CtrlResponse | None:
        self._check()
        code = self.code
        if code == CtrlCmd.GET_CAPABILITY:
            if not self._need(8):
                return None
            return CtrlResponse(code, caps=_U64.unpack(self._take(8))[0])
        if not self._need(4):
            return None
        res = _U32.unpack_from(self._buf)[0]
        size = _success_size(code)
        if size is None or (res and code == CtrlCmd.GET_INFO):
            return CtrlResponse(code, result=_U32.unpack(self._take(4))[0])
        if res and self.short_errors and res in _SHORT_ERROR_RESULTS:
            return CtrlResponse(code, result=_U32.unpack(self._take(4))[0])
        if not self._need(size):
            return None
        if code in (CtrlCmd.GET_STATEBLOB, CtrlCmd.GET_INFO):
            return self._variable(code, res, size)
        body = self._take(size)
        if code == CtrlCmd.GET_TPMESTABLISHED:
            return CtrlResponse(code, result=res, established=bool(body[4] & 1))
        if code == CtrlCmd.GET_CONFIG:
            return CtrlResponse(code, result=res, flags=_U32.unpack_from(body, 4)[0])
        sizes = struct.unpack_from(">III", body, 4)
        return CtrlResponse(code, result=res, sizes=(sizes[0], sizes[1], sizes[2]))

    def _variable(self, code: int, res: int, size: int) -> CtrlResponse | None:
        if code == CtrlCmd.GET_STATEBLOB:
            _, flags, total, length = struct.unpack_from(">IIII", self._buf)
        else:
            _, total, length = struct.unpack_from(">III", self._buf)
            flags = 0
        if res:
            length = 0
        if length > self.max_blob:
            raise self._fail(f"response announces {length} bytes")
        if not self._need(size + length):
            return None
        data = self._take(size + length)[size:]
        return CtrlResponse(code, result=res, flags=flags, totlength=total, data=data)


# ------------------------------------------------------------------ data channel


#: TPM_SEND_COMMAND, the ``cmd`` of the TCG command prefix (SEND_COMMAND_HEADER).
SEND_COMMAND = 8
_PREFIX = struct.Struct(">IBI")
_TPM2_TAGS = (b"\x80\x01", b"\x80\x02")


@dataclass(frozen=True)
class DataCommand:
    """One data-channel command; ``locality`` is the TCG prefix's (None: no prefix)."""

    command: bytes
    locality: int | None = None

    def frame_response(self, response: bytes) -> bytes:
        """The response as the client expects it: with the prefix's size and
        trailing u32 0 if the command had the prefix."""
        if self.locality is None:
            return response
        return _U32.pack(len(response)) + response + bytes(4)


class CommandFramer(_Buffered):
    """Cuts raw TPM commands (or responses) out of a data-channel byte stream.

    Part 1, 18.2: the header's u32 ``commandSize`` counts the whole message.
    A size below the header or above ``max_size`` cannot be framed: the
    framer raises CtrlProtocolError (rc TPM_RC_COMMAND_SIZE) and stays broken;
    answer that error response and close.
    """

    def __init__(self, max_size: int = LIBTPMS_MAX_BUFFER) -> None:
        super().__init__()
        self.max_size = max_size

    def next_command(self) -> bytes | None:
        self._check()
        if not self._need(HEADER_SIZE):
            return None
        size = _U32.unpack_from(self._buf, 2)[0]
        if not HEADER_SIZE <= size <= self.max_size:
            raise self._fail(f"TPM size field {size} outside {HEADER_SIZE}..{self.max_size}")
        if not self._need(size):
            return None
        return self._take(size)

    def next_data_command(self) -> DataCommand | None:
        """Like :meth:`next_command`, also taking commands with the TCG prefix
        (see the module docstring); the prefix's size must be the command's."""
        self._check()
        if not self._need(2):
            return None
        if bytes(self._buf[:2]) in _TPM2_TAGS:
            command = self.next_command()
            return None if command is None else DataCommand(command)
        if not self._need(_PREFIX.size):
            return None
        cmd, locality, size = _PREFIX.unpack_from(self._buf)
        if cmd != SEND_COMMAND:
            return None if (command := self.next_command()) is None else DataCommand(command)
        if not HEADER_SIZE <= size <= self.max_size:
            raise self._fail(f"TCG prefix announces {size} bytes, outside "
                             f"{HEADER_SIZE}..{self.max_size}")
        if not self._need(_PREFIX.size + size):
            return None
        command = self._take(_PREFIX.size + size)[_PREFIX.size:]
        if _U32.unpack_from(command, 2)[0] != size:
            raise self._fail("TCG prefix size differs from the command's size field")
        return DataCommand(command, locality)
