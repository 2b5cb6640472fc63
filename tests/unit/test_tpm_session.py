"""Salted HMAC sessions (tpm/session.py) and the host-TPM counter client, without a TPM.

Known answers come from elsewhere: KDFa, KDFe, Names and the TPM's side of
the salt from tpm2-pytss (its own implementation), and whole exchanges from
libtpms (tests/vectors/tpm_session.json, recorded on swtpm by
scripts/make_tpm_session_vectors.py): our commands must be the bytes libtpms
accepted, and its responses must verify here, and any changed byte must not.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from sgxvtpm.errors import UsageError
from sgxvtpm.tpm import nvcounter
from sgxvtpm.tpm.constants import TPM2_ALG, TPM2_CC, TPMA_SESSION
from sgxvtpm.tpm.nvcounter import CounterError, HostTpmCounters, counter_public
from sgxvtpm.tpm.session import (
    SALT_LABEL,
    Authorization,
    HmacSession,
    SessionError,
    encrypt_salt,
    kdfa,
    kdfe,
    nv_name,
    public_name,
)
from sgxvtpm.tpm.wire import TpmResponseError, build_header, tpm2b, u16, u32

crypto = pytest.importorskip("tpm2_pytss.internal.crypto")
types = pytest.importorskip("tpm2_pytss.types")

VECTORS = json.loads(
    (Path(__file__).resolve().parent.parent / "vectors" / "tpm_session.json").read_text()
)
HASHES = [TPM2_ALG.SHA1, TPM2_ALG.SHA256, TPM2_ALG.SHA384, TPM2_ALG.SHA512]


@settings(max_examples=60, deadline=None)
@given(
    alg=st.sampled_from(HASHES),
    key=st.binary(max_size=80),
    label=st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), max_size=12),
    u=st.binary(max_size=40),
    v=st.binary(max_size=40),
    octets=st.integers(1, 130),
)
def test_kdfa_matches_tpm2_pytss(
    alg: int, key: bytes, label: str, u: bytes, v: bytes, octets: int
) -> None:
    expected = crypto._kdfa(alg, key, label.encode(), u, v, 8 * octets)
    assert kdfa(alg, key, label.encode(), u, v, 8 * octets) == expected
    # A label given with its NUL is the same label (Part 1, 11.4.10.2).
    assert kdfa(alg, key, label.encode() + b"\x00", u, v, 8 * octets) == expected


@settings(max_examples=60, deadline=None)
@given(
    alg=st.sampled_from(HASHES),
    z=st.binary(min_size=1, max_size=66),
    u=st.binary(max_size=66),
    v=st.binary(max_size=66),
    octets=st.integers(1, 130),
)
def test_kdfe_matches_tpm2_pytss(alg: int, z: bytes, u: bytes, v: bytes, octets: int) -> None:
    expected = crypto.kdfe(alg, z, SALT_LABEL, u, v, 8 * octets)
    assert kdfe(alg, z, SALT_LABEL, u, v, 8 * octets) == expected
    assert kdfe(alg, z, b"SECRET", u, v, 8 * octets) == expected


def _key_pem(kind: str) -> bytes:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if kind == "rsa":
        key = rsa.generate_private_key(65537, 2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1() if kind == "p256" else ec.SECP384R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.mark.parametrize("kind", ["rsa", "p256", "p384"])
def test_salt_is_what_the_tpm_decrypts(kind: str) -> None:
    """tpm2-pytss's TPM-side seed recovery (RSA-OAEP or ECDH + KDFe) gets our salt."""
    pem = _key_pem(kind)
    public = types.TPM2B_PUBLIC.from_pem(pem).publicArea
    sensitive = types.TPMT_SENSITIVE.from_pem(pem)
    salt, encrypted = encrypt_salt(public.marshal())
    assert len(salt) == 32  # the key's nameAlg, SHA-256
    assert crypto._secret_to_seed(sensitive, public, SALT_LABEL, encrypted) == salt
    assert encrypt_salt(public.marshal())[0] != salt  # fresh every time


