"""Client identities (operator key, VM keys) and the server's trust in them.

An enclave authenticates its clients with ordinary X.509 client certificates
(SECURITY.md property 14): OpenSSL checks the chain to a trust anchor during
the TLS 1.3 handshake, and :class:`ClientTrust` then checks the key against a pin set.
The manager pins the operator's self-signed certificate (anchor = that very
certificate); an instance trusts the manager's CA certificate as anchor and
pins the SPKI of the VM key bound to it (plus the manager's own).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.util.x509 import CertificateBytes

from .errors import ChannelUsageError
from .evidence import build_self_signed, spki_sha256


@dataclass(frozen=True)
class ClientCredential(CertificateBytes):
    """A client's TLS identity: an ECDSA key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def __post_init__(self) -> None:
        if not isinstance(self.key, ec.EllipticCurvePrivateKey):
            raise ChannelUsageError("client key must be an ECDSA private key")
        if spki_of_key(self.key) != spki_sha256(self.certificate):
            raise ChannelUsageError("client certificate does not belong to the key")

    @classmethod
    def self_signed(cls, key: ec.EllipticCurvePrivateKey, cn: str) -> ClientCredential:
        """A self-signed (non-CA) certificate for ``key``: the operator's form."""
        return cls(key, build_self_signed(key, cn, is_ca=False))

    @classmethod
    def load(cls, key_path: Path | str, cert_path: Path | str) -> ClientCredential:
        """Read an unencrypted PEM private key and a PEM certificate."""
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ChannelUsageError(f"{key_path}: not an ECDSA private key")
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        return cls(key, cert)

    @property
    def spki_sha256(self) -> bytes:
        return spki_sha256(self.certificate)

    def __repr__(self) -> str:  # never print the key
        return f"ClientCredential(subject={self.certificate.subject.rfc4514_string()!r})"


def spki_of_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo of ``key``'s public half."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


@dataclass(frozen=True)
class ClientTrust:
    """Which client certificates a server accepts.

    ``anchors_pem``: PEM certificates a client chain must end in (OpenSSL
    ``cadata``); a self-signed client certificate may be its own anchor.
    ``pinned_spki_sha256``: if not None, the client's leaf key must also be one
    of these SHA-256(SPKI) values. An empty pin set accepts nobody.
    ``in_band``: no client certificate is asked for; the client is anonymous
    to TLS and must prove who it is inside the session (a fleet join carries
    the joiner's attested certificate, sgxvtpm/wire/fleet.py). The session's
    peer then has an empty certificate and SPKI digest.
    """

    anchors_pem: list[bytes]
    pinned_spki_sha256: frozenset[bytes] | None = None
    in_band: bool = False

    def __post_init__(self) -> None:
        if self.in_band:
            if self.anchors_pem or self.pinned_spki_sha256 is not None:
                raise ChannelUsageError("an in-band ClientTrust has no anchors and no pins")
            return
        if not self.anchors_pem:
            raise ChannelUsageError("ClientTrust needs at least one trust anchor")
        for pem in self.anchors_pem:
            try:
                x509.load_pem_x509_certificate(pem)
            except ValueError as exc:
                raise ChannelUsageError(f"trust anchor is not a PEM certificate: {exc}") from None

    @property
    def cadata(self) -> str:
        """The anchors as one PEM string, for ``SSLContext.load_verify_locations``."""
        return "\n".join(pem.decode("ascii").strip() for pem in self.anchors_pem) + "\n"

    def pinned(self, spki_digest: bytes) -> bool:
        """Whether a client key with this SHA-256(SPKI) passes the pin check."""
        return self.pinned_spki_sha256 is None or spki_digest in self.pinned_spki_sha256
