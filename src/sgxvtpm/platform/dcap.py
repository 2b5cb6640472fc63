"""DCAP quote verification with dcap-qvl (Phala-Network/dcap-qvl, MIT): real and sim quotes.

One verifier for Intel-signed quotes and for the sim platform's: the quote's
PCK chain, the PCK CRL and root CA CRL, the TCB Info and QE Identity (each
signed by a TCB signing certificate) must all chain to the one root
certificate the verifier was given, at the verification time; dcap-qvl then
matches the PCK certificate's SGX extension (FMSPC, PCEID, TCB components,
PCESVN) and the QE report against the collateral and answers a TCB status with
Intel's advisory IDs. This module adds what a verifier decides: which TCB
statuses it accepts (default: only ``UpToDate``) and which root is trusted
(Intel's SGX Root CA is pinned by its SHA-256, below). Debug enclaves
(ATTRIBUTES.DEBUG) are always refused: dcap-qvl 0.7's ``verify`` refuses them
("Debug mode is enabled") and its Python API has no switch; a debug enclave's
secrets are readable by its host, so nothing is lost.

Collateral is dcap-qvl's ``QuoteCollateralV3`` JSON (what ``dcap_qvl.get_collateral``
returns from a PCCS, and what tests/vectors/dcap holds); this module does no I/O.

Used in every attested handshake, sim and real (:func:`pinned_verifier`): by
the clients (the VMM, VM endpoints, ``sgxvtpm attest``) under the root they
pinned, and by the enclaves under the root their platform gives them
(``sgxvtpm attest quote`` takes a root on its command line). The collateral
itself may come from anywhere, the untrusted host included: every part of it
is signed under the pinned root and checked against it at each verification,
so a host that swaps, drops or ages it only gets quotes refused.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dcap_qvl
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from sgxvtpm.platform.base import (
    REPORT_BODY_SIZE,
    SGX_FLAGS_DEBUG,
    AttestationError,
    EnclaveIdentity,
    PlatformError,
    ReportBody,
    VerifiedQuote,
)

# SHA-256 of the DER of Intel's "SGX Root CA" certificate (CN=Intel SGX Root CA,
# O=Intel Corporation, valid 2018-05-21 .. 2049-12-31), as published at
# https://certificates.trustedservices.intel.com/Intel_SGX_Provisioning_Certification_RootCA.cer
# and found as the last certificate of every issuer chain in DCAP collateral
# (e.g. tests/vectors/dcap/sgx_quote_collateral.json, tcb_info_issuer_chain).
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"

UP_TO_DATE = "UpToDate"
# dcap-qvl's TCB status names (Intel's TCB Info tcbStatus values).
TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "Revoked",
    }
)

_HEADER_SIZE = 48
_TEE_SGX, _TEE_TDX = 0x00000000, 0x00000081
_TD_REPORT_DATA = slice(520, 584)  # TDX TD report body (TDX module ABI, TDREPORT 1.0)
_TD_MRTD = slice(136, 184)


class CollateralError(AttestationError):
    """The collateral file is not dcap-qvl QuoteCollateralV3 JSON; fetch it again from a PCCS."""


@dataclass(frozen=True)
class DcapReport:
    """What a DCAP verification tells, for a verifier to print and decide on."""

    tee: str  # "SGX" or "TDX"
    tcb_status: str
    advisory_ids: tuple[str, ...]
    report_data: bytes
    body: ReportBody | None = None  # SGX only
    mrtd: bytes = b""  # TDX only
    accepted: bool = False
    refusal: str = ""

    @property
    def debug(self) -> bool:
        return self.body is not None and bool(self.body.identity.attributes[0] & SGX_FLAGS_DEBUG)


def load_collateral(text: str) -> dcap_qvl.QuoteCollateralV3:
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except (ValueError, TypeError) as exc:
        raise CollateralError(f"collateral does not parse: {exc}") from None


def root_from_collateral(collateral: dcap_qvl.QuoteCollateralV3) -> bytes:
    """The DER of the root certificate the collateral's TCB Info chain ends in."""
    try:
        chain = x509.load_pem_x509_certificates(collateral.tcb_info_issuer_chain.encode())
    except ValueError as exc:
        raise CollateralError(f"collateral issuer chain does not parse: {exc}") from None
    return chain[-1].public_bytes(serialization.Encoding.DER)


def intel_root(collateral: dcap_qvl.QuoteCollateralV3) -> bytes:
    """Intel's SGX Root CA (DER), taken from the collateral and checked against the pin."""
    der = root_from_collateral(collateral)
    if hashlib.sha256(der).hexdigest() != INTEL_SGX_ROOT_CA_SHA256:
        raise CollateralError("the collateral's root is not Intel's SGX Root CA (pinned SHA-256)")
    return der


