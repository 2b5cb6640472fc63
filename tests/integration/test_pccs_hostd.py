"""``hostd --pccs``: hostd fetches and refreshes its platform's collateral (real hostd, sim).

On ``sim`` and ``gramine-sim`` (the Gramine enclave code path). The stand-in PCCS
(tests/helpers/pccs.py, Intel's PCCS v4 paths) serves collateral issued by the sim
platform's own root; hostd starts with an expired copy, takes the PCCS's, and every
handshake (the VMM's with the manager, the manager's with the instance, the K2 client's
with the instance) verifies with it through dcap-qvl. The PCCS then serves a newer copy,
which hostd publishes without a restart (``--pccs-refresh 1``), then one under another
root, which hostd refuses, keeping the copy it has. The first copy is short-lived: once
it expires, the manager (launched with it) checks the next instance's quote with the
platform's newer copy. A PCCS that is down at start, with no usable local copy, stops
hostd with one error line.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers.hostd import Hostd, running_hostd
from tests.helpers.pccs import FakePccs
from tests.helpers.vmtools import sgxvtpm_cli

from sgxvtpm.endpoint.k2 import K2Client
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.platform.sim import provision
from sgxvtpm.platform.sim.platform_dir import COLLATERAL_JSON, SimPlatformDir
from sgxvtpm.tpm import wire

pytestmark = pytest.mark.integration

LONG_AGO = datetime.timedelta(days=365 * 31)  # the sim collateral's validity is 30 years
SHORT = 12  # seconds: the first copy's validity (hostd starts and serves vm1 within it)


def _issued(
    platform: SimPlatformDir, at: datetime.datetime, validity: float = 30 * 365 * 86400
) -> str:
    return provision.collateral(platform._private_key("root_ca"), platform.root_certificate_pem,
                                at, validity=datetime.timedelta(seconds=validity))


def _expired_platform(state: Path) -> SimPlatformDir:
    """A provisioned sim platform whose collateral expired long ago (hostd's copy too)."""
    platform = SimPlatformDir.open_or_create(state / "platform")
    expired = _issued(platform, datetime.datetime.now(datetime.UTC) - LONG_AGO)
    (platform.path / COLLATERAL_JSON).write_text(expired)
    return platform


def _maps_dcap_verifier(pid: int) -> bool:
    """Whether process ``pid`` has loaded dcap-qvl's native library."""
    return "_dcap_qvl" in Path(f"/proc/{pid}/maps").read_text()


def test_hostd_without_pccs_loads_no_dcap_verifier_or_http_client(tmp_path: Path) -> None:
    """Without --pccs hostd verifies no quote and fetches nothing: neither the DCAP
    verifier (~2.4 MB PSS of a running hostd) nor an HTTP client is imported."""
    with running_hostd(tmp_path / "state") as h:
        assert not _maps_dcap_verifier(h.pid)
    probe = "import sys, sgxvtpm.cli, sgxvtpm.host.hostd; print(sorted(sys.modules))"
    modules = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             check=True).stdout
    for heavy in ("'dcap_qvl'", "'urllib.request'", "'http.client'"):
        assert heavy not in modules


def _same(got: str, issued: str) -> bool:
    """``got`` (dcap-qvl's JSON of what it fetched) holds the ``issued`` collateral."""
    want = json.loads(issued)
    return {k: v for k, v in json.loads(got).items() if k in want} == want


def _create_and_use(h: Hostd, name: str) -> None:
    """``vm create NAME`` (the VMM, the manager and the new instance attest each other),
    then TPM2_Startup and GetRandom over K2 (the client attests the instance)."""
    created = sgxvtpm_cli(h.state, "vm", "create", name)
    assert created.returncode == 0, created.stderr
    with K2Client(h.binding(name)) as client:
        client.power_on_if_stopped()
        assert wire.response_code(client.transact(wire.startup())) == 0
        answer = client.transact(wire.get_random(8))
    assert wire.response_code(answer) == 0 and len(answer) == 10 + 2 + 8


