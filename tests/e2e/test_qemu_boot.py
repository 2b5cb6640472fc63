"""QEMU boots a Linux guest with its TPM on our endpoint, compared with Debian's swtpm.

Our endpoint is each of ``vtpm_ctrl_factory``'s (tests/e2e/conftest.py): the
local one, and the real ``sgxvtpm vm attach`` of an instance enclave, which
forwards QEMU's control and data channels over K2.

Golden test: SeaBIOS and the kernel drive the TPM exactly as in production
(version probe, STOP/SET_BUFFERSIZE/INIT, TPM2_Startup, PCR extends of the
firmware measurements); the guest prints PCR 0-7 from sysfs. The same boot
over swtpm must give the same values. A machine reset (monitor
``system_reset``) must reset the PCRs (same values again, not extended
twice), and after QEMU quits (SHUTDOWN) a new QEMU can attach.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tests.helpers.endpoint import CtrlFactory, start_swtpm_ctrl
from tests.helpers.guest import Guest

pytestmark = pytest.mark.e2e
BOOT_TIMEOUT = 90.0


def _check_pcrs(pcrs: dict[int, str]) -> None:
    assert sorted(pcrs) == list(range(8))
    for value in pcrs.values():
        assert re.fullmatch(r"[0-9a-f]{64}", value), pcrs
    # SeaBIOS measured something: PCR 0 is not the all-zero reset value.
    assert pcrs[0] != "0" * 64


def test_pcrs_match_swtpm_reset_and_reattach(
    initrd: Path, tmp_path: Path, vtpm_ctrl_factory: CtrlFactory
) -> None:
    swtpm = start_swtpm_ctrl(tmp_path / "swtpm-state", tmp_path / "swtpm.ctrl")
    ours_ctrl = vtpm_ctrl_factory(tmp_path / "ours")
    golden = Guest(tmp_path, initrd, Path(swtpm.address), "swtpm")
    guest = Guest(tmp_path, initrd, ours_ctrl, "ours")
    try:
        expected = golden.wait_for_boots(1, BOOT_TIMEOUT)[0]
        first = guest.wait_for_boots(1, BOOT_TIMEOUT)[0]
        golden.stop()
        assert first.tpm_version == expected.tpm_version == "2"
        _check_pcrs(expected.pcrs)
        assert first.pcrs == expected.pcrs

        guest.monitor("system_reset")
        second = guest.wait_for_boots(2, BOOT_TIMEOUT)[1]
        assert second.pcrs == first.pcrs, "PCRs were not reset by the machine reset"
        assert guest.stop() == 0

        # QEMU sent SHUTDOWN and left; the endpoint serves the next QEMU.
        again = Guest(tmp_path, initrd, ours_ctrl, "ours-again")
        try:
            assert again.wait_for_boots(1, BOOT_TIMEOUT)[0].pcrs == first.pcrs
        finally:
            again.stop()
    finally:
        golden.stop()
        guest.stop()
        swtpm.stop()