def test_salt_refuses_a_key_it_cannot_encrypt_to() -> None:
    # TPMT_PUBLIC of a KEYEDHASH object: an HMAC key has no public key to encrypt to.
    keyed_hash = u16(TPM2_ALG.KEYEDHASH) + u16(TPM2_ALG.SHA256) + u32(0) + tpm2b(b"")
    keyed_hash += u16(TPM2_ALG.NULL) + tpm2b(bytes(32))
    with pytest.raises(ValueError, match="unsupported key type"):
        encrypt_salt(keyed_hash)


@pytest.mark.parametrize("kind", ["rsa", "p256"])
def test_public_name_matches_tpm2_pytss(kind: str) -> None:
    public = types.TPM2B_PUBLIC.from_pem(_key_pem(kind)).publicArea
    assert public_name(public.marshal()) == bytes(public.get_name())


@given(index=st.integers(0x01000000, 0x013FFFFF), written=st.booleans())
def test_nv_name_matches_tpm2_pytss(index: int, written: bool) -> None:
    ours = counter_public(index, written)
    theirs = types.TPMS_NV_PUBLIC(
        nvIndex=index,
        nameAlg=TPM2_ALG.SHA256,
        attributes=int.from_bytes(ours[6:10], "big"),
        dataSize=8,
    )
    assert theirs.marshal() == ours
    assert nv_name(ours) == bytes(theirs.get_name())


# ---------------------------------------------------------------- libtpms' answers


def _replay(
    vector: dict[str, Any], change: Callable[[int, bytes], bytes] | None = None
) -> tuple[HostTpmCounters, list[int]]:
    """HostTpmCounters over the recorded exchanges; ``change(i, response)`` may alter one."""
    exchanges = [(bytes.fromhex(c), bytes.fromhex(r)) for c, r in vector["exchanges"]]
    salts = iter([(bytes.fromhex(s), bytes.fromhex(e)) for s, e in vector["salts"]])
    position = iter(range(len(exchanges)))

    def transact(command: bytes) -> bytes:
        code = int.from_bytes(command[6:10], "big")
        i = next(position, len(exchanges))
        if i == len(exchanges) or int.from_bytes(exchanges[i][0][6:10], "big") != code:
            assert code == TPM2_CC.FlushContext  # a refused answer, then our clean-up
            return build_header(0x8001, 10, 0)
        recorded, response = exchanges[i]
        if code != TPM2_CC.StartAuthSession:  # its salt encryption is randomized
            assert command == recorded
        return response if change is None else change(i, response)

    rng = random.Random(vector["seed"])
    secret = rng.randbytes(32)

    def recorded_salt(public: bytes, rng_: Callable[[int], bytes]) -> tuple[bytes, bytes]:
        if public[:2] == TPM2_ALG.RSA.to_bytes(2, "big"):
            rng_(32)  # the RSA salt came from rng when recorded
        return next(salts)

    counters = HostTpmCounters(
        transact,
        vector["key_handle"],
        bytes.fromhex(vector["key_name"]),
        secret,
        rng=rng.randbytes,
    )
    real = nvcounter.encrypt_salt
    nvcounter.encrypt_salt = recorded_salt  # type: ignore[assignment]
    try:
        values = [getattr(counters, op)("c") for op in vector["ops"]]
    finally:
        nvcounter.encrypt_salt = real  # type: ignore[assignment]
    return counters, values


@pytest.mark.parametrize("key", ["rsa2048", "ecc_p256"])
def test_recorded_libtpms_exchanges_replay_byte_for_byte(key: str) -> None:
    vector = VECTORS[key]
    assert public_name(bytes.fromhex(vector["key_public"])) == bytes.fromhex(vector["key_name"])
    _, values = _replay(vector)
    assert values == vector["values"]


def _authenticated(vector: dict[str, Any]) -> list[int]:
    """Positions of the recorded responses that carry our session."""
    return [
        i
        for i, (c, _) in enumerate(vector["exchanges"])
        if int.from_bytes(bytes.fromhex(c)[6:10], "big")
        in (TPM2_CC.NV_DefineSpace, TPM2_CC.NV_Increment, TPM2_CC.NV_Read)
    ]


