"""Remote verification of a vTPM's EK certificate down to the manager enclave's quote.

The chain a verifier walks:

    EK (in the TPM) --certified by--> manager EK CA key
    manager CA certificate --carries--> SGX quote (RA-TLS extension)
    quote --signed via PCK chain by--> platform attestation root
    quote REPORTDATA == SHA-256(CA SubjectPublicKeyInfo) || 0^32
    quote MRENCLAVE/MRSIGNER accepted by the verifier's measurement policy

Unlike the channel layer (one opaque error for an attacker on the wire), this
is a report for an operator: every check is listed with its outcome, and the
first failure gives the reason in plain words.
"""

from __future__ import annotations

import datetime
import hmac

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sgxvtpm.attest.report import AttestReport
from sgxvtpm.channel.evidence import BoundQuote, EvidenceError, bound_quote
from sgxvtpm.enclaves.ekcert import TCG_KP_EK_CERTIFICATE, tpm_attributes
from sgxvtpm.platform.base import (
    AttestationError,
    MeasurementPolicy,
    QuoteVerifier,
    VerifiedQuote,
)
from sgxvtpm.tpm.ek import EkPublic, EkPublicKey

# The reasons a verifier prints; tests assert on them.
R_EK_UNPARSABLE = "EK certificate does not parse"
R_CA_UNPARSABLE = "CA certificate does not parse"
R_CA_NOT_SELF_SIGNED = "CA certificate is not a self-signed CA"
R_NO_QUOTE = "CA certificate carries no quote"
R_QUOTE_ROOT = "CA quote not from this platform root"
R_POLICY = "measurement not in policy"
R_REPORT_DATA = "CA key does not match the quote's report data"
R_EK_SIGNATURE = "EK certificate not signed by this CA"
R_EK_PROFILE = "EK certificate is not a TCG EK certificate"
R_EK_VALIDITY = "EK certificate not valid now"
R_EK_PUBLIC = "EK certificate is for another key than the TPM's EK"


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _parse(der: bytes) -> x509.Certificate | None:
    try:
        cert = x509.load_der_x509_certificate(der)
        _ = cert.extensions  # malformed or duplicate extensions raise now
    except ValueError:
        return None
    return cert


def _is_self_signed_ca(cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return bc.ca


def _quote_of(cert: x509.Certificate) -> BoundQuote | str:
    try:
        return bound_quote(cert)
    except EvidenceError as exc:
        return str(exc)


def _check_ca(
    report: AttestReport,
    ca: x509.Certificate,
    policy: MeasurementPolicy,
    verifier: QuoteVerifier,
) -> None:
    report.add("CA certificate self-signed CA", _is_self_signed_ca(ca), reason=R_CA_NOT_SELF_SIGNED)
    bound = _quote_of(ca)
    if isinstance(bound, str):
        report.add("CA quote verifies against platform root", False, bound, R_NO_QUOTE)
        _skip(report, "quote measurement in policy", "quote REPORTDATA binds CA key")
        return
    verified: VerifiedQuote | None
    try:
        verified = verifier.verify(bound.quote)
    except AttestationError as exc:
        verified = None
        report.add("CA quote verifies against platform root", False, str(exc), R_QUOTE_ROOT)
    if verified is None:
        _skip(report, "quote measurement in policy", "quote REPORTDATA binds CA key")
        return
    report.add(
        "CA quote verifies against platform root", True, f"platform {verified.platform_id.hex()}"
    )
    identity = verified.identity
    report.facts["MRENCLAVE"] = identity.mrenclave.hex()
    report.facts["MRSIGNER"] = identity.mrsigner.hex()
    report.facts["ISVPRODID/SVN"] = f"{identity.isv_prod_id}/{identity.isv_svn}"
    report.add(
        "quote measurement in policy",
        policy.accepts(identity),
        f"MRENCLAVE {identity.mrenclave.hex()[:16]}...",
        R_POLICY,
    )
    binds = hmac.compare_digest(verified.report_data, bound.report_data)
    report.add("quote REPORTDATA binds CA key", binds, bound.source, R_REPORT_DATA)


def _skip(report: AttestReport, *names: str) -> None:
    for name in names:
        report.add(name, None, "not checked: no verified quote")


def _check_ek(
    report: AttestReport,
    ek: x509.Certificate,
    ca: x509.Certificate,
    ek_public: EkPublic | EkPublicKey | None,
    now: datetime.datetime,
) -> None:
    try:
        ek.verify_directly_issued_by(ca)
        signed = True
    except (ValueError, TypeError, InvalidSignature):
        signed = False
    report.add("EK certificate signed by CA", signed, reason=R_EK_SIGNATURE)
    attrs = tpm_attributes(ek)
    try:
        eku = ek.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        has_eku = TCG_KP_EK_CERTIFICATE in eku
    except x509.ExtensionNotFound:
        has_eku = False
    report.facts["TPM"] = " ".join(f"{k}={v}" for k, v in attrs.items()) or "(no TPM attributes)"
    report.add(
        "EK certificate TCG profile",
        has_eku and len(attrs) == 3,
        "EKU 2.23.133.8.1, SAN",
        R_EK_PROFILE,
    )
    valid = ek.not_valid_before_utc <= now <= ek.not_valid_after_utc
    report.add(
        "EK certificate validity", valid, f"from {ek.not_valid_before_utc:%Y-%m-%d}", R_EK_VALIDITY
    )
    if ek_public is not None:
        key = ek_public.public_key if isinstance(ek_public, EkPublic) else ek_public
        same = _spki(key) == _spki(ek.public_key())
        report.add("EK certificate matches the TPM's EK", same, reason=R_EK_PUBLIC)


def verify_ek_chain(
    ek_cert_der: bytes,
    ca_cert_der: bytes,
    *,
    policy: MeasurementPolicy,
    verifier: QuoteVerifier,
    ek_public: EkPublic | EkPublicKey | None = None,
    now: datetime.datetime | None = None,
) -> AttestReport:
    """Check an EK certificate against the manager CA certificate and its quote.

    ``verifier`` holds the platform attestation root (e.g.
    ``SimQuoteVerifier(root_pem)``), ``policy`` the accepted enclave
    measurements, ``ek_public`` (optional) the EK read from the TPM. Never
    raises for bad input: the report says what failed.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    report = AttestReport()
    ek, ca = _parse(ek_cert_der), _parse(ca_cert_der)
    if ca is None:
        report.add("CA certificate parses", False, reason=R_CA_UNPARSABLE)
        return report
    if ek is None:
        report.add("EK certificate parses", False, reason=R_EK_UNPARSABLE)
        return report
    report.facts["CA"] = ca.subject.rfc4514_string()
    report.facts["EK key"] = _key_label(ek)
    _check_ca(report, ca, policy, verifier)
    _check_ek(report, ek, ca, ek_public, now)
    return report


def _key_label(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECC {key.curve.name}"
    return type(key).__name__
