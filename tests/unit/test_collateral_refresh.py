"""hostd's collateral refresher (host/collateral.py): the schedule, and one attempt at a time.

The schedule is a pure function (hypothesis). The refresher runs against a real
sim platform directory (its probe quote and collateral store, in process) and
the stand-in PCCS (tests/helpers/pccs.py) serving collateral issued by that
platform's root, or by another platform's.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.helpers.pccs import FakePccs

from sgxvtpm.host import collateral as hc
from sgxvtpm.platform import dcap, pccs
from sgxvtpm.platform.base import AttestationError, PlatformError
from sgxvtpm.platform.sim import provision
from sgxvtpm.platform.sim.platform_dir import COLLATERAL_JSON, PROBE, SimPlatformDir
from sgxvtpm.util import log

DAY = 86400.0
NOW = 1_800_000_000.0

times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
spans = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
failures = st.integers(min_value=0, max_value=200)
intervals = st.none() | st.floats(min_value=0.001, max_value=1e7, allow_nan=False)


# -- the schedule ------------------------------------------------------------------
def test_next_refresh_examples() -> None:
    # A copy valid for 30 more days, no failure: at 3/4 of that.
    assert hc.next_refresh(NOW, NOW + 30 * DAY, 0) == pytest.approx(22.5 * DAY)
    # The PCCS failed: back off 5, 10, 20 s ... up to 10 minutes.
    assert [hc.next_refresh(NOW, NOW + 30 * DAY, n) for n in (1, 2, 3)] == [5.0, 10.0, 20.0]
    assert hc.next_refresh(NOW, NOW + 30 * DAY, 50) == hc.MAX_BACKOFF
    # ... but never past 3/4 of what remains of the copy.
    assert hc.next_refresh(NOW, NOW + 8.0, 3) == pytest.approx(6.0)
    # No copy (or an expired one) and no failure yet: at once (the floor).
    assert hc.next_refresh(NOW, None, 0) == hc.MIN_DELAY
    assert hc.next_refresh(NOW, NOW - 5, 0) == hc.MIN_DELAY
    # --pccs-refresh caps every delay.
    assert hc.next_refresh(NOW, NOW + 30 * DAY, 0, max_interval=60) == 60
    with pytest.raises(ValueError):
        hc.next_refresh(NOW, None, -1)


@given(times, spans, failures, intervals)
def test_next_refresh_is_bounded(now: float, left: float, fails: int, cap: float | None) -> None:
    delay = hc.next_refresh(now, now + left, fails, max_interval=cap)
    assert hc.MIN_DELAY <= delay <= max(hc.MIN_DELAY, hc.MAX_BACKOFF if left <= 0 else
                                        max(hc.MAX_BACKOFF, hc.SHARE * left))
    if cap is not None:
        assert delay <= max(hc.MIN_DELAY, cap)


@given(times, st.floats(min_value=4 * hc.MIN_DELAY, max_value=1e9), failures, intervals)
def test_next_refresh_comes_before_a_valid_copy_expires(
    now: float, left: float, fails: int, cap: float | None
) -> None:
    delay = hc.next_refresh(now, now + left, fails, max_interval=cap)
    assert delay <= hc.SHARE * left + 1e-6
    assert now + delay < now + left


@given(times, st.none() | spans, st.integers(min_value=1, max_value=100))
def test_backoff_never_shrinks_with_more_failures(
    now: float, left: float | None, fails: int
) -> None:
    expires = None if left is None else now + left
    assert hc.next_refresh(now, expires, fails) <= hc.next_refresh(now, expires, fails + 1)


# -- one attempt against a real sim platform ------------------------------------------
class _Backend:
    """The two calls the refresher makes of hostd's platform, on a SimPlatformDir in
    process (hostd reaches the same methods through the sim CPU)."""

    def __init__(self, platform: SimPlatformDir) -> None:
        self.dir = platform
        self.attestation_root_pem = platform.root_certificate_pem

    def platform_quote(self, report_data: bytes) -> bytes:
        return self.dir.probe_quote(report_data)

    def replace_collateral(self, collateral: str) -> None:
        self.dir.replace_collateral(collateral)


def _issued(platform: SimPlatformDir, at: datetime.datetime) -> str:
    return provision.collateral(platform._private_key("root_ca"), platform.root_certificate_pem,
                                at)


def _refresher(platform: SimPlatformDir, url: str, public: Path) -> hc.CollateralRefresher:
    return hc.CollateralRefresher(url, _Backend(platform), public)  # type: ignore[arg-type]


@pytest.fixture
def platform(tmp_path: Path) -> SimPlatformDir:
    return SimPlatformDir.open_or_create(tmp_path / "platform")


def test_fetched_collateral_is_checked_then_published(
    platform: SimPlatformDir, tmp_path: Path
) -> None:
    public = tmp_path / "collateral.json"
    fresh = _issued(platform, datetime.datetime.now(datetime.UTC))
    with FakePccs(fresh).running() as server, log.capture() as events:
        refresher = _refresher(platform, server.url, public)
        assert refresher.refresh()
    assert public.read_text() == platform.dcap_collateral()
    assert json.loads(public.read_text())["tcb_info"] == json.loads(fresh)["tcb_info"]
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert refresher.expires == pccs.expiry(fresh).timestamp()
    assert "fmspc=00906ED50000" in server.requests[1]  # the sim FMSPC, from the probe quote
    (done,) = [e for e in events if e["event"] == "hostd.collateral_refreshed"]
    assert done["pccs"] == server.url and not done["unchanged"]
    written = public.stat().st_mtime_ns
    with FakePccs(fresh).running() as server, log.capture() as events:
        refresher.url = server.url
        assert refresher.refresh()  # the same copy again: nothing rewritten
    assert public.stat().st_mtime_ns == written
    assert [e["unchanged"] for e in events if e["event"] == "hostd.collateral_refreshed"] == [True]


def test_collateral_under_another_root_is_refused_and_the_old_copy_kept(
    platform: SimPlatformDir, tmp_path: Path
) -> None:
    public = tmp_path / "collateral.json"
    own = platform.dcap_collateral()
    public.write_text(own)
    other = SimPlatformDir.open_or_create(tmp_path / "other")
    with FakePccs(other.dcap_collateral()).running() as server, log.capture() as events:
        assert not _refresher(platform, server.url, public).refresh()
    assert public.read_text() == own and platform.dcap_collateral() == own
    (failed,) = [e for e in events if e["event"] == "hostd.collateral_refresh_failed"]
    assert "another root" in failed["reason"] and failed["failures"] == 1


def test_the_platform_itself_refuses_collateral_that_does_not_verify_its_quote(
    platform: SimPlatformDir, tmp_path: Path
) -> None:
    own = platform.dcap_collateral()
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=365 * 31)
    with pytest.raises(Exception, match="verify"):
        platform.replace_collateral(_issued(platform, long_ago))
    assert platform.dcap_collateral() == own


def test_an_older_collateral_does_not_replace_a_newer_one(
    platform: SimPlatformDir, tmp_path: Path
) -> None:
    public = tmp_path / "collateral.json"
    now = datetime.datetime.now(datetime.UTC)
    older = _issued(platform, now - datetime.timedelta(days=1))
    with FakePccs(_issued(platform, now)).running() as server:
        refresher = _refresher(platform, server.url, public)
        assert refresher.refresh()
        newer = public.read_text()
        server.collateral = json.loads(older)
        assert not refresher.refresh()
    assert public.read_text() == newer
    # The platform refuses it too, whatever hostd says.
    with pytest.raises(Exception, match="expires before"):
        platform.replace_collateral(older)
    assert platform.dcap_collateral() == newer


def _pccs_down_with_a_local_copy(
    platform: SimPlatformDir, tmp_path: Path
) -> tuple[Path, hc.CollateralRefresher]:
    """A refresher whose PCCS does not answer, and its public copy: the platform's own."""
    public = tmp_path / "collateral.json"
    public.write_text(platform.dcap_collateral())
    return public, _refresher(platform, "http://127.0.0.1:9", public)


