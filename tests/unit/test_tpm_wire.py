"""TPM wire helpers: framing, builders, parsers (no engine; see integration tests)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tpm2_pytss.constants import TPM2_ALG as PYTSS_ALG  # type: ignore[import-untyped]
from tpm2_pytss.constants import TPM2_ECC
from tpm2_pytss.types import TPMT_PUBLIC  # type: ignore[import-untyped]

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_CC, TPM2_RC, TPM2_RH, TPM2_ST, TPMA_NV, TPMA_OBJECT

_BUILDERS: list[Callable[[], bytes]] = [
    lambda: wire.startup(),
    lambda: wire.shutdown(1),
    lambda: wire.get_random(32),
    lambda: wire.read_clock(),
    lambda: wire.get_capability(6, 0x100, 10),
    lambda: wire.pcr_extend(16, b"\x11" * 32),
    lambda: wire.pcr_read([0, 16, 23]),
    lambda: wire.nv_define_space(0x01500000, 32, TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD),
    lambda: wire.nv_undefine_space(0x01500000),
    lambda: wire.nv_write(0x01500000, b"data", 4),
    lambda: wire.nv_read(0x01500000, 4),
    lambda: wire.nv_increment(0x01500001),
    lambda: wire.nv_read_public(0x01500000),
    lambda: wire.create_primary(wire.ecc_p256_template()),
    lambda: wire.create_primary(wire.rsa2048_template(signing=True), TPM2_RH.ENDORSEMENT),
    lambda: wire.evict_control(0x80000000, 0x81000001),
    lambda: wire.flush_context(0x80000000),
    lambda: wire.read_public(0x81000001),
    lambda: wire.sign(0x80000000, b"\x22" * 32),
]


@pytest.mark.parametrize("build", _BUILDERS)
def test_builders_frame_correctly(build: Callable[[], bytes]) -> None:
    cmd = build()
    header = wire.parse_header(cmd)
    assert header.size == len(cmd)
    assert header.tag in (TPM2_ST.NO_SESSIONS, TPM2_ST.SESSIONS)
    assert header.code in {int(c) for c in TPM2_CC}
    assert wire.validate_command(cmd) is None


def test_pcr_extend_layout() -> None:
    digest = hashlib.sha256(b"x").digest()
    cmd = wire.pcr_extend(16, digest)
    expected = (
        struct.pack(">HII", 0x8002, 10 + 4 + 4 + 9 + 4 + 2 + 32, 0x182)
        + struct.pack(">I", 16)
        + struct.pack(">I", 9)  # authorizationSize
        + struct.pack(">IHBH", 0x40000009, 0, 0, 0)  # TPM_RS_PW, empty nonce/hmac
        + struct.pack(">IH", 1, 0x000B)
        + digest
    )
    assert cmd == expected


def test_pcr_extend_rejects_wrong_digest_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        wire.pcr_extend(0, b"\x00" * 20)


def test_pcr_selection_bitmap() -> None:
    sel = wire.pcr_selection([0, 9, 23])
    assert sel == struct.pack(">IHB", 1, 0x000B, 3) + bytes([0x01, 0x02, 0x80])
    with pytest.raises(ValueError):
        wire.pcr_selection([24])


@pytest.mark.parametrize(
    ("template", "alg", "attrs"),
    [
        (wire.ecc_p256_template(), PYTSS_ALG.ECC, wire.STORAGE_ATTRS),
        (wire.ecc_p256_template(signing=True), PYTSS_ALG.ECC, wire.SIGNING_ATTRS),
        (wire.rsa2048_template(), PYTSS_ALG.RSA, wire.STORAGE_ATTRS),
        (wire.rsa2048_template(signing=True), PYTSS_ALG.RSA, wire.SIGNING_ATTRS),
    ],
)
def test_templates_unmarshal_with_tpm2_pytss(template: bytes, alg: int, attrs: int) -> None:
    public, used = TPMT_PUBLIC.unmarshal(template)
    assert used == len(template)
    assert public.type == alg
    assert public.nameAlg == PYTSS_ALG.SHA256
    assert int(public.objectAttributes) == attrs
    if alg == PYTSS_ALG.ECC:
        assert public.parameters.eccDetail.curveID == TPM2_ECC.NIST_P256
    else:
        assert public.parameters.rsaDetail.keyBits == 2048
    restricted = bool(attrs & TPMA_OBJECT.RESTRICTED)
    sym = public.parameters.eccDetail if alg == PYTSS_ALG.ECC else public.parameters.rsaDetail
    assert (sym.symmetric.algorithm == PYTSS_ALG.AES) == restricted


def test_error_response() -> None:
    assert wire.error_response(0x142) == bytes.fromhex("80010000000a00000142")
    assert wire.response_code(wire.error_response(0x922)) == 0x922


# Expected values measured against libtpms 0.9.2 (and asserted against the
# engine itself in tests/integration/test_engine_fuzz.py).
@pytest.mark.parametrize(
    ("command", "rc"),
    [
        (b"", TPM2_RC.INSUFFICIENT),
        (b"\x80", TPM2_RC.INSUFFICIENT),
        (b"\x80\x01\x00\x00", TPM2_RC.INSUFFICIENT),
        (bytes.fromhex("80010000000a"), TPM2_RC.COMMAND_SIZE),
        (bytes.fromhex("8001000000080000"), TPM2_RC.INSUFFICIENT),
        (bytes.fromhex("12340000000c0000017b0008"), TPM2_RC.VALUE),
        (bytes.fromhex("80000000000c0000017b0008"), TPM2_RC.BAD_TAG),
        (bytes.fromhex("00c40000000c0000017b0008"), TPM2_RC.BAD_TAG),
        (bytes.fromhex("80010000000d0000017b0008"), TPM2_RC.COMMAND_SIZE),
        (bytes.fromhex("80010000000b0000017b0008"), TPM2_RC.COMMAND_SIZE),
        (struct.pack(">HII", 0x8001, 4097, 0x17B) + bytes(4087), TPM2_RC.COMMAND_SIZE),
        (struct.pack(">HII", 0x1234, 5000, 0x17B) + bytes(4990), TPM2_RC.VALUE),
        (bytes.fromhex("80010000000c0000017b0008"), None),
        (bytes.fromhex("80010000000a00000999"), None),  # unknown code: the TPM decides
    ],
)
def test_validate_command(command: bytes, rc: int | None) -> None:
    assert wire.validate_command(command) == rc


@given(st.binary(max_size=64))
def test_validate_command_total(data: bytes) -> None:
    rc = wire.validate_command(data)
    assert rc is None or rc in {
        TPM2_RC.INSUFFICIENT,
        TPM2_RC.VALUE,
        TPM2_RC.BAD_TAG,
        TPM2_RC.COMMAND_SIZE,
    }
    if rc is None:
        assert len(data) >= 10
        assert wire.parse_header(data).size == len(data)


def _ok(params: bytes, handles: bytes = b"", sessions: bool = False) -> bytes:
    body = handles + (struct.pack(">I", len(params)) if sessions else b"") + params
    if sessions:
        body += b"\x00\x00\x01\x00\x00"  # one response auth: empty nonce, attrs, empty hmac
    tag = 0x8002 if sessions else 0x8001
    return struct.pack(">HII", tag, 10 + len(body), 0) + body


def test_parse_get_random() -> None:
    assert wire.parse_get_random(_ok(b"\x00\x03abc")) == b"abc"


def test_parse_error_response_raises_response_error() -> None:
    with pytest.raises(wire.TpmResponseError) as info:
        wire.parse_get_random(wire.error_response(0x1DA))
    assert info.value.rc == 0x1DA
    assert "TPM_RC_INSUFFICIENT (parameter 1)" in str(info.value)


def test_parse_pcr_read() -> None:
    sel = wire.pcr_selection([0, 1])
    params = struct.pack(">I", 7) + sel + struct.pack(">I", 2)
    params += wire.tpm2b(b"\x01" * 32) + wire.tpm2b(b"\x02" * 32)
    result = wire.parse_pcr_read(_ok(params))
    assert result.update_counter == 7
    assert result.selection == sel
    assert result.digests == [b"\x01" * 32, b"\x02" * 32]


def test_parse_nv_read_with_sessions() -> None:
    assert wire.parse_nv_read(_ok(wire.tpm2b(b"hello"), sessions=True)) == b"hello"


def test_parse_create_primary() -> None:
    public = wire.ecc_p256_template()
    ticket = struct.pack(">HI", 0x8021, 0x40000001) + wire.tpm2b(b"t" * 32)
    params = wire.tpm2b(public) + wire.tpm2b(b"cd") + wire.tpm2b(b"h" * 32) + ticket
    params += wire.tpm2b(b"\x00\x0b" + b"n" * 32)
    result = wire.parse_create_primary(_ok(params, struct.pack(">I", 0x80000000), True))
    assert result.handle == 0x80000000
    assert result.public == public
    assert result.name == b"\x00\x0b" + b"n" * 32


def test_parse_read_clock() -> None:
    params = struct.pack(">QQIIB", 5, 6, 7, 8, 1)
    assert wire.parse_read_clock(_ok(params)) == wire.TimeInfo(5, 6, 7, 8, True)


def test_size_mismatch_is_protocol_error() -> None:
    good = _ok(b"\x00\x01x")
    with pytest.raises(wire.TpmProtocolError):
        wire.parse_get_random(good + b"\x00")
    with pytest.raises(wire.TpmProtocolError):
        wire.parse_get_random(good[:-1])
    with pytest.raises(wire.TpmProtocolError):
        wire.parse_get_random(good[:9])


#: Every parser of a TPM response in tpm.wire (parse_header reads commands).
_NAMES = sorted(n for n in dir(wire) if n.startswith("parse_") and n != "parse_header")
_PARSERS: list[Callable[[bytes], object]] = [getattr(wire, n) for n in _NAMES]
_PARSERS.append(wire.response_code)


def _parse_or_protocol_error(parse: Callable[[bytes], object], data: bytes) -> object:
    """What a parser answers, or the TPM wire error it raised (any other exception
    propagates and fails the test)."""
    try:
        return parse(data)
    except (wire.TpmProtocolError, wire.TpmResponseError) as exc:
        return exc


@given(st.sampled_from(_PARSERS), st.binary(max_size=200))
def test_parsers_any_bytes(parse: Callable[[bytes], object], data: bytes) -> None:
    assert _parse_or_protocol_error(parse, data) is not None


@given(st.sampled_from(_PARSERS), st.binary(max_size=200))
def test_parsers_any_body_with_valid_header(parse: Callable[[bytes], object], body: bytes) -> None:
    for tag in (0x8001, 0x8002):
        response = struct.pack(">HII", tag, 10 + len(body), 0) + body
        outcome = _parse_or_protocol_error(parse, response)
        assert outcome is not None


def test_parsers_every_prefix_of_valid_responses() -> None:
    sel = wire.pcr_selection([0])
    pcr = _ok(struct.pack(">I", 1) + sel + struct.pack(">I", 1) + wire.tpm2b(b"\x00" * 32))
    for full, parse in [(pcr, wire.parse_pcr_read), (_ok(b"\x00\x02ab"), wire.parse_get_random)]:
        parse(full)
        for n in range(len(full)):
            with pytest.raises(wire.TpmProtocolError):
                parse(full[:n])