def pinned_verifier(root_pem: bytes, collateral_json: str) -> DcapQuoteVerifier:
    """The handshake verifier: quotes under ``root_pem`` (pinned by the caller), checked
    with ``collateral_json`` (untrusted bytes: signed under that root, checked at each
    verification). PlatformError if ``root_pem`` is not a self-signed root
    certificate; CollateralError if the collateral does not parse or its chain ends in
    another root than the pinned one.
    """
    try:
        root = x509.load_pem_x509_certificate(root_pem)
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PlatformError(f"not a self-signed root certificate: {exc}") from None
    root_der = root.public_bytes(serialization.Encoding.DER)
    collateral = load_collateral(collateral_json)
    if root_from_collateral(collateral) != root_der:
        raise CollateralError("the collateral's issuer chain ends in another root than the "
                              "pinned attestation root")
    return DcapQuoteVerifier(collateral, root_der)


def check_collateral(
    root_pem: bytes, collateral_json: str, *, now: datetime.datetime | None = None
) -> None:
    """Check collateral without a quote (hostd on a platform that gives it none,
    host/collateral.py): its TCB Info and QE Identity are signed by the leaf of their
    issuer chains, its PCK CRL by the first certificate of its chain and its root CA
    CRL by the root, every chain ends in ``root_pem`` with each certificate issued by
    the next, and nothing (certificate, CRL, TCB Info, QE Identity) is expired at
    ``now`` (default: the clock). CollateralError naming the first failure; what
    only a quote can check (its FMSPC, PCK certificate, TCB level) is left to the
    verifiers that have one."""
    when = now or datetime.datetime.now(datetime.UTC)
    try:
        root = x509.load_pem_x509_certificate(root_pem)
        data = json.loads(collateral_json)
        for name, chain_key, body_key, sig_key in (
            ("TCB Info", "tcb_info_issuer_chain", "tcb_info", "tcb_info_signature"),
            ("QE Identity", "qe_identity_issuer_chain", "qe_identity", "qe_identity_signature"),
        ):
            chain = _chain_to(root, data[chain_key], name, when)
            raw = bytes.fromhex(data[sig_key])
            if len(raw) != 64:
                raise CollateralError(f"the {name} signature is not 64 bytes (r || s)")
            signature = utils.encode_dss_signature(
                int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
            )
            key = chain[0].public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise CollateralError(f"the {name} signing key is not an EC key")
            key.verify(signature, data[body_key].encode(), ec.ECDSA(hashes.SHA256()))
            next_update = json.loads(data[body_key])["nextUpdate"]
            if _iso_time(next_update) <= when:
                raise CollateralError(f"the {name} expired at {next_update}")
        for name, crl_key, issuer in (
            ("PCK CRL", "pck_crl", _chain_to(root, data["pck_crl_issuer_chain"], "PCK CRL",
                                             when)[0]),
            ("root CA CRL", "root_ca_crl", root),
        ):
            crl = x509.load_der_x509_crl(bytes.fromhex(data[crl_key]))
            key = issuer.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
                raise CollateralError(f"the {name} is not signed by its issuer")
            if crl.next_update_utc is None or crl.next_update_utc <= when:
                raise CollateralError(f"the {name} expired at {crl.next_update_utc}")
    except InvalidSignature:
        raise CollateralError("a collateral signature does not verify under the pinned root") \
            from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CollateralError(f"collateral does not parse: {exc}") from None


def _chain_to(
    root: x509.Certificate, chain_pem: str, name: str, when: datetime.datetime
) -> list[x509.Certificate]:
    """The certificates of ``chain_pem`` (leaf first), each issued by the next and the
    last being ``root``, all valid at ``when``. InvalidSignature, CollateralError."""
    chain = x509.load_pem_x509_certificates(chain_pem.encode())
    if chain[-1] != root:
        raise CollateralError(f"the {name} issuer chain ends in another root than the "
                              "pinned attestation root")
    for cert, issuer in zip(chain, [*chain[1:], root], strict=True):
        cert.verify_directly_issued_by(issuer)
        if when > cert.not_valid_after_utc:
            raise CollateralError(f"a certificate of the {name} issuer chain expired at "
                                  f"{cert.not_valid_after_utc.isoformat()}")
        if when < cert.not_valid_before_utc:
            raise CollateralError(f"a certificate of the {name} issuer chain is not valid yet")
    return chain


def _iso_time(text: str) -> datetime.datetime:
    t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


class RefreshingVerifier:
    """A QuoteVerifier over the platform's collateral as it changes (``hostd --pccs``
    hands the platform newer copies while its enclaves run).

    A quote that fails with the copy in hand is tried once more with ``latest()``,
    the platform's current copy, if that one differs; the newer copy is kept when a
    quote verifies with it. Every copy is checked under the same pinned root, so
    whatever ``latest`` answers can only make quotes fail, never pass a bad one.
    """

    def __init__(self, root_pem: bytes, collateral: str, latest: Callable[[], str]) -> None:
        self._root_pem = root_pem
        self._collateral = collateral
        self._verifier = pinned_verifier(root_pem, collateral)
        self._latest = latest

    def verify(self, quote: bytes) -> VerifiedQuote:
        try:
            return self._verifier.verify(quote)
        except AttestationError:
            try:
                latest = self._latest()
                verifier = pinned_verifier(self._root_pem, latest) if latest else None
            except (PlatformError, OSError, ValueError):
                verifier = None
            if verifier is None or latest == self._collateral:
                raise
        verified = verifier.verify(quote)
        self._verifier, self._collateral = verifier, latest
        return verified


