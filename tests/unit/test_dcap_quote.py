"""DCAP verification (platform/dcap.py over dcap-qvl) of real Intel quotes and of sim quotes.

The real quotes and collateral are tests/vectors/dcap (MIT, from dcap-qvl's
repository; README.md there). Times: inside the collateral's validity is its
later issue date plus one hour.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sgxvtpm import cli
from sgxvtpm.attest.quote import check_quote
from sgxvtpm.platform import dcap
from sgxvtpm.platform.base import SGX_FLAGS_DEBUG, AttestationError, EnclaveIdentity
from sgxvtpm.platform.sim import SimPlatformDir, provision
from sgxvtpm.platform.sim.platform_dir import COLLATERAL_JSON, ROOT_PEM

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "dcap"
SGX_AT = 1750334171  # 2025-06-19T11:56:11Z
TDX_AT = 1750332747
SGX_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
SGX_MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
APP = EnclaveIdentity(mrenclave=b"\x66" * 32, mrsigner=b"\x77" * 32, isv_prod_id=3, isv_svn=4)


def _vector(name: str) -> tuple[bytes, str]:
    return (VECTORS / f"{name}_quote").read_bytes(), (
        VECTORS / f"{name}_quote_collateral.json"
    ).read_text()


def test_vectors_are_the_attributed_files() -> None:
    readme = (VECTORS / "README.md").read_text()
    assert "MIT License" in readme and "Phala-Network/dcap-qvl" in readme
    for name in (
        "sgx_quote",
        "sgx_quote_collateral.json",
        "tdx_quote",
        "tdx_quote_collateral.json",
    ):
        assert hashlib.sha256((VECTORS / name).read_bytes()).hexdigest() in readme


def test_intel_root_pin_matches_the_collateral_root() -> None:
    _, collateral = _vector("sgx")
    root = x509.load_der_x509_certificate(dcap.intel_root(dcap.load_collateral(collateral)))
    assert root.subject.rfc4514_string().endswith("O=Intel Corporation,CN=Intel SGX Root CA")


def test_real_sgx_quote_verifies_with_tcb_status_and_advisories() -> None:
    quote, collateral = _vector("sgx")
    report = check_quote(
        quote, collateral, at=datetime.datetime.fromtimestamp(SGX_AT, datetime.UTC)
    )
    assert report.tee == "SGX" and report.body is not None
    assert report.body.identity.mrenclave.hex() == SGX_MRENCLAVE
    assert report.body.identity.mrsigner.hex() == SGX_MRSIGNER
    assert report.report_data == b"Hello, world!".ljust(64, b"\0")
    assert report.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert report.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    # The default policy accepts only UpToDate; this status is opt-in.
    assert not report.accepted and "not accepted" in report.refusal
    opted = check_quote(
        quote, collateral, at=datetime.datetime.fromtimestamp(SGX_AT, datetime.UTC),
        accept=("UpToDate", "ConfigurationAndSWHardeningNeeded"),
    )  # fmt: skip
    assert opted.accepted and not opted.debug


def test_real_tdx_quote_verifies_up_to_date() -> None:
    quote, collateral = _vector("tdx")
    report = check_quote(
        quote, collateral, at=datetime.datetime.fromtimestamp(TDX_AT, datetime.UTC)
    )
    assert (report.tee, report.tcb_status, report.accepted) == ("TDX", "UpToDate", True)
    assert len(report.mrtd) == 48 and report.body is None


@pytest.mark.parametrize(
    ("at", "reason"),
    [(SGX_AT + 40 * 86400, "expired"), (SGX_AT - 2 * 86400, "in the future")],
)
def test_real_quote_fails_outside_the_collateral_time(at: int, reason: str) -> None:
    quote, collateral = _vector("sgx")
    with pytest.raises(AttestationError, match=reason):
        check_quote(quote, collateral, at=datetime.datetime.fromtimestamp(at, datetime.UTC))


def test_real_quote_with_a_flipped_bit_fails() -> None:
    quote, collateral = _vector("sgx")
    flipped = bytearray(quote)
    flipped[48 + 320] ^= 1  # REPORTDATA's first byte
    at = datetime.datetime.fromtimestamp(SGX_AT, datetime.UTC)
    with pytest.raises(AttestationError, match="signature"):
        check_quote(bytes(flipped), collateral, at=at)


def test_real_quote_under_another_root_fails(sim_platform: SimPlatformDir, tmp_path: Path) -> None:
    quote, collateral = _vector("sgx")
    pem = tmp_path / "root.pem"
    pem.write_bytes(sim_platform.root_certificate_pem)
    with pytest.raises(AttestationError):
        check_quote(quote, collateral, root=str(pem),
                    at=datetime.datetime.fromtimestamp(SGX_AT, datetime.UTC))  # fmt: skip
    # And "intel" refuses collateral whose chain ends in another root.
    with pytest.raises(AttestationError, match="not Intel"):
        check_quote(quote, sim_platform.dcap_collateral())


# --- sim quotes through the same path -------------------------------------------


def _sim_verifier(platform: SimPlatformDir, **kw: object) -> dcap.DcapQuoteVerifier:
    root = x509.load_pem_x509_certificate(platform.root_certificate_pem)
    return dcap.DcapQuoteVerifier(
        dcap.load_collateral(platform.dcap_collateral()),
        root.public_bytes(Encoding.DER),
        **kw,  # type: ignore[arg-type]
    )


def test_fresh_sim_quote_verifies_through_dcap(fresh_sim_platform: SimPlatformDir) -> None:
    report_data = bytes(range(64))
    quote = fresh_sim_platform.enclave_platform(APP).quote(report_data)
    verified = _sim_verifier(fresh_sim_platform).verify(quote)
    assert verified.identity.mrenclave == APP.mrenclave
    assert (verified.identity.isv_prod_id, verified.identity.isv_svn) == (3, 4)
    assert verified.report_data == report_data
    report = _sim_verifier(fresh_sim_platform).check(quote)
    assert (report.tcb_status, report.advisory_ids, report.accepted) == ("UpToDate", (), True)
    # The sim verifier the enclaves use agrees.
    assert fresh_sim_platform.verifier().verify(quote).body == verified.body


def test_sim_pck_certificate_carries_the_sgx_extension(
    fresh_sim_platform: SimPlatformDir,
) -> None:
    import dcap_qvl

    quote = fresh_sim_platform.enclave_platform(APP).quote(bytes(64))
    parsed = dcap_qvl.parse_quote(quote)
    assert parsed.fmspc() in (provision.SIM_FMSPC, provision.SIM_FMSPC.hex().upper())
    assert bytes(parsed.pck_extension().ppid) == fresh_sim_platform.platform_id
    assert parsed.pck_extension().pce_svn == provision.PCE_SVN


def test_sim_quote_from_another_platform_fails(
    fresh_sim_platform: SimPlatformDir, other_sim_platform: SimPlatformDir
) -> None:
    quote = other_sim_platform.enclave_platform(APP).quote(bytes(64))
    with pytest.raises(AttestationError):
        _sim_verifier(fresh_sim_platform).verify(quote)


def test_sim_quote_flipped_bit_fails(fresh_sim_platform: SimPlatformDir) -> None:
    quote = bytearray(fresh_sim_platform.enclave_platform(APP).quote(bytes(64)))
    quote[48 + 64] ^= 0x80  # MRENCLAVE
    with pytest.raises(AttestationError):
        _sim_verifier(fresh_sim_platform).verify(bytes(quote))


def test_debug_enclave_policy(fresh_sim_platform: SimPlatformDir) -> None:
    attributes = bytes([SGX_FLAGS_DEBUG | 0x01]) + bytes(15)
    debug = EnclaveIdentity(
        mrenclave=APP.mrenclave, mrsigner=APP.mrsigner, isv_prod_id=3, isv_svn=4,
        attributes=attributes,
    )  # fmt: skip
    quote = fresh_sim_platform.enclave_platform(debug).quote(bytes(64))
    # dcap-qvl refuses debug enclaves itself (no switch): so does this verifier.
    with pytest.raises(AttestationError, match="Debug"):
        _sim_verifier(fresh_sim_platform).check(quote)
    # The same identity without DEBUG passes: the refusal was the debug bit's.
    assert (
        _sim_verifier(fresh_sim_platform)
        .verify(fresh_sim_platform.enclave_platform(APP).quote(bytes(64)))
        .identity
        == APP
    )


def test_unknown_tcb_status_in_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown TCB status"):
        dcap.DcapQuoteVerifier(None, b"", accept=("UpToDat",))


# --- the CLI ------------------------------------------------------------------------


def test_cli_real_quote(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "attest",
        "quote",
        str(VECTORS / "sgx_quote"),
        "--collateral",
        str(VECTORS / "sgx_quote_collateral.json"),
        "--at",
        str(SGX_AT),
    ]
    assert cli.main(args) == 1  # verified, but the default policy refuses its TCB status
    out = capsys.readouterr().out
    assert SGX_MRENCLAVE in out and "INTEL-SA-00615" in out and "REFUSED" in out
    assert cli.main([*args, "--accept", "ConfigurationAndSWHardeningNeeded", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["verified"] and shown["accepted"] and shown["mrsigner"] == SGX_MRSIGNER
    assert shown["isv_prod_id"] == 0 and shown["report_data"].startswith(b"Hello".hex())


def test_cli_sim_quote_and_errors(
    fresh_sim_platform: SimPlatformDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quote = tmp_path / "quote"
    quote.write_bytes(fresh_sim_platform.enclave_platform(APP).quote(bytes(64)))
    pd = fresh_sim_platform.path
    args = ["attest", "quote", str(quote), "--collateral", str(pd / COLLATERAL_JSON),
            "--root", str(pd / ROOT_PEM), "--json"]  # fmt: skip
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["mrenclave"] == APP.mrenclave.hex()
    assert cli.main([*args[:3], "--at", "yesterday"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "collateral" in err  # one clear line
