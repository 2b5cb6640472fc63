"""RA-TLS certificates: an X.509 certificate that carries an SGX quote.

The convention is Gramine's RA-TLS (Gramine v1.9, tools/sgx/ra-tls:
ra_tls_attest.c, ra_tls_verify_common.c): the enclave generates an ECDSA key
and self-signs a certificate for it that carries quotes binding that key, in
two non-critical extensions, as Gramine's ``ra_tls_attest`` writes them:

- the TCG DICE "tagged evidence" extension, OID ``2.23.133.5.4.9`` (Gramine
  v1.8 on): CBOR tag 60000 over ``[quote, claims]`` (both byte strings), where
  ``claims`` is the serialized CBOR map ``{"pubkey-hash": bstr(serialized
  [1, bstr SHA-256(DER SubjectPublicKeyInfo)])}`` (1 = sha-256 in IANA's
  named-information registry) and the quote's REPORTDATA is
  ``SHA-256(claims) || 32 zero bytes``;
- the legacy quote extension, OID ``1.2.840.113741.1337.6`` (Gramine v1.0
  on): the raw quote, whose REPORTDATA is ``SHA-256(SPKI) || 32 zero bytes``.

So two quotes per certificate, made once when an enclave builds its identity.
A verifier (ours, like Gramine's) reads the tagged evidence when present and
the legacy quote otherwise, and checks one quote: the handshake verifies one
quote, as before.

Gramine's own header keeps the legacy OID with its DER tag and length bytes
(06 09) inside the OID value, so a certificate made by Gramine carries the
legacy quote under the OID whose encoding is ``06 09 2A 86 48 86 F8 4D 8A 39
06`` (read as ``0.6.9.42.840.113741.1337.6``); its verifier finds either
form by a byte search. We write the correct OID and accept both.

Earlier versions of sgxvtpm put the quote under ``1.2.840.113741.1.13.1``,
which is Intel's PCK certificate "SGX Extensions" OID (FMSPC, PCEID, TCB
levels), not an RA-TLS one; no Gramine peer or DCAP library reads a quote
there. That OID is refused: no deployed peer depends on it (the enclaves
make new certificates at every start).

The extensions are not critical so that OpenSSL accepts the certificate as a
CA in client-certificate chains (RFC 5280 section 4.2: unknown critical
extensions must be rejected).
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

from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.platform.base import (
    REPORT_DATA_SIZE,
    AttestationError,
    EnclavePlatform,
    MeasurementPolicy,
    QuoteVerifier,
    VerifiedQuote,
)
from sgxvtpm.util import cbor
from sgxvtpm.util.x509 import CertificateBytes, key_usage

from .errors import ChannelUsageError, fail

# Gramine tools/sgx/ra-tls/ra_tls.h (v1.9); see the module docstring.
QUOTE_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1337.6")
GRAMINE_QUOTE_EXTENSION_OID = x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6")
EVIDENCE_EXTENSION_OID = x509.ObjectIdentifier("2.23.133.5.4.9")
# Tag 60000: "TCG DICE tagged evidence, SGX/TDX quote" (IANA CBOR tags registry).
EVIDENCE_CBOR_TAG = 60000
PUBKEY_HASH_CLAIM = "pubkey-hash"
HASH_ALG_SHA256 = 1  # IANA named-information hash algorithm registry
# What a "pubkey-hash" claim may use (Gramine's verifier accepts these three;
# its attester, and ours, write SHA-256).
_CLAIM_HASHES = {HASH_ALG_SHA256: "sha256", 7: "sha384", 8: "sha512"}

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


def pubkey_claims(certificate_spki_der: bytes) -> bytes:
    """The serialized claims map of tagged evidence: only "pubkey-hash" (as Gramine's)."""
    hash_entry = cbor.encode([HASH_ALG_SHA256, hashlib.sha256(certificate_spki_der).digest()])
    return cbor.encode({PUBKEY_HASH_CLAIM: hash_entry})


def report_data_for_claims(claims: bytes) -> bytes:
    """REPORTDATA binding serialized claims: SHA-256(claims) || 32 zero bytes."""
    digest = hashlib.sha256(claims).digest()
    return digest + bytes(REPORT_DATA_SIZE - len(digest))


def tagged_evidence(quote: bytes, claims: bytes) -> bytes:
    """The value of the tagged-evidence extension: tag 60000 over [quote, claims]."""
    return cbor.encode(cbor.Tag(EVIDENCE_CBOR_TAG, [quote, claims]))


def ra_tls_extensions(platform: EnclavePlatform, spki: bytes) -> list[x509.ExtensionType]:
    """Both RA-TLS extensions for the key ``spki``, each with its own quote."""
    claims = pubkey_claims(spki)
    evidence = tagged_evidence(platform.quote(report_data_for_claims(claims)), claims)
    legacy = platform.quote(report_data_for(spki))
    return [
        x509.UnrecognizedExtension(EVIDENCE_EXTENSION_OID, evidence),
        x509.UnrecognizedExtension(QUOTE_EXTENSION_OID, legacy),
    ]


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
        exts = ra_tls_extensions(platform, spki_der(key.public_key()))
        cert = build_self_signed(key, common_name, is_ca=is_ca, extensions=exts)
        return cls(key=key, certificate=cert)

    def __repr__(self) -> str:  # never print the key
        return f"EnclaveCredential(subject={self.certificate.subject.rfc4514_string()!r})"


def _common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else None


class EvidenceError(SgxvtpmError):
    """A certificate carries no RA-TLS quote, or its evidence is malformed or binds another key.

    The certificate is not an RA-TLS certificate this verifier understands
    (Gramine's tagged evidence or legacy quote extension); the message says why.
    """


@dataclass(frozen=True)
class BoundQuote:
    """A quote taken from an RA-TLS certificate, and the REPORTDATA it must carry.

    ``report_data`` already binds the certificate's key: SHA-256(claims) || 0^32
    for tagged evidence whose "pubkey-hash" claim matched that key, or
    SHA-256(SPKI) || 0^32 for the legacy extension. ``source`` names which.
    """

    quote: bytes
    report_data: bytes
    source: str


def _extension_value(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        value = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    if not isinstance(value, x509.UnrecognizedExtension):
        raise EvidenceError(f"extension {oid.dotted_string} has an unexpected type")
    return value.value


def _claims_bind(claims: bytes, spki: bytes) -> bool:
    try:
        claims_map = cbor.decode(claims)
        if not isinstance(claims_map, dict):
            return False
        # Other claims (e.g. Gramine's optional "nonce") are ignored, as Gramine does;
        # unlike Gramine's verifier, "pubkey-hash" is required.
        hash_entry = claims_map.get(PUBKEY_HASH_CLAIM)
        if not isinstance(hash_entry, bytes):
            return False
        entry = cbor.decode(hash_entry)
    except cbor.CborError:
        return False
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], bytes)):
        return False
    alg = entry[0]
    if not isinstance(alg, int) or alg not in _CLAIM_HASHES:
        return False
    return hmac.compare_digest(entry[1], hashlib.new(_CLAIM_HASHES[alg], spki).digest())


