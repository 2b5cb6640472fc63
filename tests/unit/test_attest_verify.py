"""attest verify: the EK -> manager CA -> quote -> platform root chain, and its failures."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from tests.helpers.ek_ca import MANAGER, POLICY, ManagerCa, manager_ca

from sgxvtpm.attest import AttestReport, verify_ek_chain
from sgxvtpm.attest import verify as v
from sgxvtpm.channel.evidence import (
    QUOTE_EXTENSION_OID,
    build_self_signed,
    report_data_for,
    spki_der,
)
from sgxvtpm.enclaves.ekcert import issue_ek_certificate
from sgxvtpm.platform.base import EnclaveIdentity, MeasurementPolicy


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("attest")


@pytest.fixture(scope="module")
def ca(root: Path) -> ManagerCa:
    return manager_ca(root / "platform")


@pytest.fixture(scope="module")
def ek_key() -> rsa.RSAPublicKey:
    return rsa.generate_private_key(65537, 2048).public_key()


def _ek_cert(ca: ManagerCa, key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return issue_ek_certificate(ca.credential.key, ca.credential.certificate, key)


def _failed(report: AttestReport) -> list[str]:
    return [c.name for c in report.checks if c.passed is False]


def test_good_chain_passes(ca: ManagerCa, ek_key: rsa.RSAPublicKey) -> None:
    report = verify_ek_chain(
        _ek_cert(ca, ek_key), ca.cert_der, policy=POLICY, verifier=ca.verifier(), ek_public=ek_key
    )
    assert report.ok, report.render()
    assert report.reason == ""
    assert len(report.checks) == 8
    text = report.render()
    assert text.startswith("sgxvtpm attestation: PASS")
    assert MANAGER.mrenclave.hex() in text
    assert len(text.splitlines()) <= 24 and max(map(len, text.splitlines())) <= 100


def test_ek_signed_by_another_ca(ca: ManagerCa, root: Path, ek_key: rsa.RSAPublicKey) -> None:
    other = manager_ca(root / "platform")  # same platform, same enclave, another CA key
    report = verify_ek_chain(
        _ek_cert(other, ek_key), ca.cert_der, policy=POLICY, verifier=ca.verifier()
    )
    assert not report.ok
    assert report.reason == v.R_EK_SIGNATURE == "EK certificate not signed by this CA"
    assert _failed(report) == ["EK certificate signed by CA"]


def test_quote_from_another_platform_root(
    ca: ManagerCa, root: Path, ek_key: rsa.RSAPublicKey
) -> None:
    foreign = manager_ca(root / "other-platform")
    report = verify_ek_chain(
        _ek_cert(foreign, ek_key), foreign.cert_der, policy=POLICY, verifier=ca.verifier()
    )
    assert report.reason == v.R_QUOTE_ROOT == "CA quote not from this platform root"
    assert _failed(report) == ["CA quote verifies against platform root"]
    assert [c.passed for c in report.checks].count(None) == 2
    assert "FAIL" in report.render()


def test_measurement_not_in_policy(ca: ManagerCa, root: Path, ek_key: rsa.RSAPublicKey) -> None:
    rogue = EnclaveIdentity(
        mrenclave=b"\x66" * 32, mrsigner=MANAGER.mrsigner, isv_prod_id=1, isv_svn=3
    )
    other = manager_ca(root / "platform", rogue)
    report = verify_ek_chain(
        _ek_cert(other, ek_key), other.cert_der, policy=POLICY, verifier=ca.verifier()
    )
    assert report.reason == v.R_POLICY == "measurement not in policy"
    assert _failed(report) == ["quote measurement in policy"]
    assert (b"\x66" * 32).hex() in report.render()
    # the same CA is fine for a verifier whose policy names that enclave
    ok = verify_ek_chain(
        _ek_cert(other, ek_key), other.cert_der,
        policy=MeasurementPolicy(mrenclaves=frozenset({rogue.mrenclave})), verifier=ca.verifier(),
    )  # fmt: skip
    assert ok.ok


def test_ca_key_does_not_match_report_data(ca: ManagerCa, ek_key: rsa.RSAPublicKey) -> None:
    key_a = ec.generate_private_key(ec.SECP256R1())
    key_b = ec.generate_private_key(ec.SECP256R1())
    enclave = ca.platform.enclave_platform(MANAGER)
    quote_over_b = enclave.quote(report_data_for(spki_der(key_b.public_key())))
    ext = x509.UnrecognizedExtension(QUOTE_EXTENSION_OID, quote_over_b)
    cert_a = build_self_signed(key_a, "sgxvtpm manager CA", is_ca=True, extensions=[ext])
    ek_der = issue_ek_certificate(key_a, cert_a, ek_key)
    report = verify_ek_chain(
        ek_der, cert_a.public_bytes(Encoding.DER), policy=POLICY, verifier=ca.verifier()
    )
    assert report.reason == v.R_REPORT_DATA == "CA key does not match the quote's report data"
    assert _failed(report) == ["quote REPORTDATA binds CA key"]


def test_ek_public_from_tpm_differs(ca: ManagerCa, ek_key: rsa.RSAPublicKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    report = verify_ek_chain(
        _ek_cert(ca, ek_key), ca.cert_der, policy=POLICY, verifier=ca.verifier(), ek_public=other
    )
    assert report.reason == v.R_EK_PUBLIC
    assert _failed(report) == ["EK certificate matches the TPM's EK"]


def test_ca_without_quote(ca: ManagerCa, ek_key: rsa.RSAPublicKey) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    plain = build_self_signed(key, "plain CA", is_ca=True)
    report = verify_ek_chain(
        issue_ek_certificate(key, plain, ek_key), plain.public_bytes(Encoding.DER),
        policy=POLICY, verifier=ca.verifier(),
    )  # fmt: skip
    assert report.reason == v.R_NO_QUOTE


def test_not_a_ca(ca: ManagerCa, ek_key: rsa.RSAPublicKey) -> None:
    ek_der = _ek_cert(ca, ek_key)
    report = verify_ek_chain(ek_der, ek_der, policy=POLICY, verifier=ca.verifier())
    assert report.reason == v.R_CA_NOT_SELF_SIGNED


@pytest.mark.parametrize("which", ["ek", "ca"])
def test_garbage(ca: ManagerCa, ek_key: rsa.RSAPublicKey, which: str) -> None:
    good_ek, good_ca = _ek_cert(ca, ek_key), ca.cert_der
    ek_der, ca_der = (b"\x30\x03abc", good_ca) if which == "ek" else (good_ek, good_ek[:40])
    report = verify_ek_chain(ek_der, ca_der, policy=POLICY, verifier=ca.verifier())
    assert not report.ok
    assert report.reason == (v.R_EK_UNPARSABLE if which == "ek" else v.R_CA_UNPARSABLE)
    assert report.render().startswith("sgxvtpm attestation: FAIL")