def parse_sgx_body(raw: bytes) -> ReportBody:
    """An SGX REPORT body (SDM 38.15: CPUSVN, MISCSELECT, ATTRIBUTES, MRENCLAVE,
    MRSIGNER, ISVPRODID, ISVSVN, REPORTDATA at their offsets)."""
    if len(raw) != REPORT_BODY_SIZE:
        raise AttestationError("report body is not 384 bytes")
    (misc_select,) = struct.unpack_from("<I", raw, 16)
    prod_id, svn = struct.unpack_from("<HH", raw, 256)
    identity = EnclaveIdentity(
        mrenclave=raw[64:96],
        mrsigner=raw[128:160],
        isv_prod_id=prod_id,
        isv_svn=svn,
        attributes=raw[48:64],
        misc_select=misc_select,
    )
    return ReportBody(identity=identity, report_data=raw[320:384], cpu_svn=raw[0:16])


def _utc(now: datetime.datetime | int) -> int:
    return now if isinstance(now, int) else int(now.timestamp())


class DcapQuoteVerifier:
    """Verify DCAP quotes under one root, with a policy of accepted TCB statuses.

    ``root_der`` is the trusted root (Intel's via :func:`intel_root`, or a sim
    platform's); ``accept`` the TCB statuses taken as good enough. ``clock`` gives the
    verification time (collateral and certificates must be valid then).
    """

    def __init__(
        self,
        collateral: dcap_qvl.QuoteCollateralV3,
        root_der: bytes,
        *,
        accept: Iterable[str] = (UP_TO_DATE,),
        clock: datetime.datetime | int | None = None,
    ) -> None:
        unknown = set(accept) - TCB_STATUSES
        if unknown:
            raise ValueError(f"unknown TCB status {sorted(unknown)}; known: {sorted(TCB_STATUSES)}")
        self._collateral = collateral
        self._root_der = root_der
        self._accept = frozenset(accept)
        self._clock = clock

    def _now(self) -> int:
        if self._clock is None:
            return int(datetime.datetime.now(datetime.UTC).timestamp())
        return _utc(self._clock)

    def check(self, quote: bytes) -> DcapReport:
        """Verify the quote's signatures and collateral; AttestationError if they fail.

        A quote that verifies but whose TCB status the policy refuses comes
        back with ``accepted`` False and the reason in ``refusal``.
        """
        quote = bytes(quote)
        try:
            result = dcap_qvl.verify_with_root_ca(
                quote, self._collateral, self._root_der, self._now()
            )
        except (ValueError, TypeError, RuntimeError) as exc:
            raise AttestationError(f"quote does not verify: {exc}") from None
        report = self._report(quote, str(result.status), tuple(result.advisory_ids))
        refusal = ""
        if report.tcb_status not in self._accept:
            refusal = f"TCB status {report.tcb_status} not accepted"
        elif report.debug:  # dcap-qvl refuses these already; kept should it stop doing so
            refusal = "debug enclave (ATTRIBUTES.DEBUG) not accepted"
        return DcapReport(
            tee=report.tee,
            tcb_status=report.tcb_status,
            advisory_ids=report.advisory_ids,
            report_data=report.report_data,
            body=report.body,
            mrtd=report.mrtd,
            accepted=not refusal,
            refusal=refusal,
        )

    @staticmethod
    def _report(quote: bytes, status: str, advisories: tuple[str, ...]) -> DcapReport:
        (tee,) = struct.unpack_from("<I", quote, 4)
        if tee == _TEE_SGX:
            body = parse_sgx_body(quote[_HEADER_SIZE : _HEADER_SIZE + REPORT_BODY_SIZE])
            return DcapReport("SGX", status, advisories, body.report_data, body=body)
        if tee == _TEE_TDX:
            td = quote[_HEADER_SIZE:]
            return DcapReport("TDX", status, advisories, td[_TD_REPORT_DATA], mrtd=td[_TD_MRTD])
        raise AttestationError(f"unknown TEE type {tee:#x}")

    def verify(self, quote: bytes) -> VerifiedQuote:
        """The :class:`QuoteVerifier` face: an accepted SGX quote, else AttestationError."""
        report = self.check(quote)
        if not report.accepted:
            raise AttestationError(report.refusal)
        if report.body is None:
            raise AttestationError("not an SGX enclave quote")
        return VerifiedQuote(body=report.body, platform_id=_ppid(quote))


def _ppid(quote: bytes) -> bytes:
    """The PPID in the verified quote's PCK certificate: the platform's identity."""
    try:
        return bytes(dcap_qvl.parse_quote(quote).pck_extension().ppid)
    except (ValueError, TypeError, RuntimeError, AttributeError) as exc:
        raise AttestationError(f"quote's PCK certificate has no PPID: {exc}") from None
