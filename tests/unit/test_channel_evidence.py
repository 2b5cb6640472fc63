"""RA-TLS certificates (sgxvtpm.channel.evidence) against the real sim platform."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from sgxvtpm.channel import (
    QUOTE_EXTENSION_OID,
    ChannelError,
    ChannelUsageError,
    EnclaveCredential,
    report_data_for,
    verify_enclave_certificate,
)
from sgxvtpm.channel.evidence import (
    build_self_signed,
    pubkey_claims,
    report_data_for_claims,
    spki_der,
)
from sgxvtpm.platform.base import EnclaveIdentity, MeasurementPolicy
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.util import log

MANAGER = EnclaveIdentity(mrenclave=b"\x11" * 32, mrsigner=b"\x22" * 32, isv_prod_id=1, isv_svn=3)
OTHER = EnclaveIdentity(mrenclave=b"\x33" * 32, mrsigner=b"\x22" * 32, isv_prod_id=1, isv_svn=3)
POLICY = MeasurementPolicy(mrenclaves=frozenset({MANAGER.mrenclave}))


def test_certificate_carries_a_quote_binding_its_key(sim_platform: SimPlatformDir) -> None:
    cred = EnclaveCredential.create(sim_platform.enclave_platform(MANAGER), "manager")
    verified = verify_enclave_certificate(cred.cert_der, POLICY, sim_platform.verifier(), "manager")
    assert verified.identity.mrenclave == MANAGER.mrenclave
    # The handshake checks the tagged evidence's quote, which binds the claims.
    claims = pubkey_claims(spki_der(cred.key.public_key()))
    assert verified.report_data == report_data_for_claims(claims)
    assert verified.report_data[32:] == bytes(32)
    ext = cred.certificate.extensions.get_extension_for_oid(QUOTE_EXTENSION_OID)
    assert not ext.critical
    assert x509.load_pem_x509_certificate(cred.cert_pem) == cred.certificate
    assert "PRIVATE" not in repr(cred)


def test_ca_certificate_can_sign(sim_platform: SimPlatformDir) -> None:
    cred = EnclaveCredential.create(sim_platform.enclave_platform(MANAGER), "manager", is_ca=True)
    bc = cred.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    ku = cred.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert bc.ca and ku.key_cert_sign and ku.digital_signature
    plain = EnclaveCredential.create(sim_platform.enclave_platform(MANAGER), "instance")
    assert not plain.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_given_key_is_used(sim_platform: SimPlatformDir) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cred = EnclaveCredential.create(
        sim_platform.enclave_platform(MANAGER), "manager", key, is_ca=True
    )
    assert cred.certificate.public_key() == key.public_key()
    verify_enclave_certificate(cred.cert_der, POLICY, sim_platform.verifier())


def test_non_p256_key_is_refused(sim_platform: SimPlatformDir) -> None:
    with pytest.raises(ChannelUsageError):
        EnclaveCredential.create(
            sim_platform.enclave_platform(MANAGER), "m", ec.generate_private_key(ec.SECP384R1())
        )


def test_wrong_mrenclave(sim_platform: SimPlatformDir) -> None:
    cred = EnclaveCredential.create(sim_platform.enclave_platform(OTHER), "manager")
    with log.capture() as records, pytest.raises(ChannelError) as err:
        verify_enclave_certificate(cred.cert_der, POLICY, sim_platform.verifier())
    # Opaque to the caller, specific in the local log.
    assert "policy" not in str(err.value)
    failures = [r["reason"] for r in records if r["event"] == "channel.failure"]
    assert len(failures) == 1 and "not accepted by policy" in failures[0]


def test_mrsigner_policy_accepts_newer_svn_only(sim_platform: SimPlatformDir) -> None:
    policy = MeasurementPolicy(mrsigner=b"\x22" * 32, isv_prod_id=1, min_isv_svn=3)
    cred = EnclaveCredential.create(sim_platform.enclave_platform(OTHER), "manager")
    verify_enclave_certificate(cred.cert_der, policy, sim_platform.verifier())
    strict = MeasurementPolicy(mrsigner=b"\x22" * 32, isv_prod_id=1, min_isv_svn=4)
    with pytest.raises(ChannelError):
        verify_enclave_certificate(cred.cert_der, strict, sim_platform.verifier())


def test_quote_from_another_platform_root(
    sim_platform: SimPlatformDir, other_sim_platform: SimPlatformDir
) -> None:
    a, b = sim_platform, other_sim_platform
    assert a.root_certificate_pem != b.root_certificate_pem
    cred = EnclaveCredential.create(b.enclave_platform(MANAGER), "manager")
    verify_enclave_certificate(cred.cert_der, POLICY, b.verifier())  # fine on its own root
    with pytest.raises(ChannelError):
        verify_enclave_certificate(cred.cert_der, POLICY, a.verifier())


def _cert_with_quote(key: ec.EllipticCurvePrivateKey, quote: bytes, cn: str = "manager") -> bytes:
    ext = x509.UnrecognizedExtension(QUOTE_EXTENSION_OID, quote)
    return build_self_signed(key, cn, is_ca=False, extensions=[ext]).public_bytes(Encoding.DER)


def test_reportdata_not_matching_the_key(sim_platform: SimPlatformDir) -> None:
    # A genuine quote of the right enclave, but over another key (e.g. lifted
    # from the real enclave's certificate by a host that made its own key).
    platform = sim_platform.enclave_platform(MANAGER)
    enclave_key = ec.generate_private_key(ec.SECP256R1())
    quote = platform.quote(report_data_for(spki_der(enclave_key.public_key())))
    host_key = ec.generate_private_key(ec.SECP256R1())
    verify_enclave_certificate(
        _cert_with_quote(enclave_key, quote), POLICY, sim_platform.verifier()
    )
    with pytest.raises(ChannelError):
        verify_enclave_certificate(
            _cert_with_quote(host_key, quote), POLICY, sim_platform.verifier()
        )


def test_reportdata_must_have_zero_tail(sim_platform: SimPlatformDir) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    data = report_data_for(spki_der(key.public_key()))[:32] + b"\x01" * 32
    quote = sim_platform.enclave_platform(MANAGER).quote(data)
    with pytest.raises(ChannelError):
        verify_enclave_certificate(_cert_with_quote(key, quote), POLICY, sim_platform.verifier())


def test_missing_quote_extension(sim_platform: SimPlatformDir) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = build_self_signed(key, "manager", is_ca=False).public_bytes(Encoding.DER)
    with pytest.raises(ChannelError):
        verify_enclave_certificate(der, POLICY, sim_platform.verifier())


def test_garbage_quote(sim_platform: SimPlatformDir) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ChannelError):
        verify_enclave_certificate(
            _cert_with_quote(key, b"\x03" * 100), POLICY, sim_platform.verifier()
        )


def test_bad_self_signature(sim_platform: SimPlatformDir) -> None:
    cred = EnclaveCredential.create(sim_platform.enclave_platform(MANAGER), "manager")
    der = bytearray(cred.cert_der)
    der[-5] ^= 0x01  # inside the signature value
    with pytest.raises(ChannelError):
        verify_enclave_certificate(bytes(der), POLICY, sim_platform.verifier())


def test_not_a_certificate(sim_platform: SimPlatformDir) -> None:
    with pytest.raises(ChannelError):
        verify_enclave_certificate(b"\x30\x03\x02\x01\x00", POLICY, sim_platform.verifier())


def test_rsa_certificate_is_refused(sim_platform: SimPlatformDir) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "manager")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ChannelError):
        verify_enclave_certificate(cert.public_bytes(Encoding.DER), POLICY, sim_platform.verifier())


def test_common_name_checked_when_given(sim_platform: SimPlatformDir) -> None:
    cred = EnclaveCredential.create(sim_platform.enclave_platform(MANAGER), "instance-7")
    verify_enclave_certificate(cred.cert_der, POLICY, sim_platform.verifier(), "instance-7")
    with pytest.raises(ChannelError):
        verify_enclave_certificate(cred.cert_der, POLICY, sim_platform.verifier(), "manager")
