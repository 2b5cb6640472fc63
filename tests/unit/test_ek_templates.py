"""EK templates, handles and the TPMT_PUBLIC parser (pure logic, no TPM)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from sgxvtpm.tpm.constants import TPM2_ALG, TPM2_ECC_CURVE
from sgxvtpm.tpm.ek import (
    EK_PROFILES,
    POLICY_A_SHA256,
    POLICY_B_SHA384,
    profile,
    public_key_from_tpmt,
)
from sgxvtpm.tpm.nv import EK_CERT_NV_ATTRIBUTES
from sgxvtpm.tpm.wire import Reader, TpmProtocolError, tpm2b, u16, u32


def test_policy_a_is_the_ek_profile_constant() -> None:
    # EK Credential Profile B.3.2 lists this digest for PolicySecret(TPM_RH_ENDORSEMENT).
    assert POLICY_A_SHA256.hex() == (
        "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
    )
    assert len(POLICY_B_SHA384) == 48


@pytest.mark.parametrize(
    ("alg", "handle", "index", "name_alg", "attrs", "unique_len"),
    [
        ("rsa2048", 0x81010001, 0x01C00002, TPM2_ALG.SHA256, 0x000300B2, 256),
        ("ecc-p256", 0x81010002, 0x01C0000A, TPM2_ALG.SHA256, 0x000300B2, 32),
        ("ecc-p384", 0x81010016, 0x01C00016, TPM2_ALG.SHA384, 0x000300F2, 0),
        ("rsa3072", 0x8101001C, 0x01C0001C, TPM2_ALG.SHA384, 0x000300F2, 0),
    ],
)
def test_profiles(
    alg: str, handle: int, index: int, name_alg: int, attrs: int, unique_len: int
) -> None:
    p = profile(alg)
    assert (p.handle, p.nv_index) == (handle, index)
    r = Reader(p.template)
    key_type = r.u16()
    assert r.u16() == name_alg
    assert r.u32() == attrs
    policy = r.tpm2b()
    assert policy == (POLICY_A_SHA256 if name_alg == TPM2_ALG.SHA256 else POLICY_B_SHA384)
    assert r.u16() == TPM2_ALG.AES
    assert r.u16() == (128 if name_alg == TPM2_ALG.SHA256 else 256)
    assert r.u16() == TPM2_ALG.CFB
    assert r.u16() == TPM2_ALG.NULL  # scheme
    if key_type == TPM2_ALG.RSA:
        assert r.u16() == int(alg[3:])
        assert r.u32() == 0
        assert r.tpm2b() == bytes(unique_len)
    else:
        assert r.u16() in (TPM2_ECC_CURVE.NIST_P256, TPM2_ECC_CURVE.NIST_P384)
        assert r.u16() == TPM2_ALG.NULL  # kdf
        assert r.tpm2b() == bytes(unique_len)
        assert r.tpm2b() == bytes(unique_len)
    r.done()


def test_unknown_alg() -> None:
    with pytest.raises(ValueError, match="rsa2048"):
        profile("rsa1024")
    assert set(EK_PROFILES) == {"rsa2048", "ecc-p256", "ecc-p384", "rsa3072"}


def test_nv_attributes_match_swtpm_setup() -> None:
    # tpm2_nvreadpublic on a swtpm_setup 0.7.1 TPM: 0x62072001 = ours | WRITTEN.
    assert int(EK_CERT_NV_ATTRIBUTES) | (1 << 29) == 0x62072001


def _rsa_tpmt(key: rsa.RSAPublicKey) -> bytes:
    n = key.public_numbers().n.to_bytes(key.key_size // 8, "big")
    params = u16(TPM2_ALG.NULL) + u16(TPM2_ALG.NULL) + u16(key.key_size) + u32(0)
    return u16(TPM2_ALG.RSA) + u16(TPM2_ALG.SHA256) + u32(0x40072) + tpm2b(b"") + params + tpm2b(n)


def _ecc_tpmt(key: ec.EllipticCurvePublicKey) -> bytes:
    nums = key.public_numbers()
    size = (key.curve.key_size + 7) // 8
    params = u16(TPM2_ALG.AES) + u16(128) + u16(TPM2_ALG.CFB) + u16(TPM2_ALG.ECDSA)
    params += u16(TPM2_ALG.SHA256) + u16(TPM2_ECC_CURVE.NIST_P384) + u16(TPM2_ALG.NULL)
    point = tpm2b(nums.x.to_bytes(size, "big")) + tpm2b(nums.y.to_bytes(size, "big"))
    return u16(TPM2_ALG.ECC) + u16(TPM2_ALG.SHA384) + u32(0) + tpm2b(b"\1" * 48) + params + point


def test_public_key_from_tpmt_rsa_and_ecc() -> None:
    rkey = rsa.generate_private_key(65537, 2048).public_key()
    assert public_key_from_tpmt(_rsa_tpmt(rkey)) == rkey
    ekey = ec.generate_private_key(ec.SECP384R1()).public_key()
    assert public_key_from_tpmt(_ecc_tpmt(ekey)) == ekey


def test_public_key_from_tpmt_rejects_trailing_and_truncated() -> None:
    ekey = ec.generate_private_key(ec.SECP384R1()).public_key()
    area = _ecc_tpmt(ekey)
    with pytest.raises(TpmProtocolError):
        public_key_from_tpmt(area + b"\0")
    with pytest.raises(TpmProtocolError):
        public_key_from_tpmt(area[:-1])


_VALID = _ecc_tpmt(ec.generate_private_key(ec.SECP384R1()).public_key())


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(_VALID[: draw(st.integers(0, len(_VALID)))])
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data) + draw(st.binary(max_size=4))


@given(st.one_of(st.binary(max_size=600), _mutated()))
def test_public_key_from_tpmt_any_input(data: bytes) -> None:
    # Any bytes: a key, or ValueError (TpmProtocolError is one); nothing else.
    try:
        key = public_key_from_tpmt(data)
    except ValueError:
        return
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
