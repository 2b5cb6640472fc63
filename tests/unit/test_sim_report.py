"""EREPORT and local attestation (SDM 38.15, 38.16): layout, MAC, targeting."""

from __future__ import annotations

import struct

import pytest

from sgxvtpm.platform import (
    REPORT_SIZE,
    AttestationError,
    EnclaveIdentity,
    PlatformError,
    ReportBody,
    TargetInfo,
)
from sgxvtpm.platform.sim import SimEnclavePlatform, SimPlatformDir
from sgxvtpm.platform.sim.report import pack_report_body, parse_report_body

A = EnclaveIdentity(b"\xaa" * 32, b"\x51" * 32, isv_prod_id=0x1234, isv_svn=0x0506)
B = EnclaveIdentity(b"\xbb" * 32, b"\x51" * 32, isv_prod_id=0x1234, isv_svn=0x0506)


def _enclave(pdir: SimPlatformDir, ident: EnclaveIdentity) -> SimEnclavePlatform:
    return pdir.enclave_platform(ident)


def test_report_body_offsets() -> None:
    ident = EnclaveIdentity(
        b"\x01" * 32, b"\x02" * 32, 0x0A0B, 0x0C0D, attributes=b"\x03" * 16, misc_select=0x04050607
    )
    body = pack_report_body(ReportBody(ident, b"\x05" * 64, cpu_svn=b"\x06" * 16))
    assert len(body) == 384
    assert body[0:16] == b"\x06" * 16  # CPUSVN
    assert struct.unpack_from("<I", body, 16)[0] == 0x04050607  # MISCSELECT
    assert body[48:64] == b"\x03" * 16  # ATTRIBUTES
    assert body[64:96] == b"\x01" * 32  # MRENCLAVE
    assert body[128:160] == b"\x02" * 32  # MRSIGNER
    assert struct.unpack_from("<HH", body, 256) == (0x0A0B, 0x0C0D)  # ISVPRODID, ISVSVN
    assert body[320:384] == b"\x05" * 64  # REPORTDATA
    assert parse_report_body(body) == ReportBody(ident, b"\x05" * 64, cpu_svn=b"\x06" * 16)


@pytest.mark.parametrize("offset", [20, 32, 100, 170, 192, 260, 304])
def test_parse_refuses_nonzero_reserved(offset: int) -> None:
    body = bytearray(pack_report_body(ReportBody(A, bytes(64))))
    body[offset] = 1
    with pytest.raises(ValueError):
        parse_report_body(bytes(body))


def test_report_verifies_for_its_target_only(sim_platform: SimPlatformDir) -> None:
    report = _enclave(sim_platform, A).report(TargetInfo(B.mrenclave), b"\x42" * 64)
    assert len(report) == REPORT_SIZE
    body = _enclave(sim_platform, B).verify_report(report)
    assert body.identity == A
    assert body.report_data == b"\x42" * 64
    with pytest.raises(AttestationError):
        _enclave(sim_platform, A).verify_report(report)  # targeted at B, not A
    self_report = _enclave(sim_platform, A).report(TargetInfo(A.mrenclave), b"\x42" * 64)
    with pytest.raises(AttestationError):
        _enclave(sim_platform, B).verify_report(self_report)


def test_every_single_bit_flip_is_rejected(sim_platform: SimPlatformDir) -> None:
    report = _enclave(sim_platform, A).report(TargetInfo(B.mrenclave), b"\x17" * 64)
    verifier = _enclave(sim_platform, B)
    verifier.verify_report(report)
    for bit in range(REPORT_SIZE * 8):
        flipped = bytearray(report)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(AttestationError):
            verifier.verify_report(bytes(flipped))


def test_report_from_another_platform_is_rejected(
    sim_platform: SimPlatformDir, other_sim_platform: SimPlatformDir
) -> None:
    report = _enclave(other_sim_platform, A).report(TargetInfo(B.mrenclave), bytes(64))
    with pytest.raises(AttestationError):
        _enclave(sim_platform, B).verify_report(report)


@pytest.mark.parametrize("size", [0, 431, 433])
def test_wrong_size_report_is_rejected(sim_platform: SimPlatformDir, size: int) -> None:
    with pytest.raises(AttestationError):
        _enclave(sim_platform, A).verify_report(bytes(size))


def test_report_data_must_be_64_bytes(sim_platform: SimPlatformDir) -> None:
    with pytest.raises(PlatformError):
        _enclave(sim_platform, A).report(TargetInfo(B.mrenclave), b"short")
