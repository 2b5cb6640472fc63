"""hostd --pccs on a platform that gives hostd no quote (gramine), and Gramine enclaves
that follow hostd's newer copy.

- what to fetch comes from the collateral hostd has (``pccs.collateral_key``: FMSPC
  from the TCB Info, CA from the PCK CRL's issuer), on real Intel collateral
  (tests/vectors/dcap) and the sim's;
- the fetch by (FMSPC, CA) speaks the PCCS v4 API to the stand-in PCCS
  (tests/helpers/pccs.py) and keeps the signed JSON byte for byte;
- the check without a quote (``dcap.check_collateral``): signatures, chains to the
  pinned root, nothing expired;
- the refresher against a real GramineBackend object (not launched: no tools
  needed for replace_collateral) over sim-root collateral;
- the enclave side: bootstrap.collateral_verifier re-reads the file hostd publishes.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from tests.helpers.pccs import FakePccs

from sgxvtpm.host import collateral as hc
from sgxvtpm.platform import dcap, pccs
from sgxvtpm.platform.base import AttestationError, PlatformError
from sgxvtpm.platform.gramine import bootstrap
from sgxvtpm.platform.gramine.launcher import COLLATERAL_FILE, GramineBackend, GramineLoader
from sgxvtpm.platform.sim import provision
from sgxvtpm.platform.sim.platform_dir import SimPlatformDir
from sgxvtpm.util import log

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "dcap"
INTEL = (VECTORS / "sgx_quote_collateral.json").read_text()
INTEL_VALID_AT = datetime.datetime(2025, 7, 1, tzinfo=datetime.UTC)  # before its nextUpdate
NOW = datetime.datetime.now(datetime.UTC)
LONG_AGO = NOW - datetime.timedelta(days=365 * 31)  # the sim collateral is valid 30 years


def _intel_root_pem() -> bytes:
    der = dcap.intel_root(dcap.load_collateral(INTEL))
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def _issued(platform: SimPlatformDir, at: datetime.datetime, days: float = 30 * 365) -> str:
    return provision.collateral(platform._private_key("root_ca"), platform.root_certificate_pem,
                                at, validity=datetime.timedelta(days=days))


def _other_fmspc(platform: SimPlatformDir, fmspc: str) -> str:
    """Sim collateral, correctly signed under the platform's root, for another FMSPC."""
    data = json.loads(platform.dcap_collateral())
    tcb = json.loads(data["tcb_info"])
    tcb["fmspc"] = fmspc
    data["tcb_info"] = json.dumps(tcb, separators=(",", ":"))
    signer = provision.tcb_signing_key(platform._private_key("root_ca"))
    data["tcb_info_signature"] = provision.sign_raw(signer, data["tcb_info"].encode()).hex()
    return json.dumps(data)


@pytest.fixture
def platform(tmp_path: Path) -> SimPlatformDir:
    return SimPlatformDir.open_or_create(tmp_path / "sim-platform")


# -- what to fetch -----------------------------------------------------------------------
def test_the_key_comes_from_the_collateral_even_expired(platform: SimPlatformDir) -> None:
    assert pccs.collateral_key(INTEL) == ("00A067110000", "processor")  # expired by now
    assert pccs.collateral_key(platform.dcap_collateral()) == ("00906ED50000", "processor")
    assert pccs.collateral_key(_issued(platform, LONG_AGO)) == ("00906ED50000", "processor")


def test_a_platform_ca_crl_names_the_platform_ca() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Intel SGX PCK Platform CA")])
    crl = (x509.CertificateRevocationListBuilder().issuer_name(name)
           .last_update(NOW).next_update(NOW + datetime.timedelta(days=1))
           .sign(key, hashes.SHA256()))  # fmt: skip
    data = json.loads(INTEL)
    data["pck_crl"] = crl.public_bytes(serialization.Encoding.DER).hex()
    assert pccs.collateral_key(json.dumps(data)) == ("00A067110000", "platform")


@pytest.mark.parametrize("broken", ["", "{}", '{"tcb_info": "{}", "pck_crl": "00"}', "fmspc"])
def test_collateral_without_a_key_is_one_error(broken: str) -> None:
    text = broken
    if broken == "fmspc":
        data = json.loads(INTEL)
        data["tcb_info"] = json.dumps({**json.loads(data["tcb_info"]), "fmspc": "XYZ"})
        text = json.dumps(data)
    with pytest.raises(pccs.PccsError):
        pccs.collateral_key(text)


