"""The vTPM request protocol spoken inside K2 (sans-IO).

K2 delivers whole messages, so each message is exactly one request (endpoint
to instance enclave) or one response (back). All integers are big-endian.

Request::

    u8 op | u8 locality | u16 reserved (0) | op-specific payload

Response::

    u32 result | payload

``result`` uses the TPM 1.2 TPM_RESULT codes that swtpm's control channel
uses (tpm_error.h): 0 success, TPM_BAD_PARAMETER 3, TPM_FAIL 9,
TPM_BAD_ORDINAL 10 (also "not allowed in this state", as swtpm answers),
TPM_RESOURCES 0x15 (here: the VM already has a connected endpoint, see
ATTACH), TPM_IOERROR 31, TPM_BAD_LOCALITY 0x3d, TPM_RETRY 0x800. A TPM 2.0 error is
not a transport error: a TPM_COMMAND whose command failed has result 0 and
the TPM's error response as payload.

Payloads, by op:

============== =============================== ================================
op             request payload                 response payload (result 0)
============== =============================== ================================
TPM_COMMAND    the raw TPM command             the raw TPM response
INIT           u32 flags (1: delete volatile,  -
               0x80000000: only if stopped)
SHUTDOWN       -                               -
STOP           -                               -
GET_ESTABLISHED -                              u8 flag
RESET_ESTABLISHED - (uses the header locality) -
SET_BUFFERSIZE u32 size (0: query)             u32 size, u32 min, u32 max
GET_STATEBLOB  u32 type (1/2/3)                blob (opaque, may be empty)
SET_STATEBLOB  u32 type, blob                  -
CANCEL         -                               -
STORE_VOLATILE -                               -
GET_INFO       u64 flags                       UTF-8 JSON
ATTACH         u32 flags (1: takeover),        - (refused: TPM_RESOURCES and
               UTF-8 JSON about the endpoint   UTF-8 JSON about the holder)
               [NUL, resume log]
HASH_START     - (uses the header locality)    -
HASH_DATA      data (header locality)          -
HASH_END       - (uses the header locality)    -
============== =============================== ================================

HASH_START/DATA/END are swtpm's CMD_HASH_*: the TPM's _TPM_Hash_Start,
_TPM_Hash_Data and _TPM_Hash_End indications (TPM 2.0 Part 1, 34.3: the
DRTM sequence, at locality 4), which extend PCR 17.

ATTACH is answered by the instance enclave, not by the TPM: a VM's TPM has
one endpoint at a time (as swtpm has one process per state), so a K2
session must attach before any other request, and is refused while another
live session holds the VM unless it asks for a takeover, which ends that
session. INIT with INIT_FLAG_IF_STOPPED powers the TPM on only if it is not
running: an endpoint that starts must not reset a TPM a VM is using.

Responses do not name their op, so :func:`decode_response` returns the raw
payload and the typed accessors (:meth:`VtpmResponse.buffer_sizes`, ...) parse
it for the op the caller sent.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from sgxvtpm.errors import LocalProtocolError, RemoteProtocolError
from sgxvtpm.wire._codes import member

MAX_LOCALITY = 4
#: Upper bound for one message: state blobs of a TPM with full NV are a few
#: hundred KiB at most; anything larger is refused before it is buffered.
MAX_MESSAGE = 4 * 1024 * 1024
REQUEST_HEADER_SIZE = 4
RESPONSE_HEADER_SIZE = 4

_REQ_HEADER = struct.Struct(">BBH")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_SIZES = struct.Struct(">III")


class VtpmProtocolError(RemoteProtocolError, ValueError):
    """The peer sent a message that is not a valid vTPM request or response.

    The message is dropped; answer a request with TPM_BAD_PARAMETER (see
    :func:`decode_request`) or end the session for a bad response.
    """


class VtpmUsageError(LocalProtocolError, ValueError):
    """This side tried to build an invalid message. Nothing was sent; fix the caller."""


class VtpmOp(enum.IntEnum):
    """Request operations; each mirrors a swtpm control command (tpm_ioctl.h)."""

    TPM_COMMAND = 1
    INIT = 2
    SHUTDOWN = 3
    STOP = 4
    GET_ESTABLISHED = 5
    RESET_ESTABLISHED = 6
    SET_BUFFERSIZE = 7
    GET_STATEBLOB = 8
    SET_STATEBLOB = 9
    CANCEL = 10
    STORE_VOLATILE = 11
    GET_INFO = 12
    ATTACH = 13  # not a swtpm command: claims the VM's TPM for this session
    HASH_START = 14
    HASH_DATA = 15
    HASH_END = 16


class TpmResult(enum.IntEnum):
    """TPM 1.2 TPM_RESULT codes used as transport results (TPM 1.2 Part 2, 16)."""

    SUCCESS = 0x00
    BAD_PARAMETER = 0x03
    FAIL = 0x09
    BAD_ORDINAL = 0x0A
    RESOURCES = 0x15
    SIZE = 0x17
    IOERROR = 0x1F
    BAD_LOCALITY = 0x3D
    RETRY = 0x800


class BlobType(enum.IntEnum):
    """swtpm's PTM_BLOB_TYPE_* (the same numbers as the engine's StateType)."""

    PERMANENT = 1
    VOLATILE = 2
    SAVESTATE = 3


INIT_FLAG_DELETE_VOLATILE = 1
#: Not a swtpm flag (swtpm defines only bit 0): INIT leaves a running TPM alone.
INIT_FLAG_IF_STOPPED = 0x80000000
#: ATTACH: end the session that holds the VM's TPM and take it.
ATTACH_FLAG_TAKEOVER = 1
#: Upper bound of ATTACH's description of the endpoint (JSON, only informative but
#: for its resume token), and of the unrecorded requests that may follow it
#: (sgxvtpm/wire/resume.py).
MAX_ATTACH_INFO = 1024
MAX_RESUME_LOG = 16 * 1024


def _attach_info_fits(info: bytes) -> bool:
    """At most MAX_ATTACH_INFO bytes up to the first NUL, MAX_RESUME_LOG after it."""
    nul = info.find(b"\0", 0, MAX_ATTACH_INFO + 1)
    if nul < 0:
        return len(info) <= MAX_ATTACH_INFO
    return len(info) - nul - 1 <= MAX_RESUME_LOG

# What follows the 4-byte header, per op: a fixed size, or None for "rest".
_FIXED_PAYLOAD: dict[VtpmOp, int | None] = {
    VtpmOp.TPM_COMMAND: None,
    VtpmOp.INIT: 4,
    VtpmOp.SHUTDOWN: 0,
    VtpmOp.STOP: 0,
    VtpmOp.GET_ESTABLISHED: 0,
    VtpmOp.RESET_ESTABLISHED: 0,
    VtpmOp.SET_BUFFERSIZE: 4,
    VtpmOp.GET_STATEBLOB: 4,
    VtpmOp.SET_STATEBLOB: None,
    VtpmOp.CANCEL: 0,
    VtpmOp.STORE_VOLATILE: 0,
    VtpmOp.GET_INFO: 8,
    VtpmOp.ATTACH: None,
    VtpmOp.HASH_START: 0,
    VtpmOp.HASH_DATA: None,
    VtpmOp.HASH_END: 0,
}


@dataclass(frozen=True)
class VtpmRequest:
    """One request. Only the fields of ``op`` are meaningful; others stay default.

    - ``flags``: INIT and ATTACH flags (u32) or GET_INFO flags (u64);
    - ``size``: SET_BUFFERSIZE;
    - ``blob_type``: GET/SET_STATEBLOB;
    - ``data``: the TPM command (TPM_COMMAND), the blob (SET_STATEBLOB),
      the endpoint's description (ATTACH) or the bytes to hash (HASH_DATA).
    """

    op: VtpmOp
    locality: int = 0
    flags: int = 0
    size: int = 0
    blob_type: int = 0
    data: bytes = b""

    # Convenience constructors, one per op that has arguments.
    @classmethod
    def tpm_command(cls, command: bytes, locality: int = 0) -> VtpmRequest:
        return cls(VtpmOp.TPM_COMMAND, locality=locality, data=bytes(command))

    @classmethod
    def init(cls, flags: int = 0) -> VtpmRequest:
        return cls(VtpmOp.INIT, flags=flags)

    @classmethod
    def reset_established(cls, locality: int) -> VtpmRequest:
        return cls(VtpmOp.RESET_ESTABLISHED, locality=locality)

    @classmethod
    def set_buffersize(cls, size: int) -> VtpmRequest:
        return cls(VtpmOp.SET_BUFFERSIZE, size=size)

    @classmethod
    def get_stateblob(cls, blob_type: int) -> VtpmRequest:
        return cls(VtpmOp.GET_STATEBLOB, blob_type=blob_type)

    @classmethod
    def set_stateblob(cls, blob_type: int, data: bytes) -> VtpmRequest:
        return cls(VtpmOp.SET_STATEBLOB, blob_type=blob_type, data=bytes(data))

    @classmethod
    def get_info(cls, flags: int) -> VtpmRequest:
        return cls(VtpmOp.GET_INFO, flags=flags)

    @classmethod
    def attach(cls, flags: int = 0, info: bytes = b"") -> VtpmRequest:
        return cls(VtpmOp.ATTACH, flags=flags, data=bytes(info))

    @classmethod
    def hash_data(cls, data: bytes, locality: int = 0) -> VtpmRequest:
        return cls(VtpmOp.HASH_DATA, locality=locality, data=bytes(data))


@dataclass(frozen=True)
class VtpmResponse:
    """One response: a TPM_RESULT and the op's payload (see the module table)."""

    result: int
    payload: bytes = b""

    @classmethod
    def ok(cls, payload: bytes = b"") -> VtpmResponse:
        return cls(TpmResult.SUCCESS, bytes(payload))

    @classmethod
    def error(cls, result: int) -> VtpmResponse:
        return cls(result)

    @property
    def success(self) -> bool:
        return self.result == TpmResult.SUCCESS

    # Typed views of the payload; each raises VtpmProtocolError if malformed.
    def established(self) -> bool:
        """GET_ESTABLISHED: the TPM_ESTABLISHED flag."""
        if len(self.payload) != 1:
            raise VtpmProtocolError(f"GET_ESTABLISHED payload of {len(self.payload)} bytes")
        return self.payload[0] != 0

    def buffer_sizes(self) -> tuple[int, int, int]:
        """SET_BUFFERSIZE: (size in use, minimum, maximum)."""
        if len(self.payload) != _SIZES.size:
            raise VtpmProtocolError(f"SET_BUFFERSIZE payload of {len(self.payload)} bytes")
        size, lo, hi = _SIZES.unpack(self.payload)
        return size, lo, hi

    def info(self) -> str:
        """GET_INFO: the JSON text."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError:
            raise VtpmProtocolError("GET_INFO payload is not UTF-8") from None

    @staticmethod
    def for_established(flag: bool) -> VtpmResponse:
        return VtpmResponse.ok(b"\x01" if flag else b"\x00")

    @staticmethod
    def for_buffer_sizes(size: int, lo: int, hi: int) -> VtpmResponse:
        return VtpmResponse.ok(_SIZES.pack(size, lo, hi))


# ------------------------------------------------------------------ requests


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise VtpmUsageError(f"{name} must fit in u32, got {value}")


def encode_request(request: VtpmRequest) -> bytes:
    """The message for ``request``; VtpmUsageError if a field is out of range."""
    op = member(VtpmOp, request.op, VtpmUsageError, "op")
    if not 0 <= request.locality <= MAX_LOCALITY:
        raise VtpmUsageError(f"locality must be 0..{MAX_LOCALITY}, got {request.locality}")
    head = _REQ_HEADER.pack(op, request.locality, 0)
    body: bytes
    if op in (VtpmOp.TPM_COMMAND, VtpmOp.HASH_DATA):
        body = bytes(request.data)
    elif op is VtpmOp.INIT:
        _check_u32("INIT flags", request.flags)
        body = _U32.pack(request.flags)
    elif op is VtpmOp.SET_BUFFERSIZE:
        _check_u32("buffer size", request.size)
        body = _U32.pack(request.size)
    elif op is VtpmOp.GET_STATEBLOB:
        _check_u32("blob type", request.blob_type)
        body = _U32.pack(request.blob_type)
    elif op is VtpmOp.SET_STATEBLOB:
        _check_u32("blob type", request.blob_type)
        body = _U32.pack(request.blob_type) + bytes(request.data)
    elif op is VtpmOp.GET_INFO:
        if not 0 <= request.flags <= 0xFFFFFFFFFFFFFFFF:
            raise VtpmUsageError(f"GET_INFO flags must fit in u64, got {request.flags}")
        body = _U64.pack(request.flags)
    elif op is VtpmOp.ATTACH:
        _check_u32("ATTACH flags", request.flags)
        if not _attach_info_fits(request.data):
            raise VtpmUsageError(f"ATTACH info of {len(request.data)} bytes exceeds "
                                 f"{MAX_ATTACH_INFO} (+ a resume log of {MAX_RESUME_LOG})")
        body = _U32.pack(request.flags) + bytes(request.data)
    else:
        body = b""
    if len(head) + len(body) > MAX_MESSAGE:
        raise VtpmUsageError(f"request of {len(head) + len(body)} bytes exceeds {MAX_MESSAGE}")
    return head + body


def _sized(message: bytes, what: str, header_size: int, header: str) -> bytes:
    """``message`` as bytes, if it is at most MAX_MESSAGE and has its header."""
    message = bytes(message)
    if len(message) > MAX_MESSAGE:
        raise VtpmProtocolError(f"{what} of {len(message)} bytes exceeds {MAX_MESSAGE}")
    if len(message) < header_size:
        raise VtpmProtocolError(f"{what} of {len(message)} bytes has no {header}")
    return message


def decode_request(message: bytes) -> VtpmRequest:
    """Parse one request message; VtpmProtocolError if it is not one."""
    message = _sized(message, "request", REQUEST_HEADER_SIZE, "header")
    raw_op, locality, reserved = _REQ_HEADER.unpack_from(message)
    op = member(VtpmOp, raw_op, VtpmProtocolError, "op")
    if locality > MAX_LOCALITY:
        raise VtpmProtocolError(f"locality {locality} out of range")
    if reserved:
        raise VtpmProtocolError(f"reserved field is {reserved:#x}, not 0")
    body = message[REQUEST_HEADER_SIZE:]
    fixed = _FIXED_PAYLOAD[op]
    if fixed is not None and len(body) != fixed:
        raise VtpmProtocolError(f"{op.name} payload of {len(body)} bytes, expected {fixed}")
    if op in (VtpmOp.TPM_COMMAND, VtpmOp.HASH_DATA):
        return VtpmRequest(op, locality, data=body)
    if op is VtpmOp.INIT:
        return VtpmRequest(op, locality, flags=_U32.unpack(body)[0])
    if op is VtpmOp.SET_BUFFERSIZE:
        return VtpmRequest(op, locality, size=_U32.unpack(body)[0])
    if op is VtpmOp.GET_STATEBLOB:
        return VtpmRequest(op, locality, blob_type=_U32.unpack(body)[0])
    if op is VtpmOp.SET_STATEBLOB:
        if len(body) < 4:
            raise VtpmProtocolError("SET_STATEBLOB payload has no blob type")
        return VtpmRequest(op, locality, blob_type=_U32.unpack_from(body)[0], data=body[4:])
    if op is VtpmOp.GET_INFO:
        return VtpmRequest(op, locality, flags=_U64.unpack(body)[0])
    if op is VtpmOp.ATTACH:
        if len(body) < 4:
            raise VtpmProtocolError("ATTACH payload has no flags")
        if not _attach_info_fits(body[4:]):
            raise VtpmProtocolError(f"ATTACH info of {len(body) - 4} bytes exceeds "
                                    f"{MAX_ATTACH_INFO} (+ a resume log of {MAX_RESUME_LOG})")
        return VtpmRequest(op, locality, flags=_U32.unpack_from(body)[0], data=body[4:])
    return VtpmRequest(op, locality)


# ------------------------------------------------------- TPM commands, hot path
#
# Nearly every message is a TPM_COMMAND and its answer. These four functions
# give exactly the bytes (and accept exactly the messages) of the general
# codec for that case, without building request/response objects; a unit
# test holds them equal to it.

_TPM_COMMAND_HEADERS = tuple(
    _REQ_HEADER.pack(VtpmOp.TPM_COMMAND, locality, 0) for locality in range(MAX_LOCALITY + 1)
)
_SUCCESS = _U32.pack(TpmResult.SUCCESS)


def encode_tpm_command(command: bytes, locality: int = 0) -> bytes:
    """``encode_request(VtpmRequest.tpm_command(command, locality))``."""
    if not 0 <= locality <= MAX_LOCALITY:
        raise VtpmUsageError(f"locality must be 0..{MAX_LOCALITY}, got {locality}")
    if REQUEST_HEADER_SIZE + len(command) > MAX_MESSAGE:
        raise VtpmUsageError(
            f"request of {REQUEST_HEADER_SIZE + len(command)} bytes exceeds {MAX_MESSAGE}"
        )
    return _TPM_COMMAND_HEADERS[locality] + command


_TPM_COMMAND = int(VtpmOp.TPM_COMMAND)  # a module global: an Enum member lookup is ~0.1 µs


def tpm_command_of(message: bytes) -> tuple[bytes, int] | None:
    """(command, locality) if ``message`` is a valid TPM_COMMAND request, else None
    (then :func:`decode_request` tells what it is, or why it is invalid)."""
    if len(message) > MAX_MESSAGE or len(message) < REQUEST_HEADER_SIZE:
        return None
    locality = message[1]
    if message[0] != _TPM_COMMAND or locality > MAX_LOCALITY or message[2] or message[3]:
        return None
    return bytes(message[REQUEST_HEADER_SIZE:]), locality


def encode_tpm_response(response: bytes) -> bytes:
    """``encode_response(VtpmResponse.ok(response))``."""
    if RESPONSE_HEADER_SIZE + len(response) > MAX_MESSAGE:
        raise VtpmUsageError(
            f"response of {RESPONSE_HEADER_SIZE + len(response)} bytes exceeds {MAX_MESSAGE}"
        )
    return _SUCCESS + response


#: The result words of a TPM_COMMAND answer the instance did not record
#: (sgxvtpm/enclaves/resume.py): UNRECORDED, the command left the TPM's
#: VOLATILE state as it was; KEEP, a resume runs the request again, so the
#: endpoint keeps it (sgxvtpm/wire/resume.py). Only an endpoint's K2 client
#: sees them (:func:`recorded_of`); never a TPM_RESULT.
UNRECORDED = 0x8000_0000
KEEP = 0x8000_0001
_UNRECORDED = _U32.pack(UNRECORDED)
_KEEP = _U32.pack(KEEP)


def unrecorded(message: bytes, keep: bool = False) -> bytes:
    """The successful TPM_COMMAND answer ``message`` (:func:`encode_tpm_response`)
    marked as not recorded (``keep``: its request kept); any other message unchanged."""
    if message[:RESPONSE_HEADER_SIZE] != _SUCCESS:
        return message
    return (_KEEP if keep else _UNRECORDED) + message[RESPONSE_HEADER_SIZE:]


def recorded_of(message: bytes) -> tuple[bytes, bool, bool]:
    """(``message`` as :func:`encode_tpm_response` made it, whether the instance
    recorded its request, whether the endpoint keeps it): the inverse of
    :func:`unrecorded`."""
    head = message[:RESPONSE_HEADER_SIZE]
    if head == _UNRECORDED:
        return _SUCCESS + message[RESPONSE_HEADER_SIZE:], False, False
    if head == _KEEP:
        return _SUCCESS + message[RESPONSE_HEADER_SIZE:], False, True
    return message, True, False


def tpm_response_of(message: bytes) -> bytes | None:
    """The payload if ``message`` is a valid response with result 0, else None."""
    if len(message) > MAX_MESSAGE or message[:RESPONSE_HEADER_SIZE] != _SUCCESS:
        return None
    return bytes(message[RESPONSE_HEADER_SIZE:])


# ------------------------------------------------------------------ responses


def encode_response(response: VtpmResponse) -> bytes:
    """The message for ``response``; VtpmUsageError if it cannot be encoded."""
    _check_u32("result", response.result)
    size = RESPONSE_HEADER_SIZE + len(response.payload)
    if size > MAX_MESSAGE:
        raise VtpmUsageError(f"response of {size} bytes exceeds {MAX_MESSAGE}")
    return _U32.pack(response.result) + bytes(response.payload)


def decode_response(message: bytes) -> VtpmResponse:
    """Parse one response message; VtpmProtocolError if it is not one."""
    message = _sized(message, "response", RESPONSE_HEADER_SIZE, "result")
    (result,) = _U32.unpack_from(message)
    return VtpmResponse(result, message[RESPONSE_HEADER_SIZE:])
