"""EK and platform certificates from the manager CA (pure crypto, sim platform)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID
from tests.helpers.ek_ca import ManagerCa, manager_ca

from sgxvtpm.enclaves.ekcert import (
    EK_POLICY_NOTICE,
    NO_EXPIRY,
    TCG_KP_EK_CERTIFICATE,
    TCG_KP_PLATFORM_CERTIFICATE,
    TpmSpecification,
    issue_ek_certificate,
    issue_platform_certificate,
    tpm_attributes,
)

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ManagerCa:
    return manager_ca(tmp_path_factory.mktemp("ekcert") / "platform")


@pytest.fixture(scope="module")
def rsa_ek() -> rsa.RSAPublicKey:
    return rsa.generate_private_key(65537, 2048).public_key()


def _ext(
    cert: x509.Certificate, cls: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(cls)


def test_rsa_ek_certificate_profile(ca: ManagerCa, rsa_ek: rsa.RSAPublicKey) -> None:
    der = issue_ek_certificate(
        ca.credential.key, ca.credential.certificate, rsa_ek, model="m", version="id:00020003",
        serial=7, now=NOW,
    )  # fmt: skip
    cert = x509.load_der_x509_certificate(der)
    cert.verify_directly_issued_by(ca.credential.certificate)
    assert cert.public_key() == rsa_ek
    assert cert.subject == x509.Name([])
    assert cert.serial_number == 7
    assert cert.not_valid_after_utc == NO_EXPIRY
    assert cert.not_valid_before_utc < NOW
    san = _ext(cert, x509.SubjectAlternativeName)
    assert san.critical  # the subject is empty (RFC 5280 4.2.1.6)
    assert tpm_attributes(cert) == {
        "manufacturer": "id:53475856",
        "model": "m",
        "version": "id:00020003",
    }
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False  # type: ignore[attr-defined]
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_encipherment and not ku.value.key_agreement  # type: ignore[attr-defined]
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [TCG_KP_EK_CERTIFICATE]  # type: ignore[call-overload]
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    ski = _ext(ca.credential.certificate, x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest  # type: ignore[attr-defined]
    policies = _ext(cert, x509.CertificatePolicies).value
    notice = policies[0].policy_qualifiers[0]  # type: ignore[index]
    assert notice.explicit_text == EK_POLICY_NOTICE


def test_ecc_ek_certificate_key_agreement(ca: ManagerCa) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = x509.load_der_x509_certificate(
        issue_ek_certificate(ca.credential.key, ca.credential.certificate, key)
    )
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_agreement and not ku.key_encipherment
    assert cert.public_key() == key


def test_tpm_specification_matches_swtpm_cert_bytes(
    ca: ManagerCa, rsa_ek: rsa.RSAPublicKey
) -> None:
    # extnValue of subjectDirectoryAttributes in swtpm_setup 0.7.1's EK certificates
    # (openssl asn1parse), for family "2.0", level 0, revision 164.
    golden = bytes.fromhex("3019301706056781050210310E300C0C03322E30020100020200A4")
    der = issue_ek_certificate(
        ca.credential.key, ca.credential.certificate, rsa_ek, spec=TpmSpecification("2.0", 0, 164)
    )
    cert = x509.load_der_x509_certificate(der)
    sda = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_DIRECTORY_ATTRIBUTES)
    assert not sda.critical
    assert sda.value.value == golden  # type: ignore[attr-defined]


def test_san_bytes_match_swtpm_layout(ca: ManagerCa, rsa_ek: rsa.RSAPublicKey) -> None:
    # swtpm_cert's SAN for id:00001014 / swtpm / id:20191023: one UTF8String per RDN.
    golden = bytes.fromhex(
        "3046A444304231163014060567810502010C0B69643A30303030313031343110300E060567810502"
        "020C05737774706D31163014060567810502030C0B69643A3230313931303233"
    )
    der = issue_ek_certificate(
        ca.credential.key, ca.credential.certificate, rsa_ek,
        manufacturer="id:00001014", model="swtpm", version="id:20191023",
    )  # fmt: skip
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.public_bytes() == golden


def test_platform_certificate(ca: ManagerCa, rsa_ek: rsa.RSAPublicKey) -> None:
    der = issue_platform_certificate(
        ca.credential.key, ca.credential.certificate, rsa_ek, model="q35"
    )
    cert = x509.load_der_x509_certificate(der)
    cert.verify_directly_issued_by(ca.credential.certificate)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [TCG_KP_PLATFORM_CERTIFICATE]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    (dirname,) = san.value.get_values_for_type(x509.DirectoryName)
    assert [(a.oid.dotted_string, a.value) for a in dirname] == [
        ("2.23.133.5.1.1", "sgxvtpm"),
        ("2.23.133.5.1.4", "q35"),
        ("2.23.133.5.1.5", "1.0"),
    ]
    assert tpm_attributes(cert) == {}


def test_rejects_non_key(ca: ManagerCa, tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        issue_ek_certificate(ca.credential.key, ca.credential.certificate, b"key")  # type: ignore[arg-type]
