"""HMAC authorization sessions salted to a TPM key: the caller's side, sans-IO.

What a caller needs to talk to a TPM through a relay it does not trust
(TPM 2.0 Library Part 1, Architecture): the salt is encrypted to a TPM key
whose name the caller already knows, so only that TPM learns the session key;
each command carries an HMAC over its cpHash and a fresh nonceCaller, and each
response an HMAC over its rpHash, the TPM's new nonce and that nonceCaller.
A relay can drop, delay or reorder bytes; it cannot make a response verify
that the TPM did not give to *this* command.

- KDFa (Part 1, 11.4.10.2) and KDFe (11.4.10.3);
- salt encryption to the tpmKey (Part 1, 19.6.13, Annex B.10.3 for RSA-OAEP
  with the label "SECRET", Annex C.6.1 for ECDH with KDFe);
- the session key, KDFa(authHash, salt, "ATH", nonceTPM, nonceCaller)
  (19.6.11, no bind entity);
- command and response HMACs (19.6.5, equations 59 and 60), with the
  entity's authValue after the session key and its trailing zeros removed
  (19.6.4.3);
- parameter encryption of a command's first TPM2B with AES-CFB keyed by KDFa
  "CFB" (21.3).

Errors: a response whose HMAC does not verify, or that lacks the session,
raises :class:`SessionError` (one opaque error; the session is then broken
for good). A session used after that raises :class:`~sgxvtpm.errors.UsageError`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from sgxvtpm.errors import RemoteProtocolError, UsageError
from sgxvtpm.tpm.constants import (
    HEADER_SIZE,
    TPM2_ALG,
    TPM2_CC,
    TPM2_RC,
    TPM2_RH,
    TPM2_ST,
    TPMA_SESSION,
)
from sgxvtpm.tpm.ek import public_key_from_tpmt
from sgxvtpm.tpm.wire import (
    Reader,
    TpmResponseError,
    build_command,
    parse_header,
    response_code,
    tpm2b,
    u8,
    u16,
    u32,
)

Random = Callable[[int], bytes]

_HASHES: dict[int, str] = {
    TPM2_ALG.SHA1: "sha1",
    TPM2_ALG.SHA256: "sha256",
    TPM2_ALG.SHA384: "sha384",
    TPM2_ALG.SHA512: "sha512",
}
_PYCA: dict[int, type[hashes.HashAlgorithm]] = {
    TPM2_ALG.SHA1: hashes.SHA1,
    TPM2_ALG.SHA256: hashes.SHA256,
    TPM2_ALG.SHA384: hashes.SHA384,
    TPM2_ALG.SHA512: hashes.SHA512,
}
#: TPM_SE_HMAC (Part 2, 6.11).
TPM_SE_HMAC = 0x00
#: The label of a session salt (Part 1, 19.6.13): "SECRET" with its NUL.
SALT_LABEL = b"SECRET\x00"
#: The AES-128-CFB TPMT_SYM_DEF of our sessions' parameter encryption.
AES128_CFB = u16(TPM2_ALG.AES) + u16(128) + u16(TPM2_ALG.CFB)


class SessionError(RemoteProtocolError):
    """A TPM response did not authenticate: wrong HMAC, no session, or bad layout.

    One error for every reason, so a relay learns nothing from which check
    failed. The relay (or the TPM behind it) is not the one we pinned, or it
    replayed, changed or forged bytes: do not trust its answers; the session
    is closed.
    """


def hash_name(alg: int) -> str:
    """hashlib's name of a TPM_ALG_ID hash; ValueError if not SHA-1/2."""
    try:
        return _HASHES[alg]
    except KeyError:
        raise ValueError(f"unsupported hash algorithm {alg:#x}") from None


def digest(alg: int, data: bytes) -> bytes:
    return hashlib.new(hash_name(alg), data).digest()


def digest_size(alg: int) -> int:
    return hashlib.new(hash_name(alg)).digest_size


