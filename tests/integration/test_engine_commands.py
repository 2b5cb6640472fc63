"""LibtpmsEngine answers real TPM 2.0 commands correctly (engine in a child process)."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from tests.helpers.tpm import EngineProcess, RemoteError, started_engine

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_ALG, TPM2_CC, TPM2_HT, TPM2_RC, TPM2_RH, TPMA_NV

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tpm() -> Iterator[EngineProcess]:
    ep = started_engine()
    yield ep
    assert ep.close() == 0


def rc(response: bytes) -> int:
    return wire.response_code(response)


def test_startup_twice_is_initialize_error(tpm: EngineProcess) -> None:
    assert rc(tpm.process(wire.startup())) == TPM2_RC.INITIALIZE


def test_commands_before_startup_are_refused() -> None:
    with EngineProcess() as ep:
        ep.call("start")
        assert rc(ep.process(wire.get_random(8))) == TPM2_RC.INITIALIZE
        assert rc(ep.process(wire.startup())) == TPM2_RC.SUCCESS
        assert len(wire.parse_get_random(ep.process(wire.get_random(8)))) == 8


def test_get_random(tpm: EngineProcess) -> None:
    a = wire.parse_get_random(tpm.process(wire.get_random(32)))
    b = wire.parse_get_random(tpm.process(wire.get_random(32)))
    assert len(a) == len(b) == 32
    assert a != b
    # Part 3, 16.1: at most the largest digest size is returned.
    assert len(wire.parse_get_random(tpm.process(wire.get_random(1000)))) == 64


def test_pcr_extend_chain(tpm: EngineProcess) -> None:
    events = [hashlib.sha256(bytes([i])).digest() for i in range(5)]
    expected = bytes(32)  # PCR 16 (debug) starts at zero
    for event in events:
        assert rc(tpm.process(wire.pcr_extend(16, event))) == TPM2_RC.SUCCESS
        expected = hashlib.sha256(expected + event).digest()
    result = wire.parse_pcr_read(tpm.process(wire.pcr_read([16])))
    assert result.digests == [expected]
    assert result.selection == wire.pcr_selection([16])
    # PCR_Reset returns it to zero; read two PCRs at once (PCR order ascending)
    reset = wire.build_command(TPM2_CC.PCR_Reset, b"", [16], [wire.password_session()])
    assert rc(tpm.process(reset)) == TPM2_RC.SUCCESS
    both = wire.parse_pcr_read(tpm.process(wire.pcr_read([16, 23])))
    assert both.digests[0] == bytes(32)
    assert len(both.digests) == 2


def test_locality_reaches_the_tpm(tpm: EngineProcess) -> None:
    # PC Client profile: PCR 17 (DRTM) is extendable only from locality 2-4.
    digest = hashlib.sha256(b"drtm").digest()
    assert rc(tpm.process(wire.pcr_extend(17, digest), locality=0)) == TPM2_RC.LOCALITY
    assert rc(tpm.process(wire.pcr_extend(17, digest), locality=3)) == TPM2_RC.SUCCESS


def test_process_rejects_bad_locality_argument(tpm: EngineProcess) -> None:
    with pytest.raises(RemoteError, match="ValueError"):
        tpm.process(wire.get_random(1), locality=5)


def _ecc_public_key(public: bytes) -> ec.EllipticCurvePublicKey:
    r = wire.Reader(public)
    assert r.u16() == TPM2_ALG.ECC
    r.u16(), r.u32(), r.tpm2b()  # nameAlg, attributes, authPolicy
    sym = r.u16()
    if sym != TPM2_ALG.NULL:
        r.u16(), r.u16()
    scheme = r.u16()
    if scheme != TPM2_ALG.NULL:
        r.u16()
    assert r.u16() == 0x0003  # NIST P-256
    assert r.u16() == TPM2_ALG.NULL  # kdf
    x, y = r.tpm2b(), r.tpm2b()
    r.done()
    assert len(x) == len(y) == 32
    # raises unless (x, y) is on the curve
    return ec.EllipticCurvePublicNumbers(
        int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
    ).public_key()


def _rsa_public_key(public: bytes) -> rsa.RSAPublicKey:
    r = wire.Reader(public)
    assert r.u16() == TPM2_ALG.RSA
    r.u16(), r.u32(), r.tpm2b()
    if r.u16() != TPM2_ALG.NULL:
        r.u16(), r.u16()
    if r.u16() != TPM2_ALG.NULL:
        r.u16()
    assert r.u16() == 2048
    exponent = r.u32() or 65537
    modulus = r.tpm2b()
    r.done()
    assert len(modulus) == 256
    return rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()


def _name(public: bytes) -> bytes:
    # Part 1, 16: Name = nameAlg || H(TPMT_PUBLIC)
    return struct.pack(">H", TPM2_ALG.SHA256) + hashlib.sha256(public).digest()


def _create(tpm: EngineProcess, template: bytes) -> wire.CreatePrimaryResult:
    result = wire.parse_create_primary(tpm.process(wire.create_primary(template)))
    assert result.handle >> 24 == TPM2_HT.TRANSIENT
    assert result.name == _name(result.public)
    return result


def _sign(tpm: EngineProcess, handle: int, digest: bytes) -> wire.Reader:
    sig = wire.Reader(wire.parse_sign(tpm.process(wire.sign(handle, digest))))
    return sig


def test_create_primary_ecc_p256_and_sign(tpm: EngineProcess) -> None:
    storage = _create(tpm, wire.ecc_p256_template())
    _ecc_public_key(storage.public)
    # Primary keys derive from the hierarchy seed: same template, same key.
    again = _create(tpm, wire.ecc_p256_template())
    assert again.public == storage.public
    signing = _create(tpm, wire.ecc_p256_template(signing=True))
    key = _ecc_public_key(signing.public)
    digest = hashlib.sha256(b"message").digest()
    sig = _sign(tpm, signing.handle, digest)
    assert sig.u16() == TPM2_ALG.ECDSA and sig.u16() == TPM2_ALG.SHA256
    r, s = int.from_bytes(sig.tpm2b(), "big"), int.from_bytes(sig.tpm2b(), "big")
    sig.done()
    der = utils.encode_dss_signature(r, s)
    key.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    for handle in (storage.handle, again.handle, signing.handle):
        assert rc(tpm.process(wire.flush_context(handle))) == TPM2_RC.SUCCESS


def test_create_primary_rsa2048_and_sign(tpm: EngineProcess) -> None:
    storage = _create(tpm, wire.rsa2048_template())
    _rsa_public_key(storage.public)
    signing = _create(tpm, wire.rsa2048_template(signing=True))
    key = _rsa_public_key(signing.public)
    digest = hashlib.sha256(b"message").digest()
    sig = _sign(tpm, signing.handle, digest)
    assert sig.u16() == TPM2_ALG.RSASSA and sig.u16() == TPM2_ALG.SHA256
    signature = sig.tpm2b()
    sig.done()
    key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    for handle in (storage.handle, signing.handle):
        assert rc(tpm.process(wire.flush_context(handle))) == TPM2_RC.SUCCESS
    # flushing twice: TPM_RC_HANDLE (parameter 1), flushHandle is a parameter
    assert rc(tpm.process(wire.flush_context(signing.handle))) == 0x1CB


NV_ATTRS = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD
NV_ATTRS |= TPMA_NV.NO_DA


def test_nv_define_write_read(tpm: EngineProcess) -> None:
    index = 0x01500020
    assert rc(tpm.process(wire.nv_define_space(index, 64, NV_ATTRS))) == TPM2_RC.SUCCESS
    assert rc(tpm.process(wire.nv_define_space(index, 64, NV_ATTRS))) == TPM2_RC.NV_DEFINED
    # reading before the first write: TPM_RC_NV_UNINITIALIZED
    assert rc(tpm.process(wire.nv_read(index, 4))) == TPM2_RC.NV_UNINITIALIZED
    data = bytes(range(64))
    assert rc(tpm.process(wire.nv_write(index, data))) == TPM2_RC.SUCCESS
    assert wire.parse_nv_read(tpm.process(wire.nv_read(index, 64))) == data
    assert rc(tpm.process(wire.nv_write(index, b"XYZ", offset=10))) == TPM2_RC.SUCCESS
    expected = data[:10] + b"XYZ" + data[13:]
    assert wire.parse_nv_read(tpm.process(wire.nv_read(index, 20, offset=3))) == expected[3:23]
    assert rc(tpm.process(wire.nv_write(index, b"x" * 65))) != TPM2_RC.SUCCESS
    assert rc(tpm.process(wire.nv_undefine_space(index))) == TPM2_RC.SUCCESS
    assert rc(tpm.process(wire.nv_read(index, 4))) == 0x28B  # TPM_RC_HANDLE, handle 2


def test_nv_counter(tpm: EngineProcess) -> None:
    index = 0x01500021
    attrs = NV_ATTRS | TPMA_NV.TPM_NT_COUNTER
    assert rc(tpm.process(wire.nv_define_space(index, 8, attrs))) == TPM2_RC.SUCCESS
    values = []
    for _ in range(3):
        assert rc(tpm.process(wire.nv_increment(index))) == TPM2_RC.SUCCESS
        value = wire.parse_nv_read(tpm.process(wire.nv_read(index, 8)))
        values.append(int.from_bytes(value, "big"))
    assert values[1] == values[0] + 1 and values[2] == values[0] + 2
    assert rc(tpm.process(wire.nv_undefine_space(index))) == TPM2_RC.SUCCESS


def test_first_da_protected_auth_after_startup_is_retry() -> None:
    """libtpms answers TPM_RC_RETRY once: it must first record that DA state is in use.

    Part 1, 19.8.6; TSS stacks resend, raw clients must too. The engine passes
    it through unchanged.
    """
    index = 0x01500022
    attrs = TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD  # no NO_DA: DA-protected
    with started_engine() as ep:
        assert rc(ep.process(wire.nv_define_space(index, 8, attrs, auth=b"pw"))) == 0
        write = wire.nv_write(index, b"x", auth_handle=index, auth=b"pw")
        assert rc(ep.process(write)) == TPM2_RC.RETRY
        assert rc(ep.process(write)) == TPM2_RC.SUCCESS
        bad = wire.nv_write(index, b"x", auth_handle=index, auth=b"wrong")
        assert rc(ep.process(bad)) == 0x98E  # TPM_RC_AUTH_FAIL, session 1


def test_shutdown(tpm: EngineProcess) -> None:
    # last test of the module: Shutdown, then commands still answer (no Startup needed
    # for a TPM that is still powered; Part 3, 9.4: Shutdown only prepares state).
    assert rc(tpm.process(wire.shutdown())) == TPM2_RC.SUCCESS
    assert rc(tpm.process(wire.get_random(4))) == TPM2_RC.SUCCESS


def test_read_clock_and_capabilities(tpm: EngineProcess) -> None:
    first = wire.parse_read_clock(tpm.process(wire.read_clock()))
    second = wire.parse_read_clock(tpm.process(wire.read_clock()))
    assert second.clock >= first.clock
    assert first.reset_count == second.reset_count
    _, props = wire.parse_tpm_properties(
        tpm.process(wire.get_capability(6, 0x100, 64))  # TPM_PROPERTIES, PT_FIXED
    )
    assert props[0x100] == int.from_bytes(b"2.0\0", "big")  # TPM_PT_FAMILY_INDICATOR
    assert props[0x105] == int.from_bytes(b"IBM\0", "big")  # manufacturer
    assert props[0x11E] == 4096  # TPM_PT_MAX_COMMAND_SIZE


def test_control_functions(tpm: EngineProcess) -> None:
    assert tpm.call("set_buffer_size", 0) == (4096, 2808, 4096)
    with pytest.raises(RemoteError, match="EngineMisuseError"):
        tpm.call("set_buffer_size", 3000)  # only while stopped
    assert tpm.call("established") is False
    with pytest.raises(RemoteError, match="TPM_RESULT 0x3d"):  # TPM_BAD_LOCALITY
        tpm.call("reset_established", 0)
    tpm.call("reset_established", 3)
    info = json.loads(tpm.call("get_info", 1))
    assert info["TPMSpecification"]["family"] == "2.0"


def test_handles_are_permanent_or_transient_as_expected() -> None:
    assert TPM2_RH.OWNER >> 24 == TPM2_HT.PERMANENT
