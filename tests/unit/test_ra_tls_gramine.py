"""RA-TLS interop with Gramine (tools/sgx/ra-tls, v1.9), both ways, on the sim platform.

- Gramine -> us: a certificate laid out as Gramine's ``ra_tls_attest`` makes it
  (P-384 key, subject CN=RATLS,O=GramineDevelopers,C=US, serial 1, validity
  2001-2030, not a CA, SKI+AKI, the legacy quote under Gramine's OID encoding
  that keeps the DER tag and length, and the TCG DICE tagged evidence), built
  here from that documented layout with sim quotes, is accepted by
  :func:`verify_enclave_certificate`.
- us -> Gramine: a port of Gramine's extraction (a byte search for the OID in
  the certificate's extensions, then an optional criticality BOOLEAN and an
  OCTET STRING with a two-byte length) finds the evidence and the legacy quote
  in our certificates, and Gramine's binding checks hold for them.
"""

from __future__ import annotations

import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from sgxvtpm.channel import ChannelError, EnclaveCredential, verify_enclave_certificate
from sgxvtpm.channel import evidence as ev
from sgxvtpm.channel.evidence import build_self_signed, spki_der
from sgxvtpm.platform.base import EnclaveIdentity, MeasurementPolicy
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.util import cbor

APP = EnclaveIdentity(mrenclave=b"\x44" * 32, mrsigner=b"\x55" * 32, isv_prod_id=7, isv_svn=2)
POLICY = MeasurementPolicy(mrenclaves=frozenset({APP.mrenclave}))

# Raw bytes Gramine searches for (ra_tls.h): its legacy OID constant keeps the
# DER tag and length (06 09); the DICE one is searched with its tag and length.
GRAMINE_LEGACY_OID_BYTES = bytes.fromhex("06092A864886F84D8A3906")
GRAMINE_DICE_OID_RAW = bytes.fromhex("060667810505 0409".replace(" ", ""))
SGX_QUOTE_MAX_SIZE = 8192  # pal/src/host/linux-sgx/sgx_attest.h
REPORT_DATA_OFFSET = 48 + 320  # quote header, then REPORTDATA at 320 in the report body
PCK_SGX_EXTENSIONS_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")


def _report_data(quote: bytes) -> bytes:
    return quote[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + 64]


# --- Gramine -> us -----------------------------------------------------------


def gramine_layout_certificate(
    platform: SimPlatformDir, *, dice: bool = True, legacy: bool = True
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate with the layout of Gramine's ra_tls_attest.c (facts, not its code)."""
    enclave = platform.enclave_platform(APP)
    key = ec.generate_private_key(ec.SECP384R1())
    spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "RATLS"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GramineDevelopers"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2030, 12, 31, 23, 59, 59, tzinfo=datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
    )
    if legacy:
        # generate_quote_with_pk_hash: REPORTDATA = SHA-256(SPKI DER), rest zero.
        quote = enclave.quote(hashlib.sha256(spki).digest() + bytes(32))
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ev.GRAMINE_QUOTE_EXTENSION_OID, quote), False
        )
    if dice:
        hash_entry = cbor.encode([1, hashlib.sha256(spki).digest()])
        claims = cbor.encode({"pubkey-hash": hash_entry})
        quote = enclave.quote(hashlib.sha256(claims).digest() + bytes(32))
        evidence = cbor.encode(cbor.Tag(60000, [quote, claims]))
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ev.EVIDENCE_EXTENSION_OID, evidence), False
        )
    return key, builder.sign(key, hashes.SHA256())


def test_gramine_oid_encoding_is_what_gramine_writes() -> None:
    # mbedtls_x509write_crt_set_extension writes the constant as the OID's value.
    cert_der = gramine_layout_certificate_der_only_oid()
    assert b"\x06\x0b" + GRAMINE_LEGACY_OID_BYTES in cert_der


def gramine_layout_certificate_der_only_oid() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    ext = x509.UnrecognizedExtension(ev.GRAMINE_QUOTE_EXTENSION_OID, b"q" * 300)
    return build_self_signed(key, "x", is_ca=False, extensions=[ext]).public_bytes(Encoding.DER)


