"""The fleet, as one manager enclave keeps it (docs/ARCHITECTURE.md, "Many hosts").

Pure logic, no I/O: the manager (``enclaves/manager.py``) runs the sessions
and seals :class:`FleetState` in its registry. What is here:

- the measurement policy between managers: the peer's quote verifies
  against this enclave's own platform root (so both are under the same root),
  same MRSIGNER, the manager product, and an MRENCLAVE the policy allows (this
  enclave's own: the same release);
- invitations: a random token, of which only SHA-256 and an expiry are kept;
  a token is used up by the first join that presents it, whatever comes of it;
- the key wrap: the fleet key encrypted to a joiner's attested manager key
  (ECDH P-256 with a fresh key, HKDF-SHA256, AES-256-GCM), so only the
  enclave holding that private key can read it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgxvtpm.channel import ChannelError, verify_enclave_certificate
from sgxvtpm.enclaves.specs import peer_policy
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.platform.base import EnclaveIdentity, QuoteVerifier, VerifiedQuote
from sgxvtpm.wire import fleet as wire
from sgxvtpm.wire.k1 import FleetInfo, FleetMember

KEY_SIZE = 32
TOKEN_TTL = 600.0  # seconds an invitation is valid
MAX_INVITES = 16  # outstanding invitations kept; the oldest go first
_WRAP_INFO = b"sgxvtpm fleet key wrap v1\x00"


class FleetError(SgxvtpmError):
    """A fleet request refused; the message says why (it goes back to the operator)."""


def accepted_peer(own: EnclaveIdentity, peer: EnclaveIdentity) -> str | None:
    """Why a manager with ``peer``'s identity is not one of ours (None: it is).

    The MRSIGNER/product/SVN part is :func:`peer_policy`'s (checked with the
    quote); here the exact code: the MRENCLAVE must be our own.
    """
    if not peer_policy(own.mrsigner, "manager").accepts(peer):
        return "not a manager enclave of this vendor"
    if peer.mrenclave != own.mrenclave:
        return f"manager code {peer.mrenclave.hex()[:16]} is not allowed by the fleet policy"
    return None


def verify_manager(
    evidence: bytes, own: EnclaveIdentity, verifier: QuoteVerifier
) -> tuple[VerifiedQuote, ec.EllipticCurvePublicKey]:
    """Check a manager's RA-TLS certificate ``evidence``; its quote and key, or FleetError."""
    try:
        policy = peer_policy(own.mrsigner, "manager")
        verified = verify_enclave_certificate(evidence, policy, verifier)
    except ChannelError as exc:
        raise FleetError(f"the peer manager's evidence is refused: {exc}") from None
    why = accepted_peer(own, verified.identity)
    if why is not None:
        raise FleetError(f"the peer manager is refused: {why}")
    key = x509.load_der_x509_certificate(evidence).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise FleetError("the peer manager's key is not ECDSA P-256")
    return verified, key


def _sec1(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _wrap_key(shared: bytes, ephemeral: bytes, recipient: bytes, context: bytes) -> bytes:
    info = _WRAP_INFO + hashlib.sha256(ephemeral + recipient + context).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def wrap(
    secret: bytes, recipient: ec.EllipticCurvePublicKey, context: bytes
) -> tuple[bytes, bytes]:
    """``secret`` for the holder of ``recipient``'s private key: (ephemeral SEC1, wrapped)."""
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    eph = _sec1(ephemeral.public_key())
    kek = _wrap_key(ephemeral.exchange(ec.ECDH(), recipient), eph, _sec1(recipient), context)
    nonce = os.urandom(12)
    return eph, nonce + AESGCM(kek).encrypt(nonce, secret, context)


def unwrap(
    private: ec.EllipticCurvePrivateKey, ephemeral: bytes, wrapped: bytes, context: bytes
) -> bytes:
    """The secret :func:`wrap` made for ``private``; FleetError if it was not, or altered."""
    try:
        eph = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ephemeral)
        kek = _wrap_key(
            private.exchange(ec.ECDH(), eph), ephemeral, _sec1(private.public_key()), context
        )
        return AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], context)
    except (ValueError, InvalidTag) as exc:
        raise FleetError(f"the fleet key does not unwrap: {exc or 'altered'}") from None


def token_hash(token: bytes) -> str:
    return hashlib.sha256(b"sgxvtpm fleet token\x00" + token).hexdigest()


