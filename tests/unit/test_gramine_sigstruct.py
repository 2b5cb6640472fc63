"""SIGSTRUCT as gramine-sgx-sign writes it (.sig), read by platform/gramine/sigstruct.py.

The SIGSTRUCTs here are built field by field as Intel's SDM lays them out
(tests/helpers/gramine_standin.build_sigstruct, an RSA-3072 key with e = 3
as SGX requires), not by the parser's own constants.
"""

from __future__ import annotations

import datetime
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers.gramine_standin import build_sigstruct, sgx_signing_key

from sgxvtpm.platform.gramine import sigstruct
from sgxvtpm.platform.sim.measure import ENCLAVE_ATTRIBUTES


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return sgx_signing_key()


def _sig(key: rsa.RSAPrivateKey, **overrides: object) -> bytes:
    fields: dict[str, object] = {
        "mrenclave": bytes(range(32)),
        "attributes": ENCLAVE_ATTRIBUTES,
        "isv_prod_id": 2,
        "isv_svn": 7,
        "date": datetime.date(2026, 12, 1),
        "misc_select": 0,
    }
    fields.update(overrides)
    return build_sigstruct(key, **fields)  # type: ignore[arg-type]


def test_fields_read_back(key: rsa.RSAPrivateKey) -> None:
    data = _sig(key)
    sig = sigstruct.parse(data)
    modulus_le = key.public_key().public_numbers().n.to_bytes(384, "little")
    assert sig.mrenclave == bytes(range(32))
    assert sig.mrsigner == hashlib.sha256(modulus_le).digest()  # SDM: SHA-256 of MODULUS
    assert (sig.isv_prod_id, sig.isv_svn) == (2, 7)
    assert sig.attributes == ENCLAVE_ATTRIBUTES
    assert sig.date == "2026-12-01"
    assert data[960:992] == sig.mrenclave  # ENCLAVEHASH at 960, as the SDM's table


@settings(max_examples=10, deadline=None)
@given(
    mrenclave=st.binary(min_size=32, max_size=32),
    prod=st.integers(0, 0xFFFF),
    svn=st.integers(0, 0xFFFF),
    misc=st.integers(0, 0xFFFFFFFF),
)
def test_round_trip(key: rsa.RSAPrivateKey, mrenclave: bytes, prod: int, svn: int,
                    misc: int) -> None:  # fmt: skip
    sig = sigstruct.parse(_sig(key, mrenclave=mrenclave, isv_prod_id=prod, isv_svn=svn,
                               misc_select=misc))  # fmt: skip
    assert (sig.mrenclave, sig.isv_prod_id, sig.isv_svn, sig.misc_select) == (
        mrenclave, prod, svn, misc,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("offset", "what"),
    [
        (0, "HEADER"),
        (24, "HEADER"),
        (128, "signature"),  # MODULUS
        (516, "signature"),  # SIGNATURE
        (904, "signature"),  # MISCMASK (signed)
        (930, "signature"),  # ATTRIBUTES (signed)
        (965, "signature"),  # ENCLAVEHASH (signed)
        (1024, "signature"),  # ISVPRODID (signed)
        (1026, "signature"),  # ISVSVN (signed)
        (1100, "Q1"),
        (1500, "Q1/Q2"),
    ],
)
def test_a_flipped_byte_is_refused(key: rsa.RSAPrivateKey, offset: int, what: str) -> None:
    data = bytearray(_sig(key))
    data[offset] ^= 0x01
    with pytest.raises(sigstruct.SigStructError, match=what.split("/")[0]):
        sigstruct.parse(bytes(data))


def test_unsigned_reserved_bytes_do_not_change_the_identity(key: rsa.RSAPrivateKey) -> None:
    """Bytes outside the signed ranges (reserved at 1028) are not part of what is vouched for."""
    data = bytearray(_sig(key))
    data[1030] ^= 0xFF
    assert sigstruct.parse(bytes(data)) == sigstruct.parse(_sig(key))


def test_wrong_size_exponent_and_key_are_refused(key: rsa.RSAPrivateKey) -> None:
    data = _sig(key)
    with pytest.raises(sigstruct.SigStructError, match="1808 bytes"):
        sigstruct.parse(data[:-1])
    with pytest.raises(sigstruct.SigStructError, match="exponent"):
        sigstruct.parse(data[:512] + struct.pack("<I", 65537) + data[516:])
    other = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    with pytest.raises(sigstruct.SigStructError, match="exponent"):
        sigstruct.parse(_sig(other))
    # Another e=3 key's modulus put in place of the signer's: the signature no longer verifies.
    forged = data[:128] + sgx_signing_key().public_key().public_numbers().n.to_bytes(
        384, "little"
    ) + data[512:]
    with pytest.raises(sigstruct.SigStructError, match="signature"):
        sigstruct.parse(forged)
