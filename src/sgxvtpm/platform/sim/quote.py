"""Quotes in the DCAP v3 ECDSA-P256 layout, and their verification.

Quote (Intel SGX ECDSA Quote Library reference, "Quote Format", version 3):

  header (48): version u16 = 3 | attestation key type u16 = 2 (ECDSA-256 with
    P-256) | reserved u32 = 0 (TEE type SGX) | QE SVN u16 | PCE SVN u16 |
    QE vendor id (16) | user data (20: platform id (16) || 0^4)
  ISV enclave report body (384)
  signature data length u32, then signature data:
    ISV report signature (64: r || s) by the attestation key over header||body
    attestation public key (64: x || y)
    QE report body (384), REPORTDATA = SHA-256(attest key || QE auth data) || 0^32
    QE report signature (64) by the PCK key over the QE report body
    QE auth data: u16 size, bytes
    QE certification data: u16 type = 5 (PEM PCK chain), u32 size, PEM: PCK
      certificate then root certificate

All integers little-endian. The verifier accepts a quote only if every link
holds up to the root certificate it was constructed with, and the encoding is
canonical (exact lengths, canonical PEM), so that no bit of a valid quote can
change without the quote being refused.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import struct
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.platform.base import (
    REPORT_BODY_SIZE,
    AttestationError,
    PlatformError,
    TargetInfo,
    VerifiedQuote,
)
from sgxvtpm.platform.sim import egetkey, provision
from sgxvtpm.platform.sim.report import parse_report_body, split_report
from sgxvtpm.util import der, log

QUOTE_VERSION = 3
ATT_KEY_TYPE_ECDSA_P256 = 2
CERT_TYPE_PCK_CHAIN = 5
# Intel's QE vendor id (939A7233-F79C-4CA9-940A-0DB3957F0607): the layout is
# DCAP's; the root is not Intel's, so no Intel verifier will accept it.
QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
HEADER_SIZE = 48
_HEADER = struct.Struct("<HHIHH16s20s")
_SIG_FIXED = 64 + 64 + REPORT_BODY_SIZE + 64


class _Reject(SgxvtpmError):
    """Internal: why a quote was refused (logged, never shown to the caller)."""


@dataclass(frozen=True)
class QuotingEnclave:
    """The simulated QE: checks an enclave's REPORT locally, then signs a quote."""

    base_key: bytes
    attestation_key: ec.EllipticCurvePrivateKey
    certification: provision.Certification
    platform_id: bytes
    cpu_svn: bytes = bytes(16)

    @property
    def target_info(self) -> TargetInfo:
        return TargetInfo(mrenclave=provision.QE_MRENCLAVE)

    def quote(self, report: bytes) -> bytes:
        """Quote a REPORT targeted at the QE; PlatformError if its MAC is wrong."""
        body, key_id, mac = split_report(report)
        key = egetkey.report_key(
            self.base_key, provision.QE_MRENCLAVE, bytes(16), 0, key_id, self.cpu_svn
        )
        if not hmac.compare_digest(egetkey.aes_cmac(key, body), mac):
            raise PlatformError("quoting enclave: the REPORT's MAC does not verify")
        return self.sign_body(body)

    def sign_body(self, body: bytes) -> bytes:
        header = _HEADER.pack(
            QUOTE_VERSION,
            ATT_KEY_TYPE_ECDSA_P256,
            0,
            provision.QE_SVN,
            provision.PCE_SVN,
            QE_VENDOR_ID,
            self.platform_id.ljust(20, b"\x00"),
        )
        cert = self.certification
        cert_data = cert.pck_pem + cert.root_pem
        sig_data = b"".join(
            (
                provision.sign_raw(self.attestation_key, header + body),
                provision.raw_public_key(self.attestation_key.public_key()),
                cert.qe_report_body,
                cert.qe_report_signature,
                struct.pack("<H", len(provision.QE_AUTH_DATA)),
                provision.QE_AUTH_DATA,
                struct.pack("<HI", CERT_TYPE_PCK_CHAIN, len(cert_data)),
                cert_data,
            )
        )
        return header + body + struct.pack("<I", len(sig_data)) + sig_data


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class SimQuoteVerifier:
    """Verifies sim quotes against one provisioning root certificate.

    A remote verifier needs nothing but the root certificate (PEM). ``clock``
    is for tests of certificate validity.
    """

    def __init__(
        self, root_pem: bytes, *, clock: Callable[[], datetime.datetime] = _utcnow
    ) -> None:
        try:
            self._root = x509.load_pem_x509_certificate(root_pem)
            self._root.verify_directly_issued_by(self._root)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise PlatformError(f"not a self-signed root certificate: {exc}") from exc
        self._root_der = self._root.public_bytes(serialization.Encoding.DER)
        self._clock = clock

    def verify(self, quote: bytes) -> VerifiedQuote:
        """The quote's report body and platform id; AttestationError if anything is off."""
        try:
            return self._verify(bytes(quote))
        except (
            _Reject,
            ValueError,
            TypeError,
            struct.error,
            InvalidSignature,
            UnsupportedAlgorithm,
            x509.InvalidVersion,
            CryptographyDeprecationWarning,
        ) as exc:
            log.log("platform.quote_rejected", reason=f"{type(exc).__name__}: {exc}")
            raise AttestationError("quote verification failed") from None
        except Exception:
            # Attacker-controlled input must never escape as another error type
            # (bad input is refused, never a crash); an unforeseen parser error is
            # still a rejection, logged loudly.
            log.log("platform.quote_rejected", reason="an unexpected parser error",
                    traceback=traceback.format_exc())
            raise AttestationError("quote verification failed") from None

    def _verify(self, quote: bytes) -> VerifiedQuote:
        if len(quote) < HEADER_SIZE + REPORT_BODY_SIZE + 4 + _SIG_FIXED:
            raise _Reject("quote too short")
        version, key_type, tee, _qe_svn, _pce_svn, vendor, user_data = _HEADER.unpack_from(quote)
        if (version, key_type, tee, vendor) != (
            QUOTE_VERSION,
            ATT_KEY_TYPE_ECDSA_P256,
            0,
            QE_VENDOR_ID,
        ):
            raise _Reject("unsupported quote header")
        signed = quote[: HEADER_SIZE + REPORT_BODY_SIZE]
        (sig_len,) = struct.unpack_from("<I", quote, len(signed))
        sig = quote[len(signed) + 4 :]
        if sig_len != len(sig):
            raise _Reject("signature data length does not match the quote")
        isv_sig, att_pub, qe_body, qe_sig = (
            sig[0:64],
            sig[64:128],
            sig[128 : 128 + REPORT_BODY_SIZE],
            sig[128 + REPORT_BODY_SIZE : _SIG_FIXED],
        )
        auth, cert_type, cert_data = _parse_tail(sig[_SIG_FIXED:])
        if cert_type != CERT_TYPE_PCK_CHAIN:
            raise _Reject(f"certification data type {cert_type}")
        pck = self._check_chain(cert_data)
        pck_key = pck.public_key()
        if not isinstance(pck_key, ec.EllipticCurvePublicKey):
            raise _Reject("PCK key is not EC")
        _verify_raw(pck_key, qe_sig, qe_body)
        _check_qe_report(qe_body, att_pub, auth)
        att_key = ec.EllipticCurvePublicNumbers(
            int.from_bytes(att_pub[:32], "big"), int.from_bytes(att_pub[32:], "big"), ec.SECP256R1()
        ).public_key()
        _verify_raw(att_key, isv_sig, signed)
        platform_id = _platform_id(pck)
        if user_data != platform_id.ljust(20, b"\x00"):
            raise _Reject("header user data does not name the PCK's platform")
        body = parse_report_body(quote[HEADER_SIZE : HEADER_SIZE + REPORT_BODY_SIZE])
        return VerifiedQuote(body=body, platform_id=platform_id)

    def _check_chain(self, cert_data: bytes) -> x509.Certificate:
        # A certificate cryptography only warns about (e.g. a negative serial
        # number) is refused. catch_warnings is process-global: verify from
        # one thread at a time, or accept that a concurrent warning may leak.
        with warnings.catch_warnings():
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            certs = x509.load_pem_x509_certificates(cert_data)
        canonical = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
        if len(certs) != 2 or canonical != cert_data:
            raise _Reject("certification data is not a canonical PCK, root PEM chain")
        pck, root = certs
        if root.public_bytes(serialization.Encoding.DER) != self._root_der:
            raise _Reject("chain ends in another root")
        if pck.public_bytes(serialization.Encoding.DER) != _reencode_ecdsa_cert(pck):
            raise _Reject("PCK certificate is not strict DER")
        pck.verify_directly_issued_by(self._root)
        now = self._clock()
        for cert in certs:
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise _Reject("certificate outside its validity period")
        return pck


