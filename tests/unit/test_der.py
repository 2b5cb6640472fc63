"""util/der.py against an independent DER encoder (cryptography's) and known encodings."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given
from hypothesis import strategies as st

from sgxvtpm.util import der


@given(st.integers(0, 2**600), st.integers(0, 2**600))
def test_a_sequence_of_two_integers_is_what_cryptography_encodes(r: int, s: int) -> None:
    # Ecdsa-Sig-Value is SEQUENCE { INTEGER r, INTEGER s }: short and long lengths.
    assert der.tlv(0x30, der.uint(r) + der.uint(s)) == encode_dss_signature(r, s)


@pytest.mark.parametrize(
    ("dotted", "encoded"),
    [
        ("2.5.29.9", "0603551d09"),  # subjectDirectoryAttributes
        ("2.23.133.2.16", "06056781050210"),  # tcg-at-tpmSpecification (swtpm_cert's)
        ("2.5.29.32.0", "0604551d2000"),  # anyPolicy
        ("1.2.840.113741.1.13.1", "06092a864886f84d010d01"),  # Intel SGX extensions
    ],
)
def test_object_identifiers(dotted: str, encoded: str) -> None:
    assert der.oid(dotted).hex() == encoded


def test_a_negative_integer_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        der.uint(-1)