# -- the fetch by (FMSPC, CA) ---------------------------------------------------------------
def test_fetch_by_key_speaks_pccs_v4_and_keeps_the_signed_json_as_served() -> None:
    with FakePccs(INTEL).running() as server:
        got = pccs.fetch_by_key(server.url + "/", "00a067110000", "processor")
    assert json.loads(got) == json.loads(INTEL)  # tcb_info and qe_identity byte for byte
    assert server.requests == [
        "/sgx/certification/v4/pckcrl?ca=processor&encoding=der",
        "/sgx/certification/v4/tcb?fmspc=00A067110000",
        "/sgx/certification/v4/qe/identity",
        "/sgx/certification/v4/rootcacrl",
    ]
    # What it fetched verifies the vector's real Intel quote, as the quote's own fetch does.
    quote = (VECTORS / "sgx_quote").read_bytes()
    verifier = dcap.DcapQuoteVerifier(dcap.load_collateral(got), dcap.intel_root(
        dcap.load_collateral(got)), clock=INTEL_VALID_AT)  # fmt: skip
    assert verifier.check(quote).tcb_status


def test_fetch_by_key_failures_are_one_line() -> None:
    with pytest.raises(pccs.PccsError, match="PCK CA"):
        pccs.fetch_by_key("http://127.0.0.1:9", "00A067110000", "both")
    with pytest.raises(pccs.PccsError, match="FMSPC"):
        pccs.fetch_by_key("http://127.0.0.1:9", "00A0671100", "processor")
    with pytest.raises(pccs.PccsError, match="cannot fetch collateral") as down:
        pccs.fetch_by_key("http://127.0.0.1:9", "00A067110000", "processor")
    assert "\n" not in str(down.value)
    data = json.loads(INTEL)
    with FakePccs(INTEL).running() as server:
        server.collateral = {**data, "tcb_info_signature": "not hex"}
        with pytest.raises(pccs.PccsError, match="not collateral"):
            pccs.fetch_by_key(server.url, "00A067110000", "processor")


members = st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4)


@given(members, members, st.sampled_from([(",", ":"), (", ", ": ")]), st.booleans())
def test_the_signed_member_is_the_text_as_served(
    inner: dict[str, object], extra: dict[str, object], seps: tuple[str, str], first: bool
) -> None:
    text = json.dumps(inner, separators=seps)
    parts = [f'"tcbInfo" : {text}', '"signature":"ab01"']
    parts += [f"{json.dumps(k)}:{json.dumps(v)}" for k, v in extra.items()
              if k not in ("tcbInfo", "signature")]
    if not first:
        parts.reverse()
    body = ("{ " + " ,\n".join(parts) + " }").encode()
    assert pccs._signed_member(body, "tcbInfo") == (text, "ab01")


@pytest.mark.parametrize("body", [b"", b"[]", b'{"tcbInfo": 1, "signature": "ab"}',
                                  b'{"tcbInfo": {}}', b'{"tcbInfo": {}, "signature": "xy"}',
                                  b'{"tcbInfo": {} "signature": "ab"}',
                                  b'{"tcbInfo": {}, "signature": "ab"} x', b'{"tcbInfo": {},}'])
def test_a_body_without_a_signed_member_is_refused(body: bytes) -> None:
    with pytest.raises((ValueError, KeyError)):
        pccs._signed_member(body, "tcbInfo")


# -- the check without a quote --------------------------------------------------------------
def test_check_collateral_takes_good_collateral_under_its_root(platform: SimPlatformDir) -> None:
    dcap.check_collateral(platform.root_certificate_pem, platform.dcap_collateral())
    dcap.check_collateral(_intel_root_pem(), INTEL, now=INTEL_VALID_AT)  # Intel's own


def test_check_collateral_refuses_what_a_quote_check_would(
    platform: SimPlatformDir, tmp_path: Path
) -> None:
    root = platform.root_certificate_pem
    good = json.loads(platform.dcap_collateral())
    with pytest.raises(dcap.CollateralError, match="TCB Info expired"):
        dcap.check_collateral(_intel_root_pem(), INTEL)  # the vector, now
    with pytest.raises(dcap.CollateralError, match="expired"):
        dcap.check_collateral(root, _issued(platform, LONG_AGO))
    other = SimPlatformDir.open_or_create(tmp_path / "other")
    with pytest.raises(dcap.CollateralError, match="another root"):
        dcap.check_collateral(root, other.dcap_collateral())
    tcb = json.loads(good["tcb_info"])
    tampered = {**good, "tcb_info": json.dumps({**tcb, "tcbEvaluationDataNumber": 99})}
    with pytest.raises(dcap.CollateralError, match="signature does not verify"):
        dcap.check_collateral(root, json.dumps(tampered))
    foreign_crl = {**good, "root_ca_crl": json.loads(other.dcap_collateral())["root_ca_crl"]}
    with pytest.raises(dcap.CollateralError, match="root CA CRL is not signed"):
        dcap.check_collateral(root, json.dumps(foreign_crl))
    with pytest.raises(dcap.CollateralError, match="does not parse"):
        dcap.check_collateral(root, "{}")


# -- the refresher without a quote, on the Gramine backend ------------------------------------
def _backend(platform: SimPlatformDir, platform_dir: Path, copy: str) -> GramineBackend:
    """platform 'gramine' as hostd holds it, with no enclave launched (stand-in tools
    are not needed for what the refresher asks of it)."""
    platform_dir.mkdir(mode=0o700, exist_ok=True)
    (platform_dir / COLLATERAL_FILE).write_text(copy)
    loader = GramineLoader(platform_dir / "gramine", {}, copy, platform_dir.parent / "c.json")
    return GramineBackend(loader, {}, platform.root_certificate_pem, copy, platform_dir)