def _label(label: bytes) -> bytes:
    # Part 1, 11.4.10.2: a label that does not end in a NUL gets one.
    return label if label.endswith(b"\x00") else label + b"\x00"


def kdfa(
    alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """KDFa: SP 800-108 counter mode with HMAC (Part 1, 11.4.10.2)."""
    if bits <= 0 or bits % 8:
        raise ValueError(f"KDFa output must be a positive multiple of 8 bits, got {bits}")
    name = hash_name(alg)
    fixed = _label(label) + context_u + context_v + u32(bits)
    out = b""
    counter = 1
    while len(out) < bits // 8:
        out += hmac.new(key, u32(counter) + fixed, name).digest()
        counter += 1
    return out[: bits // 8]


def kdfe(alg: int, z: bytes, use: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe: SP 800-56A concatenation KDF over the hash (Part 1, 11.4.10.3)."""
    if bits <= 0 or bits % 8:
        raise ValueError(f"KDFe output must be a positive multiple of 8 bits, got {bits}")
    out = b""
    counter = 1
    while len(out) < bits // 8:
        out += digest(alg, u32(counter) + z + _label(use) + party_u + party_v)
        counter += 1
    return out[: bits // 8]


def public_name(tpmt_public: bytes) -> bytes:
    """The Name of an object: nameAlg || H_nameAlg(public area) (Part 1, 16).

    ``tpmt_public`` is the TPMT_PUBLIC (no size field); :func:`nv_name` is
    the same for a TPMS_NV_PUBLIC, whose nameAlg follows the index.
    """
    r = Reader(tpmt_public)
    r.u16()  # type
    alg = r.u16()
    return u16(alg) + digest(alg, tpmt_public)


def nv_name(nv_public: bytes) -> bytes:
    """The Name of an NV index from its TPMS_NV_PUBLIC contents (Part 1, 16)."""
    r = Reader(nv_public)
    r.u32()  # nvIndex
    alg = r.u16()
    return u16(alg) + digest(alg, nv_public)


# ---------------------------------------------------------------- salt


def encrypt_salt(tpmt_public: bytes, rng: Random = os.urandom) -> tuple[bytes, bytes]:
    """A fresh salt and its encryption to the key in ``tpmt_public``: (salt, encryptedSalt).

    RSA: OAEP with the key's nameAlg and the label "SECRET" (Annex B.10.3).
    ECC: an ephemeral key on the key's curve; the salt is
    KDFe(nameAlg, Z, "SECRET", ephemeral x, key x) and encryptedSalt the
    ephemeral TPMS_ECC_POINT (Annex C.6.1). ``rng`` feeds the RSA salt only;
    the ECC ephemeral key comes from ``cryptography``.
    """
    r = Reader(tpmt_public)
    key_type, name_alg = r.u16(), r.u16()
    size = digest_size(name_alg)
    key = public_key_from_tpmt(tpmt_public)
    if key_type == TPM2_ALG.RSA and isinstance(key, rsa.RSAPublicKey):
        salt = rng(size)
        algorithm = _PYCA[name_alg]()
        oaep = padding.OAEP(padding.MGF1(algorithm), algorithm, SALT_LABEL)
        return salt, key.encrypt(salt, oaep)
    if key_type == TPM2_ALG.ECC and isinstance(key, ec.EllipticCurvePublicKey):
        ephemeral = ec.generate_private_key(key.curve)
        width = (key.curve.key_size + 7) // 8
        ours = ephemeral.public_key().public_numbers()
        ex, ey = ours.x.to_bytes(width, "big"), ours.y.to_bytes(width, "big")
        z = ephemeral.exchange(ec.ECDH(), key)
        theirs = key.public_numbers().x.to_bytes(width, "big")
        salt = kdfe(name_alg, z, SALT_LABEL, ex, theirs, 8 * size)
        return salt, tpm2b(ex) + tpm2b(ey)
    raise ValueError(f"a session cannot be salted to a key of type {key_type:#x}")


# ---------------------------------------------------------------- StartAuthSession


def start_auth_session(
    tpm_key: int,
    nonce_caller: bytes,
    encrypted_salt: bytes,
    auth_hash: int = TPM2_ALG.SHA256,
    symmetric: bytes = AES128_CFB,
) -> bytes:
    """TPM2_StartAuthSession (Part 3, 11.1): an HMAC session, unbound, salted to ``tpm_key``."""
    params = (
        tpm2b(nonce_caller) + tpm2b(encrypted_salt) + u8(TPM_SE_HMAC) + symmetric + u16(auth_hash)
    )
    return build_command(TPM2_CC.StartAuthSession, params, [tpm_key, TPM2_RH.NULL])


def parse_start_auth_session(response: bytes) -> tuple[int, bytes]:
    """sessionHandle and nonceTPM of a successful TPM2_StartAuthSession response."""
    rc = response_code(response)
    if rc != TPM2_RC.SUCCESS:
        raise TpmResponseError(rc, TPM2_CC.StartAuthSession)
    r = Reader(response, HEADER_SIZE)
    handle = r.u32()
    nonce = r.tpm2b()
    r.done()
    return handle, nonce


# ---------------------------------------------------------------- the session


@dataclass(frozen=True)
class Authorization:
    """One handle a command authorizes with our session: its Name and authValue.

    ``auth_value`` is empty for a session that only encrypts (it then
    authorizes nothing, Part 1 19.6.5).
    """

    name: bytes
    auth_value: bytes = b""


@dataclass
class HmacSession:
    """The caller's state of one salted HMAC session (sans-IO).

    Build it with :meth:`from_start` once TPM2_StartAuthSession answered;
    then :meth:`command` and :meth:`response` for each command, in order.
    Each command gets a fresh nonceCaller from ``rng``; the TPM's nonce
    rolls with each verified response.
    """

    handle: int
    session_key: bytes
    nonce_tpm: bytes
    auth_hash: int = TPM2_ALG.SHA256
    rng: Random = os.urandom
    _nonce_caller: bytes = b""
    _pending: tuple[int, bytes, int] | None = None  # command code, authValue, sessions
    _broken: bool = field(default=False)

    @classmethod
    def from_start(
        cls,
        handle: int,
        nonce_tpm: bytes,
        nonce_caller: bytes,
        salt: bytes,
        auth_hash: int = TPM2_ALG.SHA256,
        rng: Random = os.urandom,
    ) -> HmacSession:
        """The session after StartAuthSession: sessionKey = KDFa(salt, "ATH", ...) (19.6.11)."""
        size = digest_size(auth_hash)
        key = kdfa(auth_hash, salt, b"ATH", nonce_tpm, nonce_caller, 8 * size)
        return cls(handle, key, nonce_tpm, auth_hash, rng)

    def _hmac_key(self, auth_value: bytes) -> bytes:
        return self.session_key + auth_value.rstrip(b"\x00")

    def _check_usable(self) -> None:
        if self._broken:
            raise UsageError("this TPM session failed authentication earlier; start a new one")

    def command(
        self,
        code: int,
        handles: Sequence[int],
        names: Sequence[bytes],
        params: bytes,
        auth: Authorization,
        attributes: int,
        password_sessions: Sequence[bytes] = (),
    ) -> bytes:
        """The complete command, with our session after any ``password_sessions``.

        With TPMA_SESSION.DECRYPT in ``attributes`` the first parameter must be a
        TPM2B; its data is encrypted before cpHash is taken (Part 1, 18.7).
        ``names`` are the Names of ``handles``, in order, for cpHash.
        """
        self._check_usable()
        if len(names) != len(handles):
            raise ValueError("one Name per handle")
        nonce = self.rng(digest_size(self.auth_hash))
        if attributes & TPMA_SESSION.DECRYPT:
            params = self._cfb(params, auth.auth_value, nonce, self.nonce_tpm, encrypt=True)
        cp_hash = digest(self.auth_hash, u32(code) + b"".join(names) + params)
        mac = hmac.new(
            self._hmac_key(auth.auth_value),
            cp_hash + nonce + self.nonce_tpm + u8(attributes),
            hash_name(self.auth_hash),
        ).digest()
        ours = u32(self.handle) + tpm2b(nonce) + u8(attributes) + tpm2b(mac)
        self._nonce_caller = nonce
        self._pending = (code, auth.auth_value, len(password_sessions) + 1)
        return build_command(code, params, handles, [*password_sessions, ours])

    def response(self, response: bytes, handles: int = 0) -> bytes:
        """The parameters of a successful ``response``, once its HMAC verified.

        Ours is the last TPMS_AUTH_RESPONSE; a password session's answer before
        it carries nothing authenticated, and nothing we use.
        An error code raises TpmResponseError (the session is then unchanged on
        the TPM, Part 1 19.6.2); anything that does not authenticate raises
        SessionError and breaks this session.
        """
        self._check_usable()
        if self._pending is None:
            raise UsageError("no command is waiting for a response on this session")
        code, auth_value, count = self._pending
        self._pending = None
        try:
            rc = response_code(response)
        except ValueError:  # TpmProtocolError: not even a TPM response
            self._broken = True
            raise SessionError("the TPM response does not authenticate") from None
        if rc != TPM2_RC.SUCCESS:
            raise TpmResponseError(rc, code)
        try:
            params, auth_area = _split_response(response, handles)
            if len(auth_area) != count:  # one answer per session sent (Part 1, 18.10)
                raise ValueError("wrong number of sessions")
            nonce_tpm, attributes, mac = auth_area[-1]
        except ValueError:
            self._broken = True
            raise SessionError("the TPM response does not authenticate") from None
        rp_hash = digest(self.auth_hash, u32(TPM2_RC.SUCCESS) + u32(code) + params)
        expected = hmac.new(
            self._hmac_key(auth_value),
            rp_hash + nonce_tpm + self._nonce_caller + u8(attributes),
            hash_name(self.auth_hash),
        ).digest()
        if not hmac.compare_digest(mac, expected):
            self._broken = True
            raise SessionError("the TPM response does not authenticate")
        self.nonce_tpm = nonce_tpm
        return params

    def _cfb(
        self, params: bytes, auth_value: bytes, newer: bytes, older: bytes, *, encrypt: bool
    ) -> bytes:
        # Part 1, 21.3: KDFa(hash, sessionKey || authValue, "CFB", nonceNewer,
        # nonceOlder, 128 + 128) gives the AES-128 key, then the IV.
        r = Reader(params)
        data = r.tpm2b()
        material = kdfa(self.auth_hash, self._hmac_key(auth_value), b"CFB", newer, older, 256)
        cipher = Cipher(algorithms.AES(material[:16]), CFB(material[16:]))
        op = cipher.encryptor() if encrypt else cipher.decryptor()
        return tpm2b(op.update(data) + op.finalize()) + params[2 + len(data) :]


def _split_response(response: bytes, handles: int) -> tuple[bytes, list[tuple[bytes, int, bytes]]]:
    """(parameters, [(nonceTPM, sessionAttributes, hmac), ...]) of a TPM_ST_SESSIONS response.

    ValueError (TpmProtocolError is one) for any other layout.
    """
    header = parse_header(response)
    if header.tag != TPM2_ST.SESSIONS or header.size != len(response):
        raise ValueError("not a response with sessions")
    r = Reader(response, HEADER_SIZE)
    r.take(4 * handles)
    params = r.take(r.u32())
    sessions = []
    while r.remaining:
        sessions.append((r.tpm2b(), r.u8(), r.tpm2b()))
    return params, sessions
