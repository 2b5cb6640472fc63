"""SGX structures a Gramine enclave writes to /dev/attestation or hands to EGETKEY.

Sans-IO. Layouts from the Intel SDM vol. 3D: TARGETINFO (38.16, 512 bytes)
and KEYREQUEST (38.18, 512 bytes). REPORT bodies are parsed by
:func:`sgxvtpm.platform.dcap.parse_sgx_body` (the same offsets a quote uses).
All integers little-endian; reserved bytes are zero.
"""

from __future__ import annotations

import struct

from sgxvtpm.platform.base import KeyName, KeyPolicy, KeyRequest, TargetInfo

TARGET_INFO_SIZE = 512
KEY_REQUEST_SIZE = 512

# TARGETINFO: MRENCLAVE @0 (32), ATTRIBUTES @32 (16), CET_ATTRIBUTES @48 (1),
# reserved @49 (1), CONFIGSVN @50 (u16), MISCSELECT @52 (u32), reserved @56 (8),
# CONFIGID @64 (64), reserved @128 (384).
_TI_MRENCLAVE = 0
_TI_ATTRIBUTES = 32
_TI_MISCSELECT = 52

# KEYREQUEST: KEYNAME @0 (u16), KEYPOLICY @2 (u16), ISVSVN @4 (u16), reserved @6
# (2), CPUSVN @8 (16), ATTRIBUTEMASK @24 (16), KEYID @40 (32), MISCMASK @72
# (u32), CONFIGSVN @76 (u16), reserved @78 (434).
_KR_HEAD = struct.Struct("<HHH2x16s16s32sIH")

# Gramine's sealing-key masks (manifest-syntax.rst, "Attribute masks for SGX
# sealing key derivation": the defaults of sgx.seal_key.{flags,xfrm,misc}_mask).
SEAL_FLAGS_MASK = 0xFFFFFFFFFFFFFFFF
SEAL_XFRM_MASK = 0xFFFFFFFFFFF9FF1B
SEAL_MISC_MASK = 0xFFFFFFFF


def pack_target_info(target: TargetInfo) -> bytes:
    """TARGETINFO for ``target`` (CET attributes, CONFIGSVN and CONFIGID zero)."""
    if len(target.mrenclave) != 32 or len(target.attributes) != 16:
        raise ValueError("TARGETINFO: MRENCLAVE is 32 bytes and ATTRIBUTES 16")
    buf = bytearray(TARGET_INFO_SIZE)
    buf[_TI_MRENCLAVE : _TI_MRENCLAVE + 32] = target.mrenclave
    buf[_TI_ATTRIBUTES : _TI_ATTRIBUTES + 16] = target.attributes
    struct.pack_into("<I", buf, _TI_MISCSELECT, target.misc_select)
    return bytes(buf)


def parse_target_info(raw: bytes) -> TargetInfo:
    """The fields sgxvtpm uses of a TARGETINFO; ValueError if it is not 512 bytes."""
    if len(raw) != TARGET_INFO_SIZE:
        raise ValueError(f"TARGETINFO is {len(raw)} bytes, expected {TARGET_INFO_SIZE}")
    (misc_select,) = struct.unpack_from("<I", raw, _TI_MISCSELECT)
    return TargetInfo(
        mrenclave=bytes(raw[_TI_MRENCLAVE : _TI_MRENCLAVE + 32]),
        attributes=bytes(raw[_TI_ATTRIBUTES : _TI_ATTRIBUTES + 16]),
        misc_select=misc_select,
    )


def pack_key_request(
    request: KeyRequest,
    *,
    flags_mask: int = SEAL_FLAGS_MASK,
    xfrm_mask: int = SEAL_XFRM_MASK,
    misc_mask: int = SEAL_MISC_MASK,
) -> bytes:
    """KEYREQUEST for ``request``; the masks default to Gramine's sealing-key masks."""
    if len(request.cpu_svn) != 16 or len(request.key_id) != 32:
        raise ValueError("KEYREQUEST: CPUSVN is 16 bytes and KEYID 32")
    head = _KR_HEAD.pack(
        int(request.key_name),
        int(request.key_policy),
        request.isv_svn,
        request.cpu_svn,
        struct.pack("<QQ", flags_mask, xfrm_mask),
        request.key_id,
        misc_mask,
        request.config_svn,
    )
    return head.ljust(KEY_REQUEST_SIZE, b"\x00")


def parse_key_request(raw: bytes) -> KeyRequest:
    """The fields of a KEYREQUEST the platform interface carries (masks are not).

    ValueError if it is not 512 bytes, names no known key or policy, or has
    non-zero reserved bytes.
    """
    if len(raw) != KEY_REQUEST_SIZE:
        raise ValueError(f"KEYREQUEST is {len(raw)} bytes, expected {KEY_REQUEST_SIZE}")
    if any(raw[6:8]) or any(raw[_KR_HEAD.size :]):
        raise ValueError("KEYREQUEST reserved bytes must be zero")
    name, policy, isv_svn, cpu_svn, _mask, key_id, _misc, config_svn = _KR_HEAD.unpack_from(raw)
    if policy & ~int(KeyPolicy.MRENCLAVE | KeyPolicy.MRSIGNER):
        raise ValueError(f"KEYREQUEST policy {policy:#x} is not one sgxvtpm knows")
    return KeyRequest(
        key_name=KeyName(name),
        key_policy=KeyPolicy(policy),
        isv_svn=isv_svn,
        cpu_svn=cpu_svn,
        key_id=key_id,
        config_svn=config_svn,
    )
