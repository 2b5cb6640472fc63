"""Every handshake checks quotes through DCAP (platform/dcap.py) with collateral (real hostd).

The clients take the collateral from hostd's platform directory (or
``$SGXVTPM_COLLATERAL``): untrusted bytes, signed under the pinned root. A
collateral that is missing, expired, or signed under another root gets the
handshake refused with one line; a debug enclave's quote is refused by the
handshake verifier whatever the measurement policy allows.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers.echo_client import call, echo_spec
from tests.helpers.hostd import running_hostd

from sgxvtpm.platform import platform_kind
from sgxvtpm.platform.base import AttestationError, EnclaveSpec, MeasurementPolicy
from sgxvtpm.platform.sim import provision
from sgxvtpm.platform.sim.loader import SimLoader
from sgxvtpm.platform.sim.platform_dir import SimPlatformDir

pytestmark = pytest.mark.integration


def _cli(
    state: Path, *args: str, collateral: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("SGXVTPM_COLLATERAL", None)
    if collateral is not None:
        env["SGXVTPM_COLLATERAL"] = str(collateral)
    return subprocess.run(
        [sys.executable, "-m", "sgxvtpm.cli", *args, "--state-dir", str(state)],
        capture_output=True, text=True, timeout=120, env=env,
    )


def _refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_handshakes_refuse_bad_collateral(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with running_hostd(state) as h:
        assert _cli(state, "vm", "create", "vm1").returncode == 0
        platform = SimPlatformDir.open_or_create(h.state.platform)
        # Expired: signed by the platform's own root, but 31 years ago (30-year validity).
        long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=365 * 31)
        expired = tmp_path / "expired.json"
        expired.write_text(provision.collateral(
            platform._private_key("root_ca"), platform.root_certificate_pem, long_ago))
        other = SimPlatformDir.open_or_create(tmp_path / "other-platform")
        foreign = tmp_path / "foreign.json"
        foreign.write_text(other.dcap_collateral())
        _refused(_cli(state, "vm", "list", collateral=tmp_path / "missing.json"),
                 "no DCAP collateral", "missing.json")
        _refused(_cli(state, "vm", "list", collateral=foreign), "another root")
        # Expired collateral parses and names the pinned root: the handshake itself
        # fails (dcap-qvl refuses it), logged, then one error line.
        expired_run = _cli(state, "vm", "list", collateral=expired)
        assert expired_run.returncode == 1, expired_run.stdout + expired_run.stderr
        assert "does not verify against the attestation root" in expired_run.stderr
        assert expired_run.stderr.strip().splitlines()[-1].startswith(
            "sgxvtpm: error: attested channel failed"), expired_run.stderr
        assert "vm1" not in expired_run.stdout
        # hostd's own copy replaced (the host is untrusted): refused too.
        own = h.state.collateral  # the public copy clients read first (host/hostd.py)
        genuine = own.read_text()
        own.write_text(other.dcap_collateral())
        _refused(_cli(state, "vm", "list"), "another root")
        own.write_text(genuine)
        listed = _cli(state, "vm", "list")
        assert listed.returncode == 0 and "vm1" in listed.stdout, listed.stderr


@pytest.fixture
def echo(echo_code: Path) -> EnclaveSpec:
    return echo_spec(echo_code)


def test_handshake_verifier_refuses_a_debug_enclave(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo: EnclaveSpec
) -> None:
    handle = sim_loader.launch(sim_platform.sign(dataclasses.replace(echo, debug=True)), {})
    try:
        quote = call(handle.stream, b"Q" + bytes(64))
    finally:
        handle.stop()
    verifier = platform_kind("sim").quote_verifier(
        sim_platform.root_certificate_pem, sim_platform.dcap_collateral()
    )
    with pytest.raises(AttestationError, match=r"[Dd]ebug"):
        verifier.verify(quote)
    # A measurement policy that allows debug would take it; the handshake verifier
    # refuses it before any policy is asked.
    identity = sim_platform.verifier().verify(quote).identity
    assert MeasurementPolicy(mrenclaves=frozenset({identity.mrenclave}),
                             allow_debug=True).accepts(identity)
