"""CLI clients of a ``hostd --platform gramine`` (STAND-INS for Gramine's tools, see
test_gramine_launcher.py), with the operator's measurement pins (sgxvtpm/vmm/pins.py).

The clients run with ``SGXVTPM_PLATFORM=gramine``: they cannot compute a
Gramine build's MRENCLAVE, so they take the manager's and the instance's
MRENCLAVE and their MRSIGNER from the pins file (made by ``sgxvtpm gramine
pins`` from the trusted build's .sig files), and the attestation root from
it too (here the stand-in's DCAP root, a PEM file: the stand-in's quotes
are sim quotes; on hardware it is ``intel``). Never from hostd's directory:
without pins, or with a wrong MRENCLAVE pinned, a client is refused in one
line although hostd's .sig files describe what it runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.helpers.hostd import Hostd
from tests.helpers.vmtools import sgxvtpm_cli
from tests.integration import test_gramine_launcher as launcher
from tests.integration.test_cli_session import serving, tpm2
from tests.integration.test_gramine_launcher import StandIns, _platform_dir

from sgxvtpm.platform import dcap

pytestmark = pytest.mark.integration

GET_RANDOM_8 = "80010000000c0000017b0008"
standins = launcher.standins  # the stand-ins' fixtures
environ = launcher.environ


def _one_line_refusal(done: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a refused command; besides it, only JSON log events
    (a channel refusal is opaque by design; its ``channel.failure`` event says why)."""
    assert done.returncode != 0, done.stdout
    lines = [ln for ln in done.stderr.strip().splitlines() if not ln.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("sgxvtpm: error: "), done.stderr
    return lines[0]


def test_cli_clients_of_a_gramine_host_use_the_operators_pins(
    tmp_path: Path, standins: StandIns, environ: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    platform = _platform_dir(state, standins)
    # The operator's side: the trusted build's DCAP root (the stand-in's) and pins.
    operator = tmp_path / "operator"
    operator.mkdir()
    collateral = dcap.load_collateral((platform / "dcap-collateral.json").read_text())
    root = x509.load_der_x509_certificate(dcap.root_from_collateral(collateral))
    (operator / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    pins = operator / "gramine.json"
    environ.setenv("SGXVTPM_PLATFORM", "gramine")
    environ.setenv("SGXVTPM_MEASUREMENTS", str(pins))
    h = Hostd(state, args=["--platform", "gramine"])
    h.env.update(standins.env())
    h.env["SGXVTPM_PLATFORM"] = "sim"  # hostd's own environment is not the clients'
    h.start()
    try:
        # No pins yet: refused in one line naming the file, though hostd's .sig files exist.
        line = _one_line_refusal(sgxvtpm_cli(h.state, "vm", "create", "vm0"))
        assert f"no Gramine measurement pins in {pins}" in line
        # The trusted build's .sig files (the build host's copies: here the same build).
        build = state / "platform" / "gramine"
        made = subprocess.run(
            [sys.executable, "-m", "sgxvtpm.cli", "gramine", "pins", str(build / "manager.sig"),
             str(build / "instance.sig"), "--root", "root.pem"],
            capture_output=True, text=True, timeout=60,
        )
        assert made.returncode == 0, made.stderr
        pins.write_text(made.stdout)
        assert sgxvtpm_cli(h.state, "vm", "create", "vm1").returncode == 0
        sock = tmp_path / "tpm.sock"
        with serving(h, "vm1", sock):
            tpm2("tpm2_startup", sock, "-c")
            assert len(bytes.fromhex(tpm2("tpm2_getrandom", sock, "8", "--hex"))) == 8
        answer = sgxvtpm_cli(h.state, "vm", "tpm", "vm1", GET_RANDOM_8)
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip().startswith("80010000001400000000")  # RC_SUCCESS, 8 bytes

        good = json.loads(made.stdout)
        for role, command in (("manager", ("vm", "create", "vm2")),
                              ("instance", ("vm", "tpm", "vm1", GET_RANDOM_8))):  # fmt: skip
            wrong = json.loads(made.stdout)
            wrong["mrenclave"][role] = "ab" * 32  # another build than the one hostd runs
            pins.write_text(json.dumps(wrong))
            done = sgxvtpm_cli(h.state, *command)
            assert "attested channel failed" in _one_line_refusal(done)
            events = [json.loads(ln) for ln in done.stderr.splitlines() if ln.startswith("{")]
            assert any("not accepted by policy" in e.get("reason", "")
                       and good["mrenclave"][role] in e["reason"] for e in events), done.stderr
        # The right MRENCLAVEs under another MRSIGNER are refused too.
        other_signer = dict(good, mrsigner="cd" * 32)
        pins.write_text(json.dumps(other_signer))
        done = sgxvtpm_cli(h.state, "vm", "create", "vm3")
        assert "attested channel failed" in _one_line_refusal(done)
        assert "not accepted by policy" in done.stderr
    finally:
        h.stop()