def test_start_keeps_a_valid_local_copy_when_the_pccs_is_down(
    platform: SimPlatformDir, tmp_path: Path
) -> None:
    _, refresher = _pccs_down_with_a_local_copy(platform, tmp_path)
    with log.capture() as events:
        refresher.start()
    assert refresher.expires == pccs.expiry(platform.dcap_collateral()).timestamp()
    assert [e["event"] for e in events] == ["hostd.collateral_refresh_failed",
                                            "hostd.collateral_kept"]


@pytest.mark.parametrize("local", ["missing", "expired", "foreign"])
def test_start_without_pccs_or_usable_copy_is_one_clear_error(
    platform: SimPlatformDir, tmp_path: Path, local: str
) -> None:
    public = tmp_path / "collateral.json"
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=365 * 31)
    if local == "expired":
        public.write_text(_issued(platform, long_ago))
    elif local == "foreign":
        public.write_text(SimPlatformDir.open_or_create(tmp_path / "other").dcap_collateral())
    refresher = _refresher(platform, "http://operator:hunter2@127.0.0.1:9/", public)
    with log.capture() as events, pytest.raises(hc.CollateralUnavailable) as raised:
        refresher.start()
    message = str(raised.value)
    assert "\n" not in message and "PCCS http://127.0.0.1:9/" in message
    assert "hunter2" not in message and "hunter2" not in json.dumps(events)
    assert {"missing": "no local copy", "expired": "does not verify",
            "foreign": "another root"}[local] in message