@dataclass
class FleetState:
    """What a manager keeps of its fleet (sealed in its registry)."""

    fleet_id: str = ""
    key: bytes = b""
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    invites: dict[str, float] = field(default_factory=dict)

    @property
    def member(self) -> bool:
        return bool(self.key)

    # -- storage (inside the sealed registry) ---------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "fleet_id": self.fleet_id,
            "key": self.key.hex(),
            "members": self.members,
            "invites": self.invites,
        }

    @classmethod
    def from_json(cls, raw: object) -> FleetState:
        if not raw:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError("fleet state is not an object")
        return cls(
            fleet_id=str(raw["fleet_id"]),
            key=bytes.fromhex(raw["key"]),
            members={str(k): dict(v) for k, v in raw["members"].items()},
            invites={str(k): float(v) for k, v in raw["invites"].items()},
        )

    # -- the operator's requests ------------------------------------------------
    def info(self, self_id: str) -> FleetInfo:
        members = tuple(
            FleetMember(
                platform_id=pid,
                address=str(m.get("address", "")),
                joined=float(m.get("joined", 0.0)),
                mrenclave=str(m.get("mrenclave", "")),
            )
            for pid, m in sorted(self.members.items())
        )
        return FleetInfo(fleet_id=self.fleet_id, self_id=self_id, members=members)

    def invite(
        self, self_id: str, own: EnclaveIdentity, address: str, now: float
    ) -> tuple[bytes, float]:
        """A new one-time token (the fleet is founded here if there is none)."""
        if not self.member:
            self.fleet_id = os.urandom(16).hex()
            self.key = os.urandom(KEY_SIZE)
            self.members = {
                self_id: {"address": address, "joined": now, "mrenclave": own.mrenclave.hex()}
            }
        elif address:
            self.members.setdefault(self_id, {})["address"] = address
        self._expire(now)
        while len(self.invites) >= MAX_INVITES:
            del self.invites[min(self.invites, key=self.invites.__getitem__)]
        token = os.urandom(wire.TOKEN_SIZE)
        expires = now + TOKEN_TTL
        self.invites[token_hash(token)] = expires
        return token, expires

    def leave(self) -> None:
        self.fleet_id, self.key, self.members, self.invites = "", b"", {}, {}

    def remove(self, member: str, self_id: str) -> None:
        if member == self_id:
            raise FleetError("this host cannot remove itself: use fleet leave")
        if member not in self.members:
            raise FleetError(f"no fleet member {member!r}")
        del self.members[member]

    def _expire(self, now: float) -> None:
        self.invites = {h: t for h, t in self.invites.items() if t > now}

    # -- the member's side of a join -------------------------------------------
    def use_token(self, token: bytes, now: float) -> None:
        """Burn ``token``: FleetError unless it was issued here, unused and unexpired."""
        digest = token_hash(token)
        expires = self.invites.pop(digest, None)
        if not self.member:
            raise FleetError("this manager is not in a fleet")
        if expires is None:
            raise FleetError("the token is unknown or was used already")
        if expires <= now:
            raise FleetError("the token has expired")

    def admit(
        self,
        request: wire.Join,
        own: EnclaveIdentity,
        verifier: QuoteVerifier,
        now: float,
    ) -> wire.Joined:
        """Check a join (token first, then the joiner's evidence) and answer it.

        The caller seals the state (the burnt token, the new member) before
        the answer leaves the enclave.
        """
        self.use_token(request.token, now)
        verified, key = verify_manager(request.evidence, own, verifier)
        member_id = verified.platform_id.hex()
        if not member_id:
            raise FleetError("the joiner's quote names no platform")
        self.members[member_id] = {
            "address": request.address,
            "joined": now,
            "mrenclave": verified.identity.mrenclave.hex(),
        }
        context = self._context(request.token)
        ephemeral, wrapped = wrap(self.key, key, context)
        return wire.Joined(
            fleet_id=self.fleet_id,
            member_id=member_id,
            ephemeral=ephemeral,
            wrapped=wrapped,
            members=self.info("").members,
        )

    def _context(self, token: bytes) -> bytes:
        return bytes.fromhex(self.fleet_id) + bytes.fromhex(token_hash(token))

    # -- the joiner's side ------------------------------------------------------
    def joined(
        self, token: bytes, reply: wire.Joined, private: ec.EllipticCurvePrivateKey
    ) -> None:
        """Take the fleet key from a member's answer (FleetError if it does not unwrap)."""
        try:
            fleet_id = bytes.fromhex(reply.fleet_id)
        except ValueError:
            raise FleetError("the member sent a malformed fleet id") from None
        context = fleet_id + bytes.fromhex(token_hash(token))
        key = unwrap(private, reply.ephemeral, reply.wrapped, context)
        if len(key) != KEY_SIZE:
            raise FleetError("the fleet key has the wrong size")
        self.fleet_id = reply.fleet_id
        self.key = key
        self.invites = {}
        self.members = {
            m.platform_id: {"address": m.address, "joined": m.joined, "mrenclave": m.mrenclave}
            for m in reply.members
        }

    def moved_proof(self, vm: str, version: int, to: str) -> bytes:
        """What only a member can say: VM ``vm`` runs on ``to`` from export ``version``."""
        message = b"sgxvtpm fleet moved v1\x00" + f"{vm}\x00{to}\x00{version}".encode()
        return hmac.new(self.vm_key(vm), message, hashlib.sha256).digest()

    def move_proof(self, vm: str, origin: str, blobs: dict[str, bytes]) -> bytes:
        """What only a member can send: the portable blobs of ``vm`` from ``origin``."""
        digest = hashlib.sha256()
        for kind in sorted(blobs):
            digest.update(kind.encode() + b"\x00" + hashlib.sha256(blobs[kind]).digest())
        message = b"sgxvtpm fleet move v1\x00" + f"{vm}\x00{origin}\x00".encode()
        return hmac.new(self.vm_key(vm), message + digest.digest(), hashlib.sha256).digest()

    def vm_key(self, vm_identity: str) -> bytes:
        """The per-VM blob key: HKDF(fleet key, VM identity)."""
        if not self.member:
            raise FleetError("this manager is not in a fleet")
        return HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=bytes.fromhex(self.fleet_id),
            info=b"sgxvtpm fleet vm key v1\x00" + vm_identity.encode(),
        ).derive(self.key)


