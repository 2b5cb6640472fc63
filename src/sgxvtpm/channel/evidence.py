"""RA-TLS certificates: an X.509 certificate that carries an SGX quote.

The convention is Intel's and Gramine's RA-TLS: the enclave generates a P-256
key, asks the platform for a quote whose 64-byte REPORTDATA is
``SHA-256(DER SubjectPublicKeyInfo) || 32 zero bytes`` and puts the quote into
a non-critical extension of a self-signed certificate for that key. A verifier
who checks the quote, the measurement policy and the binding knows that the
TLS peer holding this key runs inside the measured enclave.

Extension OID: ``1.2.840.113741.1.13.1`` (under Intel's arc), the OID Gramine's
RA-TLS library uses for a raw DCAP quote; reusing it keeps our certificates
readable by existing RA-TLS tooling. The extnValue OCTET STRING holds the raw
quote bytes with no further DER wrapping, as in Gramine. The extension is not
critical so that OpenSSL accepts the certificate as a CA in client-certificate
chains (RFC 5280 section 4.2: unknown critical extensions must be rejected).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sgxvtpm.platform.base import (
    REPORT_DATA_SIZE,
    AttestationError,
    EnclavePlatform,
    MeasurementPolicy,
    QuoteVerifier,
    VerifiedQuote,
)
from sgxvtpm.util.x509 import CertificateBytes, key_usage

from .errors import ChannelUsageError, fail

QUOTE_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")

_DEFAULT_VALIDITY = datetime.timedelta(days=3650)
# Backdate notBefore a little: a verifier whose clock is behind ours must not
# reject a certificate made a moment ago (client certificate checks by OpenSSL).
_BACKDATE = datetime.timedelta(hours=1)


def spki_der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The DER SubjectPublicKeyInfo of ``public_key``."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_sha256(certificate: x509.Certificate) -> bytes:
    """SHA-256 over the certificate's DER SubjectPublicKeyInfo (its pin)."""
    der = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def report_data_for(certificate_spki_der: bytes) -> bytes:
    """REPORTDATA binding a key: SHA-256(SPKI) || 32 zero bytes (RA-TLS)."""
    digest = hashlib.sha256(certificate_spki_der).digest()
    return digest + bytes(REPORT_DATA_SIZE - len(digest))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, is_ca: bool) -> x509.KeyUsage:
    # digitalSignature: TLS 1.3 CertificateVerify (RFC 8446 4.4.3). keyCertSign
    # and cRLSign only for a CA; OpenSSL checks keyCertSign on every issuer.
    return key_usage(digital_signature=True, key_cert_sign=is_ca, crl_sign=is_ca)


def build_self_signed(
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    is_ca: bool,
    extensions: list[x509.ExtensionType] | None = None,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """A self-signed certificate for ``key`` (used for enclave and client identities).

    No extendedKeyUsage: OpenSSL rejects a CA whose EKU lacks clientAuth when it
    verifies a client chain, and our enclave certificates serve as both.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _DEFAULT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(_key_usage(is_ca=is_ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256())


def _check_key(key: ec.EllipticCurvePrivateKey) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve, ec.SECP256R1
    ):
        raise ChannelUsageError("an enclave key must be an ECDSA P-256 private key")


@dataclass(frozen=True)
class EnclaveCredential(CertificateBytes):
    """An enclave's TLS identity: its key and its quote-carrying certificate.

    Build it inside the enclave with :meth:`create`; the key never leaves.
    """

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(
        cls,
        platform: EnclavePlatform,
        common_name: str,
        key: ec.EllipticCurvePrivateKey | None = None,
        *,
        is_ca: bool = False,
    ) -> EnclaveCredential:
        """Generate (or take) a P-256 key, quote it, and self-sign a certificate.

        ``key`` lets an enclave reuse a persistent key it unsealed (e.g. the
        manager's CA key, so EK certificates keep chaining to it). ``is_ca``
        marks the certificate as a CA (basicConstraints CA, keyCertSign) so that
        one certificate is both the manager's TLS identity and its CA.
        """
        if key is None:
            key = ec.generate_private_key(ec.SECP256R1())
        _check_key(key)
        quote = platform.quote(report_data_for(spki_der(key.public_key())))
        ext = x509.UnrecognizedExtension(QUOTE_EXTENSION_OID, quote)
        cert = build_self_signed(key, common_name, is_ca=is_ca, extensions=[ext])
        return cls(key=key, certificate=cert)

    def __repr__(self) -> str:  # never print the key
        return f"EnclaveCredential(subject={self.certificate.subject.rfc4514_string()!r})"


def _common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else None


def _extract_quote(cert: x509.Certificate) -> bytes:
    try:
        ext = cert.extensions.get_extension_for_oid(QUOTE_EXTENSION_OID)
    except x509.ExtensionNotFound:
        raise fail("enclave certificate has no quote extension") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise fail("quote extension has an unexpected type")
    return value.value


def _parse(cert_der: bytes) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        _ = cert.extensions  # parse now: duplicate or malformed extensions raise
    # cryptography's InvalidVersion, DuplicateExtension and
    # UnsupportedGeneralNameType are not ValueErrors.
    except (
        ValueError,
        x509.InvalidVersion,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
    ) as exc:
        raise fail("enclave certificate does not parse: %s", exc) from None
    return cert


def _check_self_signature(cert: x509.Certificate) -> None:
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise fail("enclave certificate self-signature invalid: %r", exc) from None


def verify_enclave_certificate(
    cert_der: bytes,
    policy: MeasurementPolicy,
    verifier: QuoteVerifier,
    expected_cn: str | None = None,
) -> VerifiedQuote:
    """Check an RA-TLS certificate; return the verified quote or raise ChannelError.

    Checks (SECURITY.md property 13): the certificate parses and is validly
    self-signed by an ECDSA P-256 key; its quote verifies against
    ``verifier``'s root; the quoted identity is accepted by ``policy``;
    REPORTDATA equals SHA-256(SPKI) || zeros for this certificate's key; and
    the subject CN is ``expected_cn`` when given. Validity dates are not
    checked: freshness of an enclave identity comes from the quote, not from
    the clock.
    """
    cert = _parse(cert_der)
    try:
        public = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:  # e.g. an EC point not on the curve
        raise fail("enclave certificate key does not load: %s", exc) from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
        public.curve, ec.SECP256R1
    ):
        raise fail("enclave certificate key is not ECDSA P-256")
    _check_self_signature(cert)
    quote = _extract_quote(cert)
    try:
        verified = verifier.verify(quote)
    except AttestationError:
        raise fail("enclave quote does not verify against the attestation root") from None
    if not policy.accepts(verified.identity):
        raise fail(
            "enclave identity not accepted by policy (MRENCLAVE %s)",
            verified.identity.mrenclave.hex(),
        )
    if not hmac.compare_digest(verified.report_data, report_data_for(spki_der(public))):
        raise fail("quote REPORTDATA does not bind the certificate key")
    if expected_cn is not None and _common_name(cert) != expected_cn:
        raise fail("enclave certificate CN %r, expected %r", _common_name(cert), expected_cn)
    return verified

