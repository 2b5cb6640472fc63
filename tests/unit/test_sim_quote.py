"""DCAP v3 quotes: layout, verification from the root alone, tamper evidence."""

from __future__ import annotations

import datetime
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgxvtpm.platform import AttestationError, EnclaveIdentity, PlatformError
from sgxvtpm.platform.sim import SimPlatformDir, SimQuoteVerifier
from sgxvtpm.platform.sim.quote import QE_VENDOR_ID
from sgxvtpm.util import log

IDENT = EnclaveIdentity(b"\xa1" * 32, b"\xb2" * 32, isv_prod_id=3, isv_svn=4)
REPORT_DATA = bytes(range(64))


@pytest.fixture(scope="module")
def quote(sim_platform: SimPlatformDir) -> bytes:
    return sim_platform.enclave_platform(IDENT).quote(REPORT_DATA)


@pytest.fixture(scope="module")
def verifier(sim_platform: SimPlatformDir) -> SimQuoteVerifier:
    return SimQuoteVerifier(sim_platform.root_certificate_pem)


def test_quote_layout(quote: bytes, sim_platform: SimPlatformDir) -> None:
    version, key_type, tee, _qe_svn, _pce_svn = struct.unpack_from("<HHIHH", quote)
    assert (version, key_type, tee) == (3, 2, 0)
    assert quote[12:28] == QE_VENDOR_ID
    assert quote[28:48] == sim_platform.platform_id + bytes(4)
    assert quote[48 + 64 : 48 + 96] == IDENT.mrenclave
    assert quote[48 + 320 : 48 + 384] == REPORT_DATA
    (sig_len,) = struct.unpack_from("<I", quote, 432)
    assert sig_len == len(quote) - 436
    sig = quote[436:]
    qe_body = sig[128 : 128 + 384]
    auth_len = struct.unpack_from("<H", sig, 576)[0]
    cert_type, cert_len = struct.unpack_from("<HI", sig, 578 + auth_len)
    assert cert_type == 5
    pem = sig[584 + auth_len :]
    assert len(pem) == cert_len
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == 2
    assert pem.endswith(sim_platform.root_certificate_pem)
    assert qe_body[320 + 32 :] == bytes(32)  # SHA-256(attest key || auth) || zeros


def test_verifier_from_root_alone(quote: bytes, sim_platform: SimPlatformDir) -> None:
    verified = SimQuoteVerifier(sim_platform.root_certificate_pem).verify(quote)
    assert verified.identity == IDENT
    assert verified.report_data == REPORT_DATA
    assert verified.platform_id == sim_platform.platform_id
    assert sim_platform.verifier().verify(quote) == verified


def test_each_byte_with_one_flipped_bit_is_rejected(
    quote: bytes, verifier: SimQuoteVerifier
) -> None:
    """Every byte position, one bit each (cycling through bit 0..7)."""
    for pos in range(len(quote)):
        flipped = bytearray(quote)
        flipped[pos] ^= 1 << (pos % 8)
        with pytest.raises(AttestationError):
            verifier.verify(bytes(flipped))


@pytest.mark.slow
def test_every_bit_flip_is_rejected(quote: bytes, verifier: SimQuoteVerifier) -> None:
    for bit in range(len(quote) * 8):
        flipped = bytearray(quote)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(AttestationError):
            verifier.verify(bytes(flipped))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_bit_flips_are_rejected(
    quote: bytes, verifier: SimQuoteVerifier, data: st.DataObject
) -> None:
    bit = data.draw(st.integers(0, len(quote) * 8 - 1))
    flipped = bytearray(quote)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(AttestationError):
        verifier.verify(bytes(flipped))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(max_size=3000))
def test_any_bytes_verify_or_raise_attestation_error(
    verifier: SimQuoteVerifier, blob: bytes
) -> None:
    with pytest.raises(AttestationError):
        verifier.verify(blob)


@pytest.mark.parametrize("cut", [0, 1, 48, 436, 500, -1])
def test_truncated_or_extended_quote_is_rejected(
    quote: bytes, verifier: SimQuoteVerifier, cut: int
) -> None:
    with pytest.raises(AttestationError):
        verifier.verify(quote[:cut])
    with pytest.raises(AttestationError):
        verifier.verify(quote + b"\x00")


def test_quote_from_another_root_is_rejected(
    quote: bytes, sim_platform: SimPlatformDir, other_sim_platform: SimPlatformDir
) -> None:
    assert other_sim_platform.root_certificate_pem != sim_platform.root_certificate_pem
    assert other_sim_platform.platform_id != sim_platform.platform_id
    with pytest.raises(AttestationError):
        other_sim_platform.verifier().verify(quote)
    foreign = other_sim_platform.enclave_platform(IDENT).quote(REPORT_DATA)
    with pytest.raises(AttestationError):
        sim_platform.verifier().verify(foreign)


def test_spliced_chain_is_rejected(
    quote: bytes, sim_platform: SimPlatformDir, other_sim_platform: SimPlatformDir
) -> None:
    """Another platform's quote with our root appended in place of its own."""
    foreign = other_sim_platform.enclave_platform(IDENT).quote(REPORT_DATA)
    theirs, ours = other_sim_platform.root_certificate_pem, sim_platform.root_certificate_pem
    spliced = foreign.replace(theirs, ours)
    assert len(spliced) == len(foreign) and spliced != foreign
    with pytest.raises(AttestationError):
        sim_platform.verifier().verify(spliced)


def test_expired_chain_is_rejected(quote: bytes, sim_platform: SimPlatformDir) -> None:
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365 * 31)
    with pytest.raises(AttestationError):
        SimQuoteVerifier(sim_platform.root_certificate_pem, clock=lambda: later).verify(quote)


def test_rejection_is_opaque_and_logged(quote: bytes, verifier: SimQuoteVerifier) -> None:
    bad = bytearray(quote)
    bad[48 + 64] ^= 1
    with log.capture() as records, pytest.raises(AttestationError) as excinfo:
        verifier.verify(bytes(bad))
    assert str(excinfo.value) == "quote verification failed"
    reasons = [r["reason"] for r in records if r["event"] == "platform.quote_rejected"]
    assert len(reasons) == 1 and reasons[0] != str(excinfo.value)


def test_verifier_needs_a_self_signed_root(sim_platform: SimPlatformDir) -> None:
    pck_pem = (sim_platform.path / "pck.pem").read_bytes()
    with pytest.raises(PlatformError):
        SimQuoteVerifier(pck_pem)
    with pytest.raises(PlatformError):
        SimQuoteVerifier(b"not a pem")