def _from_evidence(value: bytes, spki: bytes) -> BoundQuote:
    try:
        item = cbor.decode(value)
    except cbor.CborError as exc:
        raise EvidenceError(f"tagged evidence is not CBOR: {exc}") from None
    if not (
        isinstance(item, cbor.Tag)
        and item.number == EVIDENCE_CBOR_TAG
        and isinstance(item.value, list)
        and len(item.value) == 2
        and all(isinstance(x, bytes) for x in item.value)
    ):
        raise EvidenceError("tagged evidence is not tag 60000 over [quote, claims]")
    quote, claims = item.value
    assert isinstance(quote, bytes) and isinstance(claims, bytes)  # checked above, for mypy
    if not _claims_bind(claims, spki):
        raise EvidenceError("tagged evidence claims do not bind the certificate key")
    return BoundQuote(quote, report_data_for_claims(claims), "tagged evidence 2.23.133.5.4.9")


def bound_quote(cert: x509.Certificate) -> BoundQuote:
    """The quote an RA-TLS certificate carries for its key; EvidenceError if none.

    Tagged evidence first; when it is present, its failure is final (no
    fallback to the legacy quote), as in Gramine's verifier. The caller
    verifies the quote and compares its REPORTDATA with ``report_data``.
    """
    try:
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EvidenceError(f"certificate key does not load: {exc}") from None
    evidence = _extension_value(cert, EVIDENCE_EXTENSION_OID)
    if evidence is not None:
        return _from_evidence(evidence, spki)
    for oid in (QUOTE_EXTENSION_OID, GRAMINE_QUOTE_EXTENSION_OID):
        quote = _extension_value(cert, oid)
        if quote is not None:
            return BoundQuote(quote, report_data_for(spki), f"legacy quote {oid.dotted_string}")
    raise EvidenceError("certificate has no RA-TLS quote extension")


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
    self-signed by an ECDSA P-256 (or P-384, Gramine's) key; the quote it
    carries (:func:`bound_quote`) verifies against ``verifier``'s root; the
    quoted identity is accepted by ``policy``; REPORTDATA binds this
    certificate's key (through the claims, or directly); and
    the subject CN is ``expected_cn`` when given. Validity dates are not
    checked: freshness of an enclave identity comes from the quote, not from
    the clock.
    """
    cert = _parse(cert_der)
    try:
        public = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:  # e.g. an EC point not on the curve
        raise fail("enclave certificate key does not load: %s", exc) from None
    # P-384 too: Gramine's ra_tls_attest makes P-384 keys; ours are P-256.
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
        public.curve, ec.SECP256R1 | ec.SECP384R1
    ):
        raise fail("enclave certificate key is not ECDSA P-256 or P-384")
    _check_self_signature(cert)
    try:
        bound = bound_quote(cert)
    except EvidenceError as exc:
        raise fail("enclave certificate evidence: %s", exc) from None
    try:
        verified = verifier.verify(bound.quote)
    except AttestationError:
        raise fail("enclave quote does not verify against the attestation root") from None
    if not policy.accepts(verified.identity):
        raise fail(
            "enclave identity not accepted by policy (MRENCLAVE %s)",
            verified.identity.mrenclave.hex(),
        )
    if not hmac.compare_digest(verified.report_data, bound.report_data):
        raise fail("quote REPORTDATA does not bind the certificate key (%s)", bound.source)
    if expected_cn is not None and _common_name(cert) != expected_cn:
        raise fail("enclave certificate CN %r, expected %r", _common_name(cert), expected_cn)
    return verified

