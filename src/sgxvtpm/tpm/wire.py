"""TPM 2.0 command and response framing, a few builders and parsers.

Sans-IO: bytes in, values out. Layouts are from TPM 2.0 Library Part 1
(Architecture) section 18 (command/response structure) and Part 3 (Commands),
whose section numbers are cited at each builder. All integers are big-endian.

Errors:

* :class:`TpmProtocolError` - bytes that are not a well-formed TPM response
  (or header): the remote side misbehaved.
* :class:`TpmResponseError` - a well-formed response whose code is not
  TPM_RC_SUCCESS; ``rc`` holds the raw code.
* ``ValueError`` - a builder was called with arguments no TPM command can
  carry (local misuse).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sgxvtpm.errors import RemoteProtocolError, SgxvtpmError
from sgxvtpm.tpm.constants import (
    HEADER_SIZE,
    LIBTPMS_MAX_BUFFER,
    TPM2_ALG,
    TPM2_CC,
    TPM2_ECC_CURVE,
    TPM2_RC,
    TPM2_RH,
    TPM2_ST,
    TPM2_SU,
    TPMA_OBJECT,
    rc_name,
)

_HEADER = struct.Struct(">HII")
_DIGEST_SIZES: dict[int, int] = {
    TPM2_ALG.SHA1: 20,
    TPM2_ALG.SHA256: 32,
    TPM2_ALG.SHA384: 48,
    TPM2_ALG.SHA512: 64,
}
#: TPM_ST values libtpms 0.9.2's TPM_ST_Unmarshal accepts (measured over all
#: 65536 tags): a tag outside this set is TPM_RC_VALUE, a known tag that is not a
#: command tag is TPM_RC_BAD_TAG. It predates ATTEST_NV_DIGEST and FU_MANIFEST.
_KNOWN_TAGS = frozenset(
    {
        TPM2_ST.RSP_COMMAND,
        TPM2_ST.NULL,
        TPM2_ST.NO_SESSIONS,
        TPM2_ST.SESSIONS,
        *range(TPM2_ST.ATTEST_NV, TPM2_ST.ATTEST_CREATION + 1),
        *range(TPM2_ST.CREATION, TPM2_ST.AUTH_SIGNED + 1),
    }
)
_COMMAND_TAGS = frozenset({TPM2_ST.NO_SESSIONS, TPM2_ST.SESSIONS})
#: PCR_Read/creationPCR selections cover 24 PCRs (PC Client profile).
PCR_SELECT_SIZE = 3


class TpmProtocolError(RemoteProtocolError, ValueError):
    """Bytes that are not a well-formed TPM response.

    The peer (TPM or relay) sent a truncated or inconsistent message. Drop
    the connection or report a transport failure; do not retry the bytes.
    """


class TpmResponseError(SgxvtpmError):
    """A well-formed TPM response carrying an error code.

    ``rc`` is the raw response code; ``str()`` names it. TPM_RC_RETRY,
    TPM_RC_YIELDED and TPM_RC_TESTING mean "send the same command again".
    """

    def __init__(self, rc: int, command: int | None = None) -> None:
        self.rc = rc
        self.command = command
        where = "" if command is None else f" from {_cc_name(command)}"
        super().__init__(f"{rc_name(rc)} ({rc:#x}){where}")


def _cc_name(cc: int) -> str:
    try:
        return f"TPM2_CC_{TPM2_CC(cc).name}"
    except ValueError:
        return f"command {cc:#x}"


# ---------------------------------------------------------------- headers


@dataclass(frozen=True)
class Header:
    """A command or response header (Part 1, 18.2 and 18.3)."""

    tag: int
    size: int
    code: int  # command code (commands) or response code (responses)


def parse_header(data: bytes) -> Header:
    """The 10-byte header at the start of ``data``.

    Raises TpmProtocolError when fewer than 10 bytes are given.
    """
    if len(data) < HEADER_SIZE:
        raise TpmProtocolError(f"TPM header needs {HEADER_SIZE} bytes, got {len(data)}")
    tag, size, code = _HEADER.unpack_from(data)
    return Header(tag, size, code)


def build_header(tag: int, size: int, code: int) -> bytes:
    return _HEADER.pack(tag, size, code)


def error_response(rc: int) -> bytes:
    """The 10-byte response a TPM sends for an error: TPM_ST_NO_SESSIONS, no body.

    Part 1, 18.4: a response whose code is not TPM_RC_SUCCESS has no
    parameters. TPM_RC_BAD_TAG keeps the NO_SESSIONS tag, as libtpms does.
    """
    return _HEADER.pack(TPM2_ST.NO_SESSIONS, HEADER_SIZE, rc)


def response_code(response: bytes) -> int:
    """The response code of a complete response; TpmProtocolError if malformed."""
    header = parse_header(response)
    if header.size != len(response):
        raise TpmProtocolError(
            f"response size field {header.size} but {len(response)} bytes received"
        )
    return header.code


def validate_command(command: bytes, max_size: int = LIBTPMS_MAX_BUFFER) -> int | None:
    """The response code libtpms 0.9.2 gives a badly framed command, else None.

    Checks only framing, in the order ExecuteCommand() does (Part 4, 6.2),
    so a caller may answer early with :func:`error_response` and be
    indistinguishable from the TPM:

    1. tag: fewer than 2 bytes -> TPM_RC_INSUFFICIENT; an unknown TPM_ST ->
       TPM_RC_VALUE; a TPM_ST that is not a command tag -> TPM_RC_BAD_TAG;
    2. size: fewer than 6 bytes -> TPM_RC_INSUFFICIENT; size field not equal to
       the byte count, or above the TPM's buffer -> TPM_RC_COMMAND_SIZE;
    3. code: fewer than 10 bytes -> TPM_RC_INSUFFICIENT.

    Whether the command code is implemented is left to the TPM.
    """
    n = len(command)
    if n < 2:
        return TPM2_RC.INSUFFICIENT
    tag = (command[0] << 8) | command[1]
    if tag not in _KNOWN_TAGS:
        return TPM2_RC.VALUE
    if tag not in _COMMAND_TAGS:
        return TPM2_RC.BAD_TAG
    if n < 6:
        return TPM2_RC.INSUFFICIENT
    size = int.from_bytes(command[2:6], "big")
    if size != n or n > max_size:
        return TPM2_RC.COMMAND_SIZE
    if n < HEADER_SIZE:
        return TPM2_RC.INSUFFICIENT
    return None


# ---------------------------------------------------------------- marshalling


def u8(value: int) -> bytes:
    return struct.pack(">B", value)


def u16(value: int) -> bytes:
    return struct.pack(">H", value)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def tpm2b(data: bytes) -> bytes:
    """A TPM2B: u16 size, then the bytes (Part 2, 10.4)."""
    if len(data) > 0xFFFF:
        raise ValueError(f"TPM2B holds at most 65535 bytes, got {len(data)}")
    return u16(len(data)) + data


def password_session(auth: bytes = b"") -> bytes:
    """One TPMS_AUTH_COMMAND for TPM_RS_PW (Part 1, 19.6.8 / Part 2, 10.13.2).

    Empty nonce, continueSession clear, the authValue in clear as the HMAC.
    """
    return u32(TPM2_RH.PW) + tpm2b(b"") + u8(0) + tpm2b(auth)


def build_command(
    code: int,
    params: bytes = b"",
    handles: Sequence[int] = (),
    sessions: Sequence[bytes] | None = None,
) -> bytes:
    """A complete command (Part 1, 18.2).

    ``sessions=None`` gives TPM_ST_NO_SESSIONS; a sequence of marshalled
    TPMS_AUTH_COMMAND gives TPM_ST_SESSIONS with its authorizationSize.
    """
    body = b"".join(u32(h) for h in handles)
    tag = TPM2_ST.NO_SESSIONS
    if sessions is not None:
        tag = TPM2_ST.SESSIONS
        auth = b"".join(sessions)
        body += u32(len(auth)) + auth
    body += params
    return build_header(tag, HEADER_SIZE + len(body), code) + body


def _pw_command(code: int, params: bytes, handles: Sequence[int], auth: bytes = b"") -> bytes:
    return build_command(code, params, handles, [password_session(auth)])


# ---------------------------------------------------------------- builders


def startup(su: int = TPM2_SU.CLEAR) -> bytes:
    """TPM2_Startup (Part 3, 9.3)."""
    return build_command(TPM2_CC.Startup, u16(su))


def shutdown(su: int = TPM2_SU.CLEAR) -> bytes:
    """TPM2_Shutdown (Part 3, 9.4)."""
    return build_command(TPM2_CC.Shutdown, u16(su))


def get_random(count: int) -> bytes:
    """TPM2_GetRandom (Part 3, 16.1)."""
    return build_command(TPM2_CC.GetRandom, u16(count))


def stir_random(entropy: bytes) -> bytes:
    """TPM2_StirRandom (Part 3, 16.2): ``entropy`` (at most 128 bytes) into the DRBG."""
    return build_command(TPM2_CC.StirRandom, tpm2b(entropy))


def read_clock() -> bytes:
    """TPM2_ReadClock (Part 3, 29.1)."""
    return build_command(TPM2_CC.ReadClock)


def get_capability(capability: int, prop: int, count: int) -> bytes:
    """TPM2_GetCapability (Part 3, 30.2)."""
    return build_command(TPM2_CC.GetCapability, u32(capability) + u32(prop) + u32(count))


def pcr_extend(pcr: int, digest: bytes, alg: int = TPM2_ALG.SHA256, auth: bytes = b"") -> bytes:
    """TPM2_PCR_Extend of one bank (Part 3, 22.2), password session."""
    expected = _DIGEST_SIZES.get(alg)
    if expected is not None and len(digest) != expected:
        raise ValueError(f"{TPM2_ALG(alg).name} digest must be {expected} bytes")
    values = u32(1) + u16(alg) + digest  # TPML_DIGEST_VALUES with one TPMT_HA
    return _pw_command(TPM2_CC.PCR_Extend, values, [pcr], auth)


def pcr_selection(pcrs: Iterable[int], alg: int = TPM2_ALG.SHA256) -> bytes:
    """A TPML_PCR_SELECTION with one bank (Part 2, 10.9.7)."""
    bitmap = bytearray(PCR_SELECT_SIZE)
    for pcr in pcrs:
        if not 0 <= pcr < 8 * PCR_SELECT_SIZE:
            raise ValueError(f"PCR {pcr} out of range")
        bitmap[pcr // 8] |= 1 << (pcr % 8)
    return u32(1) + u16(alg) + u8(PCR_SELECT_SIZE) + bytes(bitmap)


def pcr_read(pcrs: Iterable[int], alg: int = TPM2_ALG.SHA256) -> bytes:
    """TPM2_PCR_Read (Part 3, 22.4)."""
    return build_command(TPM2_CC.PCR_Read, pcr_selection(pcrs, alg))


def nv_public(index: int, size: int, attributes: int, name_alg: int = TPM2_ALG.SHA256) -> bytes:
    """A TPM2B_NV_PUBLIC without policy (Part 2, 13.5 and 13.6)."""
    public = u32(index) + u16(name_alg) + u32(attributes) + tpm2b(b"") + u16(size)
    return tpm2b(public)


def nv_define_space(
    index: int,
    size: int,
    attributes: int,
    auth: bytes = b"",
    hierarchy: int = TPM2_RH.OWNER,
    hierarchy_auth: bytes = b"",
) -> bytes:
    """TPM2_NV_DefineSpace (Part 3, 31.3)."""
    params = tpm2b(auth) + nv_public(index, size, attributes)
    return _pw_command(TPM2_CC.NV_DefineSpace, params, [hierarchy], hierarchy_auth)


def nv_undefine_space(index: int, hierarchy: int = TPM2_RH.OWNER, auth: bytes = b"") -> bytes:
    """TPM2_NV_UndefineSpace (Part 3, 31.4)."""
    return _pw_command(TPM2_CC.NV_UndefineSpace, b"", [hierarchy, index], auth)


def _nv_command(
    code: int, params: bytes, index: int, auth_handle: int | None, auth: bytes
) -> bytes:
    """An NV command on ``index``, authorised by ``auth_handle`` (the owner unless told)."""
    handle = TPM2_RH.OWNER if auth_handle is None else auth_handle
    return _pw_command(code, params, [handle, index], auth)


def nv_write(
    index: int, data: bytes, offset: int = 0, auth_handle: int | None = None, auth: bytes = b""
) -> bytes:
    """TPM2_NV_Write (Part 3, 31.7); authorised by the owner unless told."""
    return _nv_command(TPM2_CC.NV_Write, tpm2b(data) + u16(offset), index, auth_handle, auth)


def nv_increment(index: int, auth_handle: int | None = None, auth: bytes = b"") -> bytes:
    """TPM2_NV_Increment (Part 3, 31.8); authorised by the owner unless told."""
    return _nv_command(TPM2_CC.NV_Increment, b"", index, auth_handle, auth)


def nv_read(
    index: int, size: int, offset: int = 0, auth_handle: int | None = None, auth: bytes = b""
) -> bytes:
    """TPM2_NV_Read (Part 3, 31.13); authorised by the owner unless told."""
    return _nv_command(TPM2_CC.NV_Read, u16(size) + u16(offset), index, auth_handle, auth)


def nv_read_public(index: int) -> bytes:
    """TPM2_NV_ReadPublic (Part 3, 31.6)."""
    return build_command(TPM2_CC.NV_ReadPublic, handles=[index])


# Templates (TPMT_PUBLIC, Part 2, 12.2.4). Storage keys: restricted decrypt,
# AES-128-CFB inner wrapper, as TCG's "Storage Primary Key" profile; signing
# keys: unrestricted sign, SHA-256 scheme. All fixedTPM/fixedParent, noDA.
_COMMON_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
)
STORAGE_ATTRS = _COMMON_ATTRS | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT
SIGNING_ATTRS = _COMMON_ATTRS | TPMA_OBJECT.SIGN_ENCRYPT
_AES128_CFB = u16(TPM2_ALG.AES) + u16(128) + u16(TPM2_ALG.CFB)
_SYM_NULL = u16(TPM2_ALG.NULL)


def _public(alg: int, attrs: int, params: bytes, unique: bytes) -> bytes:
    return u16(alg) + u16(TPM2_ALG.SHA256) + u32(attrs) + tpm2b(b"") + params + unique


def ecc_p256_template(signing: bool = False) -> bytes:
    """TPMT_PUBLIC for an ECC NIST P-256 primary (storage, or ECDSA-SHA256 signing)."""
    if signing:
        sym, scheme, attrs = _SYM_NULL, u16(TPM2_ALG.ECDSA) + u16(TPM2_ALG.SHA256), SIGNING_ATTRS
    else:
        sym, scheme, attrs = _AES128_CFB, u16(TPM2_ALG.NULL), STORAGE_ATTRS
    # TPMS_ECC_PARMS (12.2.3.6): symmetric, scheme, curveID, kdf
    params = sym + scheme + u16(TPM2_ECC_CURVE.NIST_P256) + u16(TPM2_ALG.NULL)
    return _public(TPM2_ALG.ECC, attrs, params, tpm2b(b"") + tpm2b(b""))


def rsa2048_template(signing: bool = False) -> bytes:
    """TPMT_PUBLIC for an RSA-2048 primary (storage, or RSASSA-SHA256 signing)."""
    if signing:
        sym, scheme, attrs = _SYM_NULL, u16(TPM2_ALG.RSASSA) + u16(TPM2_ALG.SHA256), SIGNING_ATTRS
    else:
        sym, scheme, attrs = _AES128_CFB, u16(TPM2_ALG.NULL), STORAGE_ATTRS
    # TPMS_RSA_PARMS (12.2.3.5): symmetric, scheme, keyBits, exponent (0 = 65537)
    params = sym + scheme + u16(2048) + u32(0)
    return _public(TPM2_ALG.RSA, attrs, params, tpm2b(b""))


def create_primary(
    template: bytes,
    hierarchy: int = TPM2_RH.OWNER,
    user_auth: bytes = b"",
    hierarchy_auth: bytes = b"",
) -> bytes:
    """TPM2_CreatePrimary (Part 3, 24.1) with no outsideInfo or creation PCRs."""
    sensitive = tpm2b(tpm2b(user_auth) + tpm2b(b""))  # TPM2B_SENSITIVE_CREATE
    params = sensitive + tpm2b(template) + tpm2b(b"") + u32(0)
    return _pw_command(TPM2_CC.CreatePrimary, params, [hierarchy], hierarchy_auth)


def evict_control(
    object_handle: int,
    persistent_handle: int,
    auth_handle: int = TPM2_RH.OWNER,
    auth: bytes = b"",
) -> bytes:
    """TPM2_EvictControl (Part 3, 28.5): persist (or evict) an object."""
    return _pw_command(
        TPM2_CC.EvictControl, u32(persistent_handle), [auth_handle, object_handle], auth
    )


def flush_context(handle: int) -> bytes:
    """TPM2_FlushContext (Part 3, 28.4); the handle is a parameter, not a handle."""
    return build_command(TPM2_CC.FlushContext, u32(handle))


def read_public(handle: int) -> bytes:
    """TPM2_ReadPublic (Part 3, 12.4)."""
    return build_command(TPM2_CC.ReadPublic, handles=[handle])


def sign(key_handle: int, digest: bytes, auth: bytes = b"") -> bytes:
    """TPM2_Sign (Part 3, 20.2) with the key's own scheme and a NULL ticket.

    A NULL validation ticket is only accepted for unrestricted keys.
    """
    ticket = u16(TPM2_ST.HASHCHECK) + u32(TPM2_RH.NULL) + tpm2b(b"")
    params = tpm2b(digest) + u16(TPM2_ALG.NULL) + ticket
    return _pw_command(TPM2_CC.Sign, params, [key_handle], auth)


# ---------------------------------------------------------------- parsing


class Reader:
    """Reads TPM-marshalled values; TpmProtocolError when data runs out."""

    def __init__(self, data: bytes, offset: int = 0, end: int | None = None) -> None:
        self._data = data
        self._pos = offset
        self._end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def take(self, n: int) -> bytes:
        if n > self.remaining:
            raise TpmProtocolError(f"need {n} bytes, {self.remaining} left")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def done(self) -> None:
        if self.remaining:
            raise TpmProtocolError(f"{self.remaining} unexpected trailing bytes")


def response_parameters(response: bytes, handles: int = 0) -> tuple[list[int], Reader]:
    """Split a successful response into its handles and a parameter reader.

    Part 1, 18.3: with TPM_ST_SESSIONS a u32 parameterSize follows the
    handles and the session area follows the parameters. Raises
    TpmResponseError for an error code, TpmProtocolError for bad framing.
    """
    rc = response_code(response)
    if rc != TPM2_RC.SUCCESS:
        raise TpmResponseError(rc)
    header = parse_header(response)
    reader = Reader(response, HEADER_SIZE)
    out_handles = [reader.u32() for _ in range(handles)]
    if header.tag == TPM2_ST.SESSIONS:
        size = reader.u32()
        if size > reader.remaining:
            raise TpmProtocolError("parameterSize exceeds the response")
        start = len(response) - reader.remaining
        return out_handles, Reader(response, start, start + size)
    if header.tag != TPM2_ST.NO_SESSIONS:
        raise TpmProtocolError(f"bad response tag {header.tag:#x}")
    return out_handles, reader


def check_success(response: bytes) -> None:
    """Raise TpmResponseError unless ``response`` reports TPM_RC_SUCCESS."""
    rc = response_code(response)
    if rc != TPM2_RC.SUCCESS:
        raise TpmResponseError(rc)


def _single_tpm2b(response: bytes) -> bytes:
    """The one TPM2B response parameter of a command that has just that."""
    _, r = response_parameters(response)
    data = r.tpm2b()
    r.done()
    return data


def parse_get_random(response: bytes) -> bytes:
    """randomBytes of a TPM2_GetRandom response."""
    return _single_tpm2b(response)


@dataclass(frozen=True)
class PcrReadResult:
    update_counter: int
    selection: bytes  # the TPML_PCR_SELECTION the TPM answered for
    digests: list[bytes]


def parse_pcr_read(response: bytes) -> PcrReadResult:
    """pcrUpdateCounter, pcrSelectionOut and pcrValues of TPM2_PCR_Read."""
    _, r = response_parameters(response)
    counter = r.u32()
    start = len(response) - r.remaining
    for _ in range(r.u32()):
        r.u16()
        r.take(r.u8())
    selection = response[start : len(response) - r.remaining]
    digests = [r.tpm2b() for _ in range(r.u32())]
    r.done()
    return PcrReadResult(counter, selection, digests)


def parse_nv_read(response: bytes) -> bytes:
    """data of a TPM2_NV_Read response."""
    return _single_tpm2b(response)


@dataclass(frozen=True)
class CreatePrimaryResult:
    handle: int
    public: bytes  # the TPMT_PUBLIC (contents of outPublic)
    name: bytes


def parse_create_primary(response: bytes) -> CreatePrimaryResult:
    """objectHandle, outPublic and name of TPM2_CreatePrimary (Part 3, 24.1)."""
    (handle,), r = response_parameters(response, handles=1)
    public = r.tpm2b()
    r.tpm2b()  # creationData
    r.tpm2b()  # creationHash
    r.u16(), r.u32(), r.tpm2b()  # creationTicket: tag, hierarchy, digest
    name = r.tpm2b()
    r.done()
    return CreatePrimaryResult(handle, public, name)


@dataclass(frozen=True)
class ReadPublicResult:
    public: bytes
    name: bytes
    qualified_name: bytes


def parse_read_public(response: bytes) -> ReadPublicResult:
    """outPublic, name and qualifiedName of TPM2_ReadPublic."""
    _, r = response_parameters(response)
    result = ReadPublicResult(r.tpm2b(), r.tpm2b(), r.tpm2b())
    r.done()
    return result


@dataclass(frozen=True)
class TimeInfo:
    """TPMS_TIME_INFO (Part 2, 10.11.6)."""

    time: int
    clock: int
    reset_count: int
    restart_count: int
    safe: bool


def parse_read_clock(response: bytes) -> TimeInfo:
    _, r = response_parameters(response)
    info = TimeInfo(r.u64(), r.u64(), r.u32(), r.u32(), bool(r.u8()))
    r.done()
    return info


def parse_tpm_properties(response: bytes) -> tuple[bool, dict[int, int]]:
    """moreData and the TPML_TAGGED_TPM_PROPERTY of GetCapability(TPM_PROPERTIES)."""
    _, r = response_parameters(response)
    more = bool(r.u8())
    r.u32()  # capability
    props = {}
    for _ in range(r.u32()):
        prop = r.u32()
        props[prop] = r.u32()
    r.done()
    return more, props


def parse_sign(response: bytes) -> bytes:
    """The marshalled TPMT_SIGNATURE of TPM2_Sign."""
    _, r = response_parameters(response)
    return r.take(r.remaining)
