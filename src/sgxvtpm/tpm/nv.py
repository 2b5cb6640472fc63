"""Running raw TPM commands through a transport, and the NV operations of manufacturing.

Everything here takes ``transact``: a callable that sends one complete TPM
command and returns the complete response. It can be
:meth:`LibtpmsEngine.process`, a socket to Debian's swtpm, or an attested K2
session; no I/O happens in this module.

Errors: a TPM error code raises :class:`~sgxvtpm.tpm.wire.TpmResponseError`
naming the code and the command (``TPM_RC_NV_DEFINED (0x14c) from
TPM2_CC_NV_DefineSpace``); malformed responses raise
:class:`~sgxvtpm.tpm.wire.TpmProtocolError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sgxvtpm.tpm.constants import TPM2_CAP, TPM2_CC, TPM2_RC, TPM2_RH, TPMA_NV
from sgxvtpm.tpm.wire import (
    Reader,
    TpmResponseError,
    build_command,
    nv_define_space,
    nv_read,
    nv_read_public,
    nv_write,
    password_session,
    response_code,
    response_parameters,
    u32,
)

Transact = Callable[[bytes], bytes]
"""Send one TPM command, return its response (both complete, raw bytes)."""

#: TPM_PT_NV_BUFFER_MAX (Part 2, Table 23: PT_FIXED + 44), the largest
#: NV_Read/NV_Write chunk; not in constants.TPM2_PT.
TPM_PT_NV_BUFFER_MAX = 0x12C
#: libtpms' MAX_NV_BUFFER_SIZE, used if the TPM does not report the property.
DEFAULT_NV_BUFFER = 1024

# Codes that mean "send the same command again" (Part 1, 19.8.6 and Part 2,
# 6.6.3): a raw client must retry, as TSS stacks do.
_RETRY_CODES = frozenset({TPM2_RC.RETRY, TPM2_RC.YIELDED, TPM2_RC.TESTING})
_MAX_RETRIES = 8

#: Attributes of the EK and platform certificate indices, exactly as
#: swtpm_setup 0.7.1 defines them (read back with tpm2_nvreadpublic:
#: 0x42072001 before writing, 0x62072001 written, 0x62072801 written and
#: locked with --lock-nvram). TCG EK Credential Profile 2.x, section 2.2.1.5:
#: platform-created, readable by owner and by authValue (empty), no DA.
EK_CERT_NV_ATTRIBUTES = (
    TPMA_NV.PPWRITE
    | TPMA_NV.WRITEDEFINE
    | TPMA_NV.PPREAD
    | TPMA_NV.OWNERREAD
    | TPMA_NV.AUTHREAD
    | TPMA_NV.NO_DA
    | TPMA_NV.PLATFORMCREATE
)


def execute(transact: Transact, command: bytes) -> bytes:
    """Send ``command``; the successful response, retrying TPM_RC_RETRY and kin.

    Raises TpmResponseError (with the command code) for any other error code.
    """
    code = int.from_bytes(command[6:10], "big")
    for _ in range(_MAX_RETRIES):
        response = transact(command)
        rc = response_code(response)
        if rc == TPM2_RC.SUCCESS:
            return response
        if rc not in _RETRY_CODES:
            raise TpmResponseError(rc, code)
    raise TpmResponseError(rc, code)


def get_tpm_property(transact: Transact, prop: int) -> int | None:
    """One TPM_PT value via TPM2_GetCapability(TPM_CAP_TPM_PROPERTIES), or None."""
    command = build_command(
        TPM2_CC.GetCapability, u32(TPM2_CAP.TPM_PROPERTIES) + u32(prop) + u32(1)
    )
    _, r = response_parameters(execute(transact, command))
    r.u8()  # moreData
    r.u32()  # capability
    for _ in range(r.u32()):
        tag, value = r.u32(), r.u32()
        if tag == prop:
            return value
    return None


def nv_buffer_max(transact: Transact) -> int:
    """The TPM's largest NV_Read/NV_Write chunk (TPM_PT_NV_BUFFER_MAX)."""
    value = get_tpm_property(transact, TPM_PT_NV_BUFFER_MAX)
    return value or DEFAULT_NV_BUFFER


@dataclass(frozen=True)
class NvPublic:
    """TPMS_NV_PUBLIC (Part 2, 13.5)."""

    index: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    size: int


def read_nv_public(transact: Transact, index: int) -> NvPublic:
    """TPM2_NV_ReadPublic (Part 3, 31.6); TpmResponseError TPM_RC_HANDLE if undefined."""
    _, r = response_parameters(execute(transact, nv_read_public(index)))
    inner = Reader(r.tpm2b())
    public = NvPublic(inner.u32(), inner.u16(), inner.u32(), inner.tpm2b(), inner.u16())
    inner.done()
    return public


def nv_write_lock(index: int, auth_handle: int = TPM2_RH.PLATFORM, auth: bytes = b"") -> bytes:
    """TPM2_NV_WriteLock (Part 3, 31.10)."""
    return build_command(TPM2_CC.NV_WriteLock, b"", [auth_handle, index], [password_session(auth)])


def define_and_write(
    transact: Transact,
    index: int,
    data: bytes,
    *,
    lock: bool = True,
    platform_auth: bytes = b"",
) -> None:
    """Define a platform-created index of ``len(data)`` bytes, write it, write-lock it.

    NV_DefineSpace under TPM_RH_PLATFORM (PLATFORMCREATE, Part 3, 31.3.1),
    NV_Write in chunks of at most TPM_PT_NV_BUFFER_MAX bytes (PPWRITE: the
    platform authorizes), then NV_WriteLock: with WRITEDEFINE the lock is
    permanent (Part 2, 13.4: TPMA_NV_WRITEDEFINE), so the certificate can never
    be replaced short of undefining the index with platform authorization.
    """
    if not data:
        raise ValueError("an NV certificate index needs at least one byte")
    execute(
        transact,
        nv_define_space(
            index,
            len(data),
            EK_CERT_NV_ATTRIBUTES,
            hierarchy=TPM2_RH.PLATFORM,
            hierarchy_auth=platform_auth,
        ),
    )
    chunk = nv_buffer_max(transact)
    for offset in range(0, len(data), chunk):
        piece = data[offset : offset + chunk]
        execute(
            transact,
            nv_write(index, piece, offset, auth_handle=TPM2_RH.PLATFORM, auth=platform_auth),
        )
    if lock:
        execute(transact, nv_write_lock(index, TPM2_RH.PLATFORM, platform_auth))


def read_all(transact: Transact, index: int, auth_handle: int | None = None) -> bytes:
    """The whole contents of an NV index, read in TPM_PT_NV_BUFFER_MAX chunks.

    Authorized by the index itself with an empty authValue by default
    (AUTHREAD, as tpm2_getekcertificate does); pass ``TPM2_RH.OWNER`` for
    OWNERREAD.
    """
    size = read_nv_public(transact, index).size
    chunk = nv_buffer_max(transact)
    handle = index if auth_handle is None else auth_handle
    out = bytearray()
    while len(out) < size:
        n = min(chunk, size - len(out))
        _, r = response_parameters(
            execute(transact, nv_read(index, n, len(out), auth_handle=handle))
        )
        piece = r.tpm2b()
        if len(piece) != n:
            raise TpmResponseError(TPM2_RC.NV_SIZE, TPM2_CC.NV_Read)
        out += piece
    return bytes(out)