def test_without_a_quote_hostd_fetches_by_its_copys_fmspc_then_publishes(
    platform: SimPlatformDir, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    expired = _issued(platform, LONG_AGO)
    backend = _backend(platform, state / "platform", expired)
    public = state / "collateral.json"
    public.write_text(expired)  # hostd's publish_collateral at start
    fresh = _issued(platform, NOW)
    with FakePccs(fresh).running() as server, log.capture() as events:
        refresher = hc.CollateralRefresher(server.url, backend, public)
        refresher.start()
    assert refresher.key == ("00906ED50000", "processor")
    assert "/sgx/certification/v4/tcb?fmspc=00906ED50000" in server.requests
    assert json.loads(public.read_text()) == json.loads(fresh)
    assert (state / "platform" / COLLATERAL_FILE).read_text() == public.read_text()
    assert backend.loader.collateral == public.read_text()  # for enclaves launched from now on
    assert os.stat(public).st_mode & 0o777 == 0o644
    names = [e["event"] for e in events]
    assert names == ["hostd.collateral_key", "hostd.collateral_refreshed"]
    assert events[0]["fmspc"] == "00906ED50000" and events[0]["source"] == str(public)


@pytest.mark.parametrize("served", ["foreign", "expired", "older", "fmspc"])
def test_without_a_quote_bad_collateral_is_refused_and_the_copy_kept(
    platform: SimPlatformDir, tmp_path: Path, served: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    current = _issued(platform, NOW, days=100)
    backend = _backend(platform, state / "platform", current)
    public = state / "collateral.json"
    public.write_text(current)
    answer = {
        "foreign": lambda: SimPlatformDir.open_or_create(tmp_path / "o").dcap_collateral(),
        "expired": lambda: _issued(platform, LONG_AGO),
        "older": lambda: _issued(platform, NOW, days=10),
        "fmspc": lambda: _other_fmspc(platform, "00A067110000"),
    }[served]()
    with FakePccs(current).running() as server:
        refresher = hc.CollateralRefresher(server.url, backend, public)
        refresher.start()  # takes its own copy again
        server.collateral = json.loads(answer)
        with log.capture() as events:
            assert not refresher.refresh()
    (failed,) = [e for e in events if e["event"] == "hostd.collateral_refresh_failed"]
    assert {"foreign": "another root", "expired": "expired", "older": "expires before",
            "fmspc": "FMSPC 00A067110000"}[served] in failed["reason"]
    assert json.loads(public.read_text()) == json.loads(current)
    assert json.loads((state / "platform" / COLLATERAL_FILE).read_text()) == json.loads(current)
    # The backend refuses it too, whatever hostd says.
    with pytest.raises(PlatformError):
        backend.replace_collateral(answer)
    assert backend.loader.collateral == public.read_text()


def test_a_platform_dir_hostd_cannot_write_keeps_the_copy_in_memory(
    platform: SimPlatformDir, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    backend = _backend(platform, state / "platform", _issued(platform, LONG_AGO))
    fresh = _issued(platform, NOW)
    # As platform/ is root's once hostd runs as --user: the write fails (here, as root
    # too, because a directory stands where the file goes).
    (state / "platform" / COLLATERAL_FILE).unlink()
    (state / "platform" / COLLATERAL_FILE).mkdir()
    with log.capture() as events:
        backend.replace_collateral(fresh)
    assert backend.loader.collateral == fresh
    assert [e["event"] for e in events] == ["platform.collateral_not_persisted"]


# -- the enclave side: a running Gramine enclave follows hostd's copy ---------------------------
def test_a_gramine_enclaves_verifier_rereads_the_file_hostd_publishes(
    platform: SimPlatformDir, tmp_path: Path
) -> None:
    quote = platform.probe_quote(bytes(64))
    root = platform.root_certificate_pem
    expired = _issued(platform, LONG_AGO)
    public = tmp_path / "collateral.json"
    args = {bootstrap.COLLATERAL_FILE_ARG: str(public)}
    verifier = bootstrap.collateral_verifier(root, expired, args)
    with pytest.raises(AttestationError):  # no file yet: the launch copy's failure stands
        verifier.verify(quote)
    public.write_text(SimPlatformDir.open_or_create(tmp_path / "o").dcap_collateral())
    with pytest.raises(AttestationError):  # another root: refused
        verifier.verify(quote)
    public.write_text(platform.dcap_collateral())
    assert verifier.verify(quote).identity.mrsigner == bytes(32)
    public.write_text("garbage")  # the adopted copy stays while it verifies
    assert verifier.verify(quote).identity.mrsigner == bytes(32)
    # Without the launch argument: the launch copy alone.
    with pytest.raises(AttestationError):
        bootstrap.collateral_verifier(root, expired, {}).verify(quote)
