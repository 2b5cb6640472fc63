"""The small CBOR codec of RA-TLS evidence (sgxvtpm.util.cbor), RFC 8949."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgxvtpm.util import cbor

keys = st.integers(0, 2**64 - 1) | st.binary(max_size=8) | st.text(max_size=8)
scalars = keys
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(keys, inner, max_size=4)
        | st.builds(cbor.Tag, st.integers(0, 2**64 - 1), inner)
    ),
    max_leaves=12,
)


@given(values)
def test_round_trip(value: cbor.Value) -> None:
    assert cbor.decode(cbor.encode(value)) == value


@given(st.binary(max_size=64))
def test_any_bytes_decode_or_raise_cbor_error(data: bytes) -> None:
    try:
        value = cbor.decode(data)
    except cbor.CborError:
        return
    # What decodes re-encodes (maybe shorter: decode accepts non-preferred lengths).
    assert cbor.decode(cbor.encode(value)) == value
    assert len(cbor.encode(value)) <= len(data)


@given(values, st.data())
def test_truncation_always_raises(value: cbor.Value, data: st.DataObject) -> None:
    raw = cbor.encode(value)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(cbor.CborError):
        cbor.decode(raw[:cut])


@pytest.mark.parametrize(
    ("value", "hex_"),
    [
        # RFC 8949 Appendix A examples.
        (0, "00"),
        (23, "17"),
        (24, "1818"),
        (1000, "1903e8"),
        (1000000, "1a000f4240"),
        (18446744073709551615, "1bffffffffffffffff"),
        (b"", "40"),
        (b"\x01\x02\x03\x04", "4401020304"),
        ("IETF", "6449455446"),
        ("\u00fc", "62c3bc"),
        ([1, [2, 3], [4, 5]], "8301820203820405"),
        ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
        (cbor.Tag(1, 1363896240), "c11a514b67b0"),
        # Gramine's evidence tag: 60000 needs a 2-byte argument.
        (cbor.Tag(60000, []), "d9ea6080"),
    ],
)
def test_rfc8949_examples(value: cbor.Value, hex_: str) -> None:
    assert cbor.encode(value).hex() == hex_
    assert cbor.decode(bytes.fromhex(hex_)) == value


@pytest.mark.parametrize(
    ("hex_", "why"),
    [
        ("20", "major type 1 (negative integer)"),
        ("f5", "simple value true"),
        ("fb3ff199999999999a", "float"),
        ("5f42010243030405ff", "indefinite byte string"),
        ("9f01ff", "indefinite array"),
        ("1c", "reserved additional information"),
        ("0000", "trailing bytes"),
        ("a2616101616102", "duplicate map key"),
        ("62c328", "invalid UTF-8"),
        ("a1800102", "array as map key"),
        ("5a00000010", "byte string longer than the input"),
        ("81" * (cbor.MAX_DEPTH + 2) + "00", "nesting too deep"),
    ],
)
def test_refused(hex_: str, why: str) -> None:
    with pytest.raises(cbor.CborError):
        cbor.decode(bytes.fromhex(hex_))


def test_non_preferred_length_is_accepted_as_libcbor_does() -> None:
    # 0x18 0x01 is a well-formed (not preferred) encoding of 1.
    assert cbor.decode(bytes.fromhex("1801")) == 1


@pytest.mark.parametrize("value", [-1, True, 1.5, None, 2**64])
def test_encode_refuses_unsupported(value: object) -> None:
    with pytest.raises(ValueError):
        cbor.encode(value)  # type: ignore[arg-type]
