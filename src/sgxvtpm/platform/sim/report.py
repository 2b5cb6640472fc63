"""The REPORT structure's byte layout (Intel SDM vol. 3D, 38.15 "REPORT").

REPORTBODY (384 bytes) then KEYID (32) and MAC (16): 432 bytes. Offsets are
the SDM's; fields the base types do not carry (ISVEXTPRODID, CONFIGID,
CONFIGSVN, ISVFAMILYID) are written as zeros and must be zero when parsed,
as are the reserved ranges.
"""

from __future__ import annotations

import struct

from sgxvtpm.platform.base import (
    REPORT_BODY_SIZE,
    REPORT_DATA_SIZE,
    REPORT_SIZE,
    EnclaveIdentity,
    ReportBody,
)

OFF_CPUSVN = 0
OFF_MISCSELECT = 16
OFF_ISVEXTPRODID = 32
OFF_ATTRIBUTES = 48
OFF_MRENCLAVE = 64
OFF_MRSIGNER = 128
OFF_CONFIGID = 192
OFF_ISVPRODID = 256
OFF_ISVSVN = 258
OFF_CONFIGSVN = 260
OFF_ISVFAMILYID = 304
OFF_REPORTDATA = 320
OFF_KEYID = REPORT_BODY_SIZE
OFF_MAC = REPORT_BODY_SIZE + 32

# Byte ranges this simulation always leaves zero (reserved or unsupported).
_ZERO_RANGES = (
    (20, 32),  # RESERVED1 (MISCSELECT is 4 bytes)
    (OFF_ISVEXTPRODID, OFF_ATTRIBUTES),
    (96, OFF_MRSIGNER),  # RESERVED2
    (160, OFF_CONFIGID),  # RESERVED3
    (OFF_CONFIGID, OFF_ISVPRODID),
    (OFF_CONFIGSVN, OFF_REPORTDATA),  # CONFIGSVN, RESERVED4, ISVFAMILYID
)


def pack_report_body(body: ReportBody) -> bytes:
    """Serialise a REPORTBODY; raises ValueError for out-of-range fields."""
    ident = body.identity
    _check_len("cpu_svn", body.cpu_svn, 16)
    _check_len("attributes", ident.attributes, 16)
    _check_len("mrenclave", ident.mrenclave, 32)
    _check_len("mrsigner", ident.mrsigner, 32)
    _check_len("report_data", body.report_data, REPORT_DATA_SIZE)
    buf = bytearray(REPORT_BODY_SIZE)
    buf[OFF_CPUSVN : OFF_CPUSVN + 16] = body.cpu_svn
    struct.pack_into("<I", buf, OFF_MISCSELECT, ident.misc_select)
    buf[OFF_ATTRIBUTES : OFF_ATTRIBUTES + 16] = ident.attributes
    buf[OFF_MRENCLAVE : OFF_MRENCLAVE + 32] = ident.mrenclave
    buf[OFF_MRSIGNER : OFF_MRSIGNER + 32] = ident.mrsigner
    struct.pack_into("<HH", buf, OFF_ISVPRODID, ident.isv_prod_id, ident.isv_svn)
    buf[OFF_REPORTDATA:] = body.report_data
    return bytes(buf)


def parse_report_body(raw: bytes) -> ReportBody:
    """Parse a REPORTBODY; ValueError if the size or a must-be-zero range is wrong."""
    if len(raw) != REPORT_BODY_SIZE:
        raise ValueError(f"REPORTBODY is {len(raw)} bytes, expected {REPORT_BODY_SIZE}")
    for start, end in _ZERO_RANGES:
        if any(raw[start:end]):
            raise ValueError(f"REPORTBODY bytes {start}..{end} must be zero")
    (misc_select,) = struct.unpack_from("<I", raw, OFF_MISCSELECT)
    isv_prod_id, isv_svn = struct.unpack_from("<HH", raw, OFF_ISVPRODID)
    identity = EnclaveIdentity(
        mrenclave=raw[OFF_MRENCLAVE : OFF_MRENCLAVE + 32],
        mrsigner=raw[OFF_MRSIGNER : OFF_MRSIGNER + 32],
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        attributes=raw[OFF_ATTRIBUTES : OFF_ATTRIBUTES + 16],
        misc_select=misc_select,
    )
    return ReportBody(
        identity=identity,
        report_data=raw[OFF_REPORTDATA:],
        cpu_svn=raw[OFF_CPUSVN : OFF_CPUSVN + 16],
    )


def split_report(report: bytes) -> tuple[bytes, bytes, bytes]:
    """(body, KEYID, MAC) of a 432-byte REPORT; ValueError if the size is wrong."""
    if len(report) != REPORT_SIZE:
        raise ValueError(f"REPORT is {len(report)} bytes, expected {REPORT_SIZE}")
    return report[:OFF_KEYID], report[OFF_KEYID:OFF_MAC], report[OFF_MAC:]


def _check_len(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} is {len(value)} bytes, expected {size}")