@pytest.mark.parametrize(
    ("dice", "legacy", "source"),
    [
        (True, True, "tagged evidence"),  # Gramine v1.8 and later
        (False, True, "legacy quote"),  # Gramine v1.0 - v1.7
        (True, False, "tagged evidence"),
    ],
)
def test_gramine_layout_certificate_is_accepted(
    sim_platform: SimPlatformDir, dice: bool, legacy: bool, source: str
) -> None:
    _, cert = gramine_layout_certificate(sim_platform, dice=dice, legacy=legacy)
    verified = verify_enclave_certificate(
        cert.public_bytes(Encoding.DER), POLICY, sim_platform.verifier()
    )
    assert verified.identity.mrenclave == APP.mrenclave
    bound = ev.bound_quote(cert)
    assert bound.source.startswith(source)
    assert verified.report_data == bound.report_data


# --- us -> Gramine -----------------------------------------------------------


def _der_children(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, content) of each DER item in ``data`` (definite lengths)."""
    out, pos = [], 0
    while pos < len(data):
        tag, first = data[pos], data[pos + 1]
        pos += 2
        if first & 0x80:
            n = first & 0x7F
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        else:
            length = first
        out.append((tag, data[pos : pos + length]))
        pos += length
    return out


def v3_extensions(cert: x509.Certificate) -> bytes:
    """What mbedTLS calls crt->v3_ext: the [3] EXPLICIT Extensions of the TBSCertificate."""
    ((_, tbs),) = _der_children(cert.tbs_certificate_bytes)
    (exts,) = [content for tag, content in _der_children(tbs) if tag == 0xA3]
    return exts


def gramine_find_oid_value(exts: bytes, oid: bytes) -> bytes:
    """Port of ra_tls_verify_common.c find_oid_in_cert_extensions (logic only)."""
    at = exts.find(oid)
    if at < 0:
        raise LookupError("OID not found")
    p = at + len(oid)
    if exts[p : p + 1] == b"\x01":  # an explicit criticality BOOLEAN must be FALSE
        if exts[p + 1 : p + 3] != b"\x01\x00":
            raise ValueError("critical")
        p += 3
    if exts[p : p + 2] != b"\x04\x82":  # OCTET STRING, two length bytes
        raise ValueError("not an OCTET STRING with a two-byte length")
    size = int.from_bytes(exts[p + 2 : p + 4], "big")
    value = exts[p + 4 : p + 4 + size]
    if not 128 <= size <= SGX_QUOTE_MAX_SIZE or len(value) != size:
        raise ValueError("bad size")
    return value


def gramine_extract(cert: x509.Certificate) -> tuple[str, bytes]:
    """Port of extract_quote_and_verify_claims: DICE first, then the legacy quote."""
    exts = v3_extensions(cert)
    spki = spki_der(cert.public_key())  # type: ignore[arg-type]
    try:
        evidence = gramine_find_oid_value(exts, GRAMINE_DICE_OID_RAW)
    except LookupError:
        quote = gramine_find_oid_value(exts, GRAMINE_LEGACY_OID_BYTES)
        assert _report_data(quote)[:32] == hashlib.sha256(spki).digest()
        return "legacy", quote
    tagged = cbor.decode(evidence)
    assert isinstance(tagged, cbor.Tag) and tagged.number == 60000
    quote, claims = tagged.value  # type: ignore[misc]
    assert isinstance(quote, bytes) and isinstance(claims, bytes)
    assert _report_data(quote)[:32] == hashlib.sha256(claims).digest()
    claims_map = cbor.decode(claims)
    assert isinstance(claims_map, dict)
    hash_entry = claims_map["pubkey-hash"]
    assert isinstance(hash_entry, bytes)
    assert cbor.decode(hash_entry) == [1, hashlib.sha256(spki).digest()]
    return "dice", quote


def test_gramine_extraction_finds_both_quotes_in_ours(sim_platform: SimPlatformDir) -> None:
    cred = EnclaveCredential.create(sim_platform.enclave_platform(APP), "manager", is_ca=True)
    kind, quote = gramine_extract(cred.certificate)
    assert kind == "dice"
    verified = sim_platform.verifier().verify(quote)
    assert verified.identity.mrenclave == APP.mrenclave
    # Gramine v1.0 - v1.7 verifiers read only the legacy extension: it is there too.
    legacy = gramine_find_oid_value(v3_extensions(cred.certificate), GRAMINE_LEGACY_OID_BYTES)
    assert _report_data(legacy) == ev.report_data_for(spki_der(cred.key.public_key()))
    assert sim_platform.verifier().verify(legacy).identity == verified.identity


def test_our_certificate_uses_ra_tls_oids_not_the_pck_oid(sim_platform: SimPlatformDir) -> None:
    cred = EnclaveCredential.create(sim_platform.enclave_platform(APP), "instance")
    oids = {e.oid for e in cred.certificate.extensions}
    assert {ev.EVIDENCE_EXTENSION_OID, ev.QUOTE_EXTENSION_OID} <= oids
    assert PCK_SGX_EXTENSIONS_OID not in oids
    for oid in (ev.EVIDENCE_EXTENSION_OID, ev.QUOTE_EXTENSION_OID):
        assert not cred.certificate.extensions.get_extension_for_oid(oid).critical


# --- what our verifier refuses ----------------------------------------------


def _cert_with(key: ec.EllipticCurvePrivateKey, *exts: x509.ExtensionType) -> bytes:
    cert = build_self_signed(key, "manager", is_ca=True, extensions=list(exts))
    return cert.public_bytes(Encoding.DER)


def test_quote_under_the_old_pck_oid_is_refused(sim_platform: SimPlatformDir) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    quote = sim_platform.enclave_platform(APP).quote(ev.report_data_for(spki_der(key.public_key())))
    der = _cert_with(key, x509.UnrecognizedExtension(PCK_SGX_EXTENSIONS_OID, quote))
    with pytest.raises(ChannelError):
        verify_enclave_certificate(der, POLICY, sim_platform.verifier())


def _dice(platform: SimPlatformDir, claims: bytes, quote_claims: bytes | None = None) -> bytes:
    quote = platform.enclave_platform(APP).quote(
        ev.report_data_for_claims(claims if quote_claims is None else quote_claims)
    )
    return ev.tagged_evidence(quote, claims)


def test_broken_evidence_is_final_even_with_a_good_legacy_quote(
    sim_platform: SimPlatformDir,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    spki = spki_der(key.public_key())
    good_legacy = sim_platform.enclave_platform(APP).quote(ev.report_data_for(spki))
    other = spki_der(ec.generate_private_key(ec.SECP256R1()).public_key())
    cases = {
        "claims for another key": _dice(sim_platform, ev.pubkey_claims(other)),
        "quote over other claims": _dice(
            sim_platform, ev.pubkey_claims(spki), ev.pubkey_claims(other)
        ),
        "no pubkey-hash": _dice(sim_platform, cbor.encode({"nonce": b"n"})),
        "wrong tag": cbor.encode(cbor.Tag(60001, [good_legacy, ev.pubkey_claims(spki)])),
        "not CBOR": b"\xff" * 200,
    }
    for why, value in cases.items():
        der = _cert_with(
            key,
            x509.UnrecognizedExtension(ev.EVIDENCE_EXTENSION_OID, value),
            x509.UnrecognizedExtension(ev.QUOTE_EXTENSION_OID, good_legacy),
        )
        with pytest.raises(ChannelError):
            verify_enclave_certificate(der, POLICY, sim_platform.verifier())
            pytest.fail(why)
    # The same legacy quote alone is accepted: the refusals above were the evidence's.
    der = _cert_with(key, x509.UnrecognizedExtension(ev.QUOTE_EXTENSION_OID, good_legacy))
    verify_enclave_certificate(der, POLICY, sim_platform.verifier())


def test_evidence_claims_may_use_sha384_and_carry_other_claims(
    sim_platform: SimPlatformDir,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    spki = spki_der(key.public_key())
    entry = cbor.encode([7, hashlib.sha384(spki).digest()])
    claims = cbor.encode({"nonce": b"\x00" * 8, "pubkey-hash": entry})
    der = _cert_with(
        key, x509.UnrecognizedExtension(ev.EVIDENCE_EXTENSION_OID, _dice(sim_platform, claims))
    )
    verified = verify_enclave_certificate(der, POLICY, sim_platform.verifier())
    assert verified.report_data == ev.report_data_for_claims(claims)
