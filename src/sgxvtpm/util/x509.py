"""X.509 pieces every certificate builder shares: key usages, a certificate's encodings."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def key_usage(
    *,
    digital_signature: bool = False,
    content_commitment: bool = False,
    key_encipherment: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    """A KeyUsage extension with the named bits set and every other bit clear
    (dataEncipherment, encipherOnly and decipherOnly are never used here)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


class CertificateBytes:
    """``cert_der`` and ``cert_pem`` of a credential's ``certificate``."""

    certificate: x509.Certificate

    @property
    def cert_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)
