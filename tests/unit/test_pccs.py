"""DCAP collateral from a PCCS (platform/pccs.py, ``sgxvtpm attest quote --pccs``).

Against a local stand-in PCCS (tests/helpers/pccs.py: http.server on 127.0.0.1
serving the vector collateral on Intel's PCCS v4 paths and headers) through
dcap-qvl's own fetcher: no external network.
"""

from __future__ import annotations

import datetime
import json
import socket
import stat
from pathlib import Path

import pytest
from cryptography import x509
from tests.helpers.pccs import FakePccs

from sgxvtpm import cli
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.platform import pccs
from sgxvtpm.platform.base import AttestationError, EnclaveIdentity
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.vmm.credentials import Credentials, CredentialsError, HostCredentials

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "dcap"
SGX_AT = 1750334171  # inside the vector collateral's validity (tests/vectors/dcap/README.md)
AFTER = 1753000000  # 2025-07-20: after its earliest nextUpdate (2025-07-19T10:01:18Z)
QUOTE = VECTORS / "sgx_quote"
APP = EnclaveIdentity(mrenclave=b"\x66" * 32, mrsigner=b"\x77" * 32, isv_prod_id=3, isv_svn=4)
COLLATERAL = (VECTORS / "sgx_quote_collateral.json").read_text()


@pytest.fixture(autouse=True)
def _cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sgxvtpm"


def _cli(url: str, at: int, *extra: str) -> list[str]:
    return ["attest", "quote", str(QUOTE), "--pccs", url, "--at", str(at),
            "--accept", "ConfigurationAndSWHardeningNeeded", "--json", *extra]  # fmt: skip


def test_fetcher_asks_the_pccs_v4_paths_and_rebuilds_the_collateral(_cache_home: Path) -> None:
    at = datetime.datetime.fromtimestamp(SGX_AT, datetime.UTC)
    with FakePccs(COLLATERAL).running() as server:
        got = pccs.fetch_collateral(server.url, QUOTE.read_bytes(), now=at)
    want = json.loads(COLLATERAL)
    assert {k: v for k, v in json.loads(got).items() if k in want} == want
    assert [r.split("?")[0] for r in server.requests] == [
        "/sgx/certification/v4/pckcrl", "/sgx/certification/v4/tcb",
        "/sgx/certification/v4/qe/identity", "/sgx/certification/v4/rootcacrl"]  # fmt: skip
    assert "fmspc=00A067110000" in server.requests[1] and "ca=processor" in server.requests[0]
    (entry,) = _cache_home.iterdir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE(_cache_home.stat().st_mode) == 0o700