def _wait_for(check: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def _events(log: str, name: str) -> list[dict[str, object]]:
    found = []
    for line in log.splitlines():
        if name in line:
            with_json = line[line.index("{"):]
            record = json.loads(with_json)
            if record.get("event") == name:
                found.append(record)
    return found


@pytest.mark.parametrize("platform_name", ["sim", "gramine-sim"])
def test_hostd_fetches_refreshes_and_refuses_collateral_from_its_pccs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, platform_name: str
) -> None:
    """On gramine-sim the enclaves run the Gramine code path: a running manager
    follows the newer copy by re-reading hostd's public collateral.json
    (platform/gramine/bootstrap.py, collateral_verifier), as on Gramine."""
    monkeypatch.setenv("SGXVTPM_PLATFORM", platform_name)  # the clients' platform kind
    state = tmp_path / "state"
    platform = _expired_platform(state)
    # The first copy is short-lived: the manager is launched with it and must follow
    # the platform's newer copy once it expires.
    issued = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    first = _issued(platform, issued, validity=SHORT)
    with FakePccs(first).running() as server, running_hostd(
        state, args=["--platform", platform_name, "--pccs", server.url, "--pccs-refresh", "1"]
    ) as h:
        assert _maps_dcap_verifier(h.pid)  # --pccs: hostd checks what its PCCS answers
        # At start, before any enclave: the PCCS's copy, for the enclaves and the clients.
        assert _same(h.state.collateral.read_text(), first)
        assert platform.dcap_collateral() == h.state.collateral.read_text()
        assert any("fmspc=00906ED50000" in r for r in server.requests)
        manager_launched = len(_events(h.log(), "hostd.enclave_launched"))

        # A newer copy on the PCCS: published without a restart.
        newer = _issued(platform, datetime.datetime.now(datetime.UTC))
        assert newer != first
        server.collateral = json.loads(newer)
        _wait_for(lambda: _same(h.state.collateral.read_text(), newer),
                  "the newer copy published")
        published = h.state.collateral.read_text()
        assert platform.dcap_collateral() == published
        _create_and_use(h, "vm1")

        # The manager's launch copy expires; the manager follows the platform's.
        time.sleep(max(0.0, (issued.timestamp() + SHORT + 1) - time.time()))
        _create_and_use(h, "vm2")
        assert len(_events(h.log(), "hostd.enclave_launched")) == manager_launched + 2

        # Collateral under another root: refused at each attempt, the copy kept.
        other = SimPlatformDir.open_or_create(tmp_path / "other-platform")
        server.collateral = json.loads(other.dcap_collateral())
        _wait_for(lambda: any("another root" in str(e["reason"]) for e in
                              _events(h.log(), "hostd.collateral_refresh_failed")),
                  "a refused attempt logged")
        assert h.state.collateral.read_text() == published
        assert platform.dcap_collateral() == published
        listed = sgxvtpm_cli(h.state, "vm", "list")
        assert listed.returncode == 0 and "vm1" in listed.stdout and "vm2" in listed.stdout
    refreshed = _events(h.log(), "hostd.collateral_refreshed")
    assert len(refreshed) >= 2  # at start, then the newer copy (identical copies again after)


def test_pccs_down_at_start_without_a_usable_copy_is_one_error_line(tmp_path: Path) -> None:
    # (A missing local copy: tests/unit/test_collateral_refresh.py.)
    state = tmp_path / "state"
    _expired_platform(state)
    done = subprocess.run(
        [sys.executable, "-m", "sgxvtpm.cli", "hostd", "--state-dir", str(state),
         "--pccs", "http://user:s3cret@127.0.0.1:9", "--log", f"file={tmp_path / 'hostd.log'}"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("sgxvtpm: error: PCCS http://127.0.0.1:9 gave no collateral")
    assert "does not verify the platform's quote" in lines[0]
    assert "s3cret" not in done.stderr + (tmp_path / "hostd.log").read_text()
    assert not StateDir(state).socket.exists()