def _unauthenticated(command: bytes, response: bytes) -> set[int]:
    """Offsets of a response's bytes no HMAC covers: a password session's attributes.

    NV_DefineSpace answers the owner's password session before ours with an
    empty nonce, its attributes and an empty HMAC; we use none of it.
    """
    if int.from_bytes(command[6:10], "big") != TPM2_CC.NV_DefineSpace:
        return set()
    params = int.from_bytes(response[10:14], "big")
    return {10 + 4 + params + 2}


@pytest.mark.parametrize("key", ["rsa2048", "ecc_p256"])
def test_every_changed_byte_of_an_authenticated_response_is_refused(key: str) -> None:
    """Each byte of each NV_DefineSpace, NV_Increment and NV_Read response libtpms
    gave, changed in its low and its high bit: never accepted."""
    vector = VECTORS[key]
    checked = 0
    for target in _authenticated(vector):
        command, response = (bytes.fromhex(x) for x in vector["exchanges"][target])
        skip = _unauthenticated(command, response)
        for where in range(len(response)):
            if where in skip:
                continue
            for mask in (0x01, 0x80):

                def change(
                    i: int, r: bytes, target: int = target, where: int = where, mask: int = mask
                ) -> bytes:
                    if i != target:
                        return r
                    return r[:where] + bytes([r[where] ^ mask]) + r[where + 1 :]

                with pytest.raises(CounterError):
                    _replay(vector, change)
                checked += 1
    assert checked > 500  # every byte of 4-5 responses, twice


def test_a_response_with_a_session_more_than_sent_is_refused() -> None:
    """The host adds a session answer in front of ours: not the TPM's response."""
    vector = VECTORS["ecc_p256"]
    target = _authenticated(vector)[-1]  # the last NV_Read

    def change(i: int, r: bytes) -> bytes:
        if i != target:
            return r
        extra = tpm2b(b"") + bytes([1]) + tpm2b(b"")  # a password session's answer
        params = int.from_bytes(r[10:14], "big")
        body = r[10 : 14 + params] + extra + r[14 + params :]
        return build_header(0x8002, 10 + len(body), 0) + body

    with pytest.raises(CounterError, match="does not authenticate"):
        _replay(vector, change)


# ---------------------------------------------------------------- the session object


def _session() -> HmacSession:
    return HmacSession.from_start(0x02000000, b"t" * 32, b"c" * 32, b"s" * 32)


@given(response=st.binary(max_size=120))
def test_any_response_bytes_verify_or_raise_the_protocol_errors(response: bytes) -> None:
    session = _session()
    session.command(TPM2_CC.NV_Read, [1, 1], [b"n", b"n"], b"", Authorization(b"n", b"a"), 0)
    try:
        session.response(response)
    except TpmResponseError:
        return
    except SessionError:
        with pytest.raises(UsageError, match="failed authentication"):
            session.command(TPM2_CC.NV_Read, [1], [b"n"], b"", Authorization(b"n"), 0)
        return
    pytest.fail("random bytes authenticated")


def test_a_response_without_a_command_is_misuse() -> None:
    with pytest.raises(UsageError, match="no command is waiting"):
        _session().response(build_header(0x8002, 10, 0))


def test_decrypt_session_encrypts_only_the_first_parameter() -> None:
    session = _session()
    secret = b"authValue-of-the-new-index"
    params = len(secret).to_bytes(2, "big") + secret + b"public"
    command = session.command(
        TPM2_CC.NV_DefineSpace,
        [0x40000001],
        [(0x40000001).to_bytes(4, "big")],
        params,
        Authorization(b""),
        TPMA_SESSION.DECRYPT,
    )
    assert secret not in command
    tail = command[-len(params) :]  # the parameters come last (Part 1, 18.2)
    assert tail[:2] == len(secret).to_bytes(2, "big")
    assert tail.endswith(b"public")
