"""``sgxvtpm attest quote FILE``: verify a raw DCAP quote (real or sim) and print what it says.

The quote is checked with :class:`sgxvtpm.platform.dcap.DcapQuoteVerifier`
against collateral from a file (dcap-qvl QuoteCollateralV3 JSON: what a PCCS
serves, or a sim platform's ``collateral.json``) and one root: ``intel`` (Intel's
SGX Root CA, pinned by its SHA-256, taken from the collateral's chain) or a PEM
file (a sim platform's ``root_ca.pem``). With ``--pccs URL`` instead of a file, the
collateral is fetched from that PCCS (or its on-disk cache, platform/pccs.py): untrusted
all the same, checked under the same root.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.platform import dcap
from sgxvtpm.platform import pccs as pccs_client
from sgxvtpm.platform.base import AttestationError

ROOT_INTEL = "intel"


class QuoteCheckError(SgxvtpmError):
    """The quote, its collateral or the root could not be read; the message says which file."""


def parse_time(text: str) -> datetime.datetime:
    """``--at``: seconds since the epoch, or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        if text.isdigit():
            return datetime.datetime.fromtimestamp(int(text), datetime.UTC)
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise QuoteCheckError(f"--at {text!r}: not seconds since the epoch or ISO 8601") from None
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise QuoteCheckError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _root(root: str, collateral: Any) -> bytes:
    if root == ROOT_INTEL:
        return dcap.intel_root(collateral)
    try:
        cert = x509.load_pem_x509_certificate(_read(Path(root), "root certificate"))
    except ValueError:
        raise QuoteCheckError(f"{root} is not a PEM certificate") from None
    return cert.public_bytes(serialization.Encoding.DER)


def check_quote(
    quote: bytes,
    collateral_json: str,
    *,
    root: str = ROOT_INTEL,
    at: datetime.datetime | None = None,
    accept: Sequence[str] = (dcap.UP_TO_DATE,),
) -> dcap.DcapReport:
    """Verify ``quote``; AttestationError if it does not verify at all."""
    collateral = dcap.load_collateral(collateral_json)
    verifier = dcap.DcapQuoteVerifier(collateral, _root(root, collateral), accept=accept, clock=at)
    return verifier.check(quote)


def report_fields(report: dcap.DcapReport) -> dict[str, Any]:
    fields: dict[str, Any] = {"tee": report.tee}
    if report.body is not None:
        ident = report.body.identity
        fields |= {
            "mrenclave": ident.mrenclave.hex(),
            "mrsigner": ident.mrsigner.hex(),
            "isv_prod_id": ident.isv_prod_id,
            "isv_svn": ident.isv_svn,
            "debug": report.debug,
        }
    else:
        fields["mrtd"] = report.mrtd.hex()
    fields |= {
        "report_data": report.report_data.hex(),
        "tcb_status": report.tcb_status,
        "advisory_ids": list(report.advisory_ids),
        "accepted": report.accepted,
    }
    if report.refusal:
        fields["refusal"] = report.refusal
    return fields


def run(
    quote_file: Path,
    *,
    collateral_file: Path | None,
    root: str,
    pccs: str | None = None,
    at: str | None,
    as_json: bool,
    accept: Sequence[str],
) -> int:
    """The CLI command: 0 if the quote verifies and the policy accepts it, 1 otherwise."""
    if collateral_file is not None and pccs:
        raise QuoteCheckError("--collateral FILE and --pccs URL: give one of them")
    if collateral_file is None and not pccs:
        raise QuoteCheckError(
            "--collateral FILE (dcap-qvl QuoteCollateralV3 JSON from a PCCS, or a sim "
            "platform's collateral.json) or --pccs URL (fetched, then cached) is needed"
        )
    quote = _read(quote_file, "quote")
    when = parse_time(at) if at else None
    if collateral_file is not None:
        collateral = _read(collateral_file, "collateral").decode("utf-8", "replace")
    else:
        assert pccs
        collateral = pccs_client.fetch_collateral(pccs, quote, now=when)
    try:
        report = check_quote(
            quote, collateral, root=root, at=when,
            accept=accept,
        )  # fmt: skip
    except AttestationError as exc:
        if as_json:
            print(json.dumps({"verified": False, "error": str(exc)}))
        else:
            print(f"quote: NOT VERIFIED: {exc}")
        return 1
    fields = report_fields(report)
    if as_json:
        print(json.dumps({"verified": True, **fields}, indent=1))
    else:
        for key, value in fields.items():
            shown = ", ".join(value) or "(none)" if isinstance(value, list) else value
            print(f"{key:>13}: {shown}")
        print("quote: OK" if report.accepted else f"quote: REFUSED: {report.refusal}")
    return 0 if report.accepted else 1
