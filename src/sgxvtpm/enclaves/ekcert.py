"""EK and platform certificates, issued inside the manager enclave by its EK CA.

The profile follows the TCG EK Credential Profile for TPM 2.0 (version 2.x,
section 3.2 "EK Certificate Fields") and matches what swtpm_cert 0.7.1 puts
in the certificates swtpm_setup writes (dumped with ``openssl x509 -text``):

==========================  =======================================  ==========
extension                   value                                    critical
==========================  =======================================  ==========
subjectAltName              directoryName: tcg-at-tpmManufacturer,   yes
                            tcg-at-tpmModel, tcg-at-tpmVersion
                            (2.23.133.2.1/2/3, UTF8String, one RDN
                            each)
basicConstraints            CA:FALSE                                 yes
keyUsage                    keyEncipherment (RSA) / keyAgreement     yes
                            (ECC)
extendedKeyUsage            tcg-kp-EKCertificate 2.23.133.8.1        no
subjectDirectoryAttributes  tcg-at-tpmSpecification 2.23.133.2.16:   no
                            family "2.0", level, revision
authorityKeyIdentifier      the CA's subject key identifier          no
certificatePolicies         userNotice "TCG Trusted Platform         no
                            Endorsement" (EK Credential Profile
                            3.2.x; swtpm omits it)
==========================  =======================================  ==========

Differences from swtpm, on purpose: the subject is empty, as the TCG profile
asks (swtpm writes ``CN=unknown``); that is why the SAN must be critical
(RFC 5280, 4.2.1.6). notAfter is 99991231235959Z, "no well-defined
expiration" (RFC 5280, 4.1.2.5), as swtpm does.

The platform certificate copies swtpm_cert ``--type platform``: an X.509
certificate (not a TCG attribute certificate: swtpm makes none, and
``cryptography`` cannot build one) whose subject key is the EK, with
platformManufacturerStr/platformModel/platformVersion (2.23.133.5.1.1/4/5)
in a critical SAN and tcg-kp-PlatformCertificate (2.23.133.8.2) as EKU.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, ObjectIdentifier

from sgxvtpm.tpm.ek import EkPublic, EkPublicKey
from sgxvtpm.util import der
from sgxvtpm.util.x509 import key_usage

# TCG OIDs (TCG EK Credential Profile 2.x, section 5 / TCG OID registry).
TCG_AT_TPM_MANUFACTURER = ObjectIdentifier("2.23.133.2.1")
TCG_AT_TPM_MODEL = ObjectIdentifier("2.23.133.2.2")
TCG_AT_TPM_VERSION = ObjectIdentifier("2.23.133.2.3")
TCG_AT_TPM_SPECIFICATION = ObjectIdentifier("2.23.133.2.16")
TCG_KP_EK_CERTIFICATE = ObjectIdentifier("2.23.133.8.1")
TCG_KP_PLATFORM_CERTIFICATE = ObjectIdentifier("2.23.133.8.2")
TCG_AT_PLATFORM_MANUFACTURER_STR = ObjectIdentifier("2.23.133.5.1.1")
TCG_AT_PLATFORM_MODEL = ObjectIdentifier("2.23.133.5.1.4")
TCG_AT_PLATFORM_VERSION = ObjectIdentifier("2.23.133.5.1.5")
ANY_POLICY = ObjectIdentifier("2.5.29.32.0")
#: The userNotice text the TCG credential profiles give EK certificates.
EK_POLICY_NOTICE = "TCG Trusted Platform Endorsement"

#: tcg-at-tpmManufacturer: "id:" + the 4-byte vendor ID in hex, as TPM_PT_MANUFACTURER
#: spells it (TCG Vendor ID Registry). 53475856 is ASCII "SGXV": sgxvtpm's own,
#: NOT registered with TCG (swtpm uses IBM's id:00001014 the same way). Only for an
#: instance that does not report its TPM's attributes: the manager writes what the
#: TPM reports (sgxvtpm/tpm/ek.py, TpmSpecInfo.certificate_attributes).
DEFAULT_MANUFACTURER = "id:53475856"
DEFAULT_MODEL = "sgxvtpm"
DEFAULT_VERSION = "id:00000001"
#: "Never expires" (RFC 5280, 4.1.2.5): GeneralizedTime 99991231235959Z.
NO_EXPIRY = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
_BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class TpmSpecification:
    """TPMSpecification ::= SEQUENCE {family UTF8String, level INTEGER, revision INTEGER}."""

    family: str = "2.0"
    level: int = 0
    revision: int = 164  # libtpms 0.9: TPM 2.0 library spec revision 1.64


def tpm_specification_extension(spec: TpmSpecification) -> x509.UnrecognizedExtension:
    """subjectDirectoryAttributes (RFC 5280 4.2.1.8) holding tcg-at-tpmSpecification.

    SEQUENCE OF Attribute { type OID, values SET OF TPMSpecification }, as
    swtpm_cert writes it (EK Credential Profile 3.2.12).
    """
    value = der.tlv(
        0x30,
        der.tlv(0x0C, spec.family.encode()) + der.uint(spec.level) + der.uint(spec.revision),
    )
    spec_oid = der.oid(TCG_AT_TPM_SPECIFICATION.dotted_string)
    attribute = der.tlv(0x30, spec_oid + der.tlv(0x31, value))
    return x509.UnrecognizedExtension(
        ExtensionOID.SUBJECT_DIRECTORY_ATTRIBUTES, der.tlv(0x30, attribute)
    )


# ---------------------------------------------------------------- builders


def _public_key(ek: EkPublic | EkPublicKey) -> EkPublicKey:
    key = ek.public_key if isinstance(ek, EkPublic) else ek
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise TypeError("an EK is an RSA or ECC public key")
    return key


def _key_usage(key: EkPublicKey) -> x509.KeyUsage:
    # EK Credential Profile 3.2.9: keyEncipherment for RSA EKs, keyAgreement for ECC.
    is_rsa = isinstance(key, rsa.RSAPublicKey)
    return key_usage(key_encipherment=is_rsa, key_agreement=not is_rsa)


def _attribute_name(pairs: list[tuple[ObjectIdentifier, str]]) -> x509.Name:
    # One attribute per RDN, UTF8String (the default for unknown OIDs), like swtpm_cert.
    return x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(o, v)]) for o, v in pairs])


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _base_builder(
    ca_cert: x509.Certificate,
    key: EkPublicKey,
    san: x509.Name,
    eku: ObjectIdentifier,
    serial: int | None,
    now: datetime.datetime | None,
) -> x509.CertificateBuilder:
    now = now or datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(NO_EXPIRY)
        .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(san)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )


def issue_ek_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ek: EkPublic | EkPublicKey,
    *,
    manufacturer: str = DEFAULT_MANUFACTURER,
    model: str = DEFAULT_MODEL,
    version: str = DEFAULT_VERSION,
    spec: TpmSpecification | None = None,
    serial: int | None = None,
    now: datetime.datetime | None = None,
) -> bytes:
    """A DER EK certificate for ``ek`` signed (ECDSA-SHA256) by the manager's CA.

    ``spec`` is the TPM's family/level/revision (see
    :func:`sgxvtpm.tpm.ek.read_tpm_spec`); ``serial`` and ``now`` default to
    a random serial and the current time.
    """
    key = _public_key(ek)
    san = _attribute_name(
        [
            (TCG_AT_TPM_MANUFACTURER, manufacturer),
            (TCG_AT_TPM_MODEL, model),
            (TCG_AT_TPM_VERSION, version),
        ]
    )
    policies = x509.CertificatePolicies(
        [x509.PolicyInformation(ANY_POLICY, [x509.UserNotice(None, EK_POLICY_NOTICE)])]
    )
    builder = (
        _base_builder(ca_cert, key, san, TCG_KP_EK_CERTIFICATE, serial, now)
        .add_extension(tpm_specification_extension(spec or TpmSpecification()), critical=False)
        .add_extension(policies, critical=False)
    )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(Encoding.DER)


def issue_platform_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ek: EkPublic | EkPublicKey,
    *,
    manufacturer: str = "sgxvtpm",
    model: str = "QEMU",
    version: str = "1.0",
    serial: int | None = None,
    now: datetime.datetime | None = None,
) -> bytes:
    """A DER platform certificate like swtpm_cert --type platform (see module doc)."""
    key = _public_key(ek)
    san = _attribute_name(
        [
            (TCG_AT_PLATFORM_MANUFACTURER_STR, manufacturer),
            (TCG_AT_PLATFORM_MODEL, model),
            (TCG_AT_PLATFORM_VERSION, version),
        ]
    )
    builder = _base_builder(ca_cert, key, san, TCG_KP_PLATFORM_CERTIFICATE, serial, now)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(Encoding.DER)


def tpm_attributes(cert: x509.Certificate) -> dict[str, str]:
    """The TPM manufacturer/model/version in an EK certificate's SAN ({} if none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return {}
    names = {
        TCG_AT_TPM_MANUFACTURER: "manufacturer",
        TCG_AT_TPM_MODEL: "model",
        TCG_AT_TPM_VERSION: "version",
    }
    out = {}
    for directory in san.get_values_for_type(x509.DirectoryName):
        for attr in directory:
            if attr.oid in names and isinstance(attr.value, str):
                out[names[attr.oid]] = attr.value
    return out