def test_cli_verifies_through_pccs_then_from_the_cache(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakePccs(COLLATERAL).running() as server:
        assert cli.main(_cli(server.url, SGX_AT)) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["verified"] and shown["accepted"]
        assert shown["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
        asked = len(server.requests)
        assert asked == 4
        assert cli.main(_cli(server.url, SGX_AT)) == 0  # the cache: the PCCS sees nothing
        assert json.loads(capsys.readouterr().out)["accepted"]
        assert len(server.requests) == asked


def test_expired_cache_entry_is_fetched_again_never_served(_cache_home: Path) -> None:
    quote = QUOTE.read_bytes()
    at = datetime.datetime.fromtimestamp(SGX_AT, datetime.UTC)
    later = datetime.datetime.fromtimestamp(AFTER, datetime.UTC)
    with FakePccs(COLLATERAL).running() as server:
        pccs.fetch_collateral(server.url, quote, now=at)
        assert len(server.requests) == 4
        pccs.fetch_collateral(server.url, quote, now=later)
        assert len(server.requests) == 8  # expired at `later`: asked again
        # What the PCCS answered is expired too: not cached, the old entry gone.
        assert list(_cache_home.iterdir()) == []
        pccs.fetch_collateral(server.url, quote, now=at)
        assert len(server.requests) == 12


def test_expired_cache_entry_is_not_served_to_the_cli(
    _cache_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakePccs(COLLATERAL).running() as server:
        assert cli.main(_cli(server.url, SGX_AT)) == 0
        capsys.readouterr()
        assert cli.main(_cli(server.url, AFTER)) == 1
        assert "expired" in json.loads(capsys.readouterr().out)["error"]
        assert len(server.requests) == 8


def test_pccs_serving_collateral_under_another_root_is_refused(
    sim_platform: SimPlatformDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakePccs(sim_platform.dcap_collateral()).running() as server:
        assert cli.main(_cli(server.url, SGX_AT)) == 1
        shown = json.loads(capsys.readouterr().out)
        assert shown["verified"] is False and "not Intel's SGX Root CA" in shown["error"]
        # A pinned PEM root other than the one the quote chains to: refused as well.
        pem = tmp_path / "root.pem"
        pem.write_bytes(sim_platform.root_certificate_pem)
        assert cli.main(_cli(server.url, SGX_AT, "--root", str(pem))) == 1
        assert json.loads(capsys.readouterr().out)["verified"] is False


def test_pccs_down_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    assert cli.main(_cli(url, SGX_AT)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"PCCS {url}: cannot fetch collateral" in err


def test_collateral_file_or_pccs_not_both(capsys: pytest.CaptureFixture[str]) -> None:
    args = _cli("http://127.0.0.1:1", SGX_AT, "--collateral", str(VECTORS / "x.json"))
    assert cli.main(args) == 1
    assert "give one of them" in capsys.readouterr().err
    assert cli.main(["attest", "quote", str(QUOTE)]) == 1
    assert "--pccs URL" in capsys.readouterr().err


# --- the clients of a Gramine host: `pccs` in the pins, or $SGXVTPM_PCCS_URL ----------


def _gramine_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pins: dict[str, object]
                  ) -> HostCredentials:  # fmt: skip
    monkeypatch.setenv("SGXVTPM_PLATFORM", "gramine")
    monkeypatch.delenv("SGXVTPM_COLLATERAL", raising=False)
    monkeypatch.delenv(pccs.ENV, raising=False)
    path = tmp_path / "pins.json"
    path.write_text(json.dumps({"mrenclave": {"manager": "11" * 32, "instance": "22" * 32},
                                "mrsigner": "33" * 32, **pins}))  # fmt: skip
    monkeypatch.setenv("SGXVTPM_MEASUREMENTS", str(path))
    return Credentials.at(tmp_path / "creds").host(StateDir(tmp_path / "state"))


def test_gramine_client_fetches_collateral_lazily_then_from_the_cache(
    fresh_sim_platform: SimPlatformDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "root.pem").write_bytes(fresh_sim_platform.root_certificate_pem)
    quote = fresh_sim_platform.enclave_platform(APP).quote(b"\x05" * 64)
    with FakePccs(fresh_sim_platform.dcap_collateral()).running() as server:
        host = _gramine_host(tmp_path, monkeypatch, {"root": "root.pem", "pccs": server.url})
        verifier = host.verifier()
        assert server.requests == []  # lazy: nothing before the first quote
        assert verifier.verify(quote).body.identity.mrenclave == APP.mrenclave
        assert len(server.requests) == 4
        assert host.verifier().verify(quote).body.report_data == b"\x05" * 64
        assert len(server.requests) == 4  # the cache answered
        # A quote under another root: the same verifier refuses it.
        real = QUOTE.read_bytes()
        with pytest.raises(AttestationError):
            host.verifier().verify(real)


def test_env_pccs_overrides_and_a_collateral_file_wins(
    sim_platform: SimPlatformDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = _gramine_host(tmp_path, monkeypatch, {"pccs": "http://127.0.0.1:9"})
    assert host.pccs_url() == "http://127.0.0.1:9"
    monkeypatch.setenv(pccs.ENV, "http://127.0.0.1:10")
    assert host.pccs_url() == "http://127.0.0.1:10"
    monkeypatch.setenv("SGXVTPM_COLLATERAL", str(VECTORS / "sgx_quote_collateral.json"))
    assert host.pccs_url() == ""


def test_gramine_intel_root_comes_from_the_pccs_checked_against_the_pin(
    sim_platform: SimPlatformDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakePccs(COLLATERAL).running() as server:
        host = _gramine_host(tmp_path, monkeypatch, {"pccs": server.url})
        root = x509.load_pem_x509_certificate(host.attestation_root())
        assert root.subject.rfc4514_string().endswith("CN=Intel SGX Root CA")
        assert server.requests == ["/sgx/certification/v4/qe/identity"]
        host.attestation_root()
        assert len(server.requests) == 1  # cached (and checked against the pin again)
    with FakePccs(sim_platform.dcap_collateral()).running() as server:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-cache"))
        host = _gramine_host(tmp_path, monkeypatch, {"pccs": server.url})
        with pytest.raises(CredentialsError, match="not Intel's SGX Root CA"):
            host.attestation_root()


def test_pins_pccs_must_be_an_http_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = _gramine_host(tmp_path, monkeypatch, {"pccs": "file:///etc/passwd"})
    with pytest.raises(CredentialsError, match="pccs must be an http"):
        host.pccs_url()