def test_an_expired_copy_is_withdrawn_while_the_pccs_stays_down(
    platform: SimPlatformDir, tmp_path: Path
) -> None:
    public, refresher = _pccs_down_with_a_local_copy(platform, tmp_path)
    refresher.start()
    assert public.exists()
    expires = refresher.expires
    assert expires is not None
    refresher.clock = lambda: expires + 1  # the copy's nextUpdate has passed

    async def run_a_while() -> None:
        task = asyncio.create_task(refresher.run())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not public.exists() and refresher.failures >= 2:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with log.capture() as events:
        asyncio.run(run_a_while())
    assert not public.exists()
    assert refresher.expires is None
    names = [e["event"] for e in events if e["event"].startswith("hostd.collateral_")]
    assert names[:2] == ["hostd.collateral_next_refresh", "hostd.collateral_expired"]
    assert "hostd.collateral_refresh_failed" in names


def test_a_platform_without_a_quote_and_without_a_local_copy_is_refused_at_start(
    tmp_path: Path,
) -> None:
    # (With a local copy it fetches by that copy's FMSPC: tests/unit/test_collateral_unquoted.py.)
    class NoQuote:  # what GramineBackend answers (platform/gramine/launcher.py)
        attestation_root_pem = b""

        def platform_quote(self, report_data: bytes) -> bytes:
            raise PlatformError("platform 'gramine' gives hostd no quote of its own")

    refresher = hc.CollateralRefresher("http://127.0.0.1:9", NoQuote(),  # type: ignore[arg-type]
                                       tmp_path / "collateral.json")
    with pytest.raises(hc.CollateralUnavailable) as raised:
        refresher.start()
    assert str(raised.value).startswith("--pccs: platform 'gramine' gives hostd no quote")
    assert "names the FMSPC and PCK CA to fetch" in str(raised.value)


# -- enclaves follow the platform's newer copy ------------------------------------------
def test_an_enclaves_verifier_takes_the_platforms_newer_collateral(
    platform: SimPlatformDir, tmp_path: Path
) -> None:
    quote = platform.probe_quote(bytes(64))
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=365 * 31)
    expired = _issued(platform, long_ago)
    current = platform.dcap_collateral()
    asked: list[str] = []

    def latest(answer: str) -> Callable[[], str]:
        def give() -> str:
            asked.append(answer)
            return answer
        return give

    # The copy the enclave was launched with expired; the platform's is current.
    verifier = dcap.RefreshingVerifier(platform.root_certificate_pem, expired, latest(current))
    assert verifier.verify(quote).identity.mrsigner == bytes(32)
    assert verifier.verify(quote).identity.mrsigner == bytes(32)
    assert asked == [current]  # adopted: asked once
    # The platform has nothing newer, or something under another root: the first
    # failure stands.
    for other in (expired, "", SimPlatformDir.open_or_create(tmp_path / "o").dcap_collateral()):
        stale = dcap.RefreshingVerifier(platform.root_certificate_pem, expired, latest(other))
        with pytest.raises(AttestationError, match="does not verify"):
            stale.verify(quote)

    def gone() -> str:
        raise PlatformError("the sim CPU process is gone")

    stale = dcap.RefreshingVerifier(platform.root_certificate_pem, expired, gone)
    with pytest.raises(AttestationError, match="does not verify"):
        stale.verify(quote)
    # A sim enclave's platform face gives this verifier, over the CPU's current copy.
    face = platform.enclave_platform(PROBE)
    face.collateral = expired  # as launched before the platform's copy was refreshed
    assert (platform.path / COLLATERAL_JSON).read_text() == current
    assert face.quote_verifier().verify(quote).identity == PROBE
