"""``python -m sgxvtpm.cli demo`` (what ``make demo`` runs) passes every check it prints.

The demo starts its own hostd, creates a VM's instance enclave, uses it over
K2, verifies the EK chain, runs an AK attestation round with tpm2-pytss over
K2Tcti, boots a QEMU guest on ``sgxvtpm vm attach``, restarts hostd and
destroys the instance; it exits 1 if any check fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.e2e

KEY_LINES = [
    r"K1 to E1: quote verified, operator key pinned",
    r"E2 MRENCLAVE = the instance code installed here",
    r"PCR_Extend\(16\) then PCR_Read\(16\) +matches the SHA-256 chain",
    r"marker in the clear in any file on the host\? +no",
    r"sgxvtpm attestation: PASS",
    r"\[PASS\] CA quote verifies against platform root",
    r"\[PASS\] rsa2048 EK certificate signed by CA",
    r"credential made off-TPM to the EK, activated +secret recovered",
    r"quote PCR digest = PCRs 0-7,16 read back",
    r"guest kernel found /dev/tpm0 +TPM 2\.0",
    r"guest reads PCR 0 \(sha256\) +[0-9a-f]{64}",
    r"PCR 0-7 = replay of the firmware's event log",
    r"a second K2 session while the guest runs +refused: one endpoint per VM",
    r"NV_Read 0x01500016 after restart +[0-9a-f]{32}",
    r"instances left +0",
    r"demo complete: every check passed",
]


def test_demo_passes(qemu_ready: None) -> None:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sgxvtpm.cli", "demo"], capture_output=True,
                          text=True, timeout=180)
    took = time.monotonic() - t0
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "FAILED" not in out and "[FAIL]" not in out
    for pattern in KEY_LINES:
        assert re.search(pattern, out), f"missing {pattern!r} in:\n{out}"
    # The guest's PCR 0 is what SeaBIOS measured, not the reset value.
    pcr0 = re.search(r"guest reads PCR 0 \(sha256\) +([0-9a-f]{64})", out)
    assert pcr0 is not None and pcr0.group(1) != "0" * 64
    assert took < 120, f"the demo took {took:.0f} s"