# AlgorithmIdentifier { ecdsa-with-SHA256 } (RFC 5758 3.2: parameters absent).
_ECDSA_SHA256_ALG_ID = bytes.fromhex("300a06082a8648ce3d040302")


def _reencode_ecdsa_cert(cert: x509.Certificate) -> bytes:
    """The DER an ecdsa-with-SHA256 certificate must have, from its signed parts.

    The parser tolerates some non-DER outer encodings (e.g. a non-zero
    "unused bits" count in the signature BIT STRING) that the signature does
    not cover; rebuilding the outer structure and comparing closes that gap
    (RFC 5280 4.1: Certificate ::= SEQUENCE { tbsCertificate,
    signatureAlgorithm, signatureValue BIT STRING }).
    """
    bit_string = der.tlv(0x03, b"\x00" + cert.signature)
    return der.tlv(0x30, cert.tbs_certificate_bytes + _ECDSA_SHA256_ALG_ID + bit_string)


def _parse_tail(tail: bytes) -> tuple[bytes, int, bytes]:
    (auth_len,) = struct.unpack_from("<H", tail)
    auth = tail[2 : 2 + auth_len]
    cert_type, cert_len = struct.unpack_from("<HI", tail, 2 + auth_len)
    cert_data = tail[2 + auth_len + 6 :]
    if len(auth) != auth_len or len(cert_data) != cert_len:
        raise _Reject("QE auth or certification data length mismatch")
    return auth, cert_type, cert_data


def _verify_raw(key: ec.EllipticCurvePublicKey, raw_sig: bytes, data: bytes) -> None:
    r, s = int.from_bytes(raw_sig[:32], "big"), int.from_bytes(raw_sig[32:], "big")
    key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))


def _check_qe_report(qe_body: bytes, att_pub: bytes, auth: bytes) -> None:
    qe = parse_report_body(qe_body)
    expected = hashlib.sha256(att_pub + auth).digest() + bytes(32)
    if not hmac.compare_digest(qe.report_data, expected):
        raise _Reject("QE report data does not bind the attestation key")
    if (qe.identity.mrsigner, qe.identity.isv_prod_id) != (
        provision.QE_MRSIGNER,
        provision.QE_ISVPRODID,
    ):
        raise _Reject("QE report is not from the quoting enclave")


def _platform_id(pck: x509.Certificate) -> bytes:
    attrs = pck.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if len(attrs) != 1:
        raise _Reject("PCK certificate carries no platform id")
    value = attrs[0].value
    return bytes.fromhex(value if isinstance(value, str) else value.decode())
