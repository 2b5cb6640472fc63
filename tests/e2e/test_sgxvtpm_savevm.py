"""Real QEMU saves and restores a VM whose TPM is ``sgxvtpm vm attach`` (same host).

The newest save restores and the guest reboots on the restored TPM; an older
save (the VM ran and used its TPM after it) is refused by the instance, and
QEMU's incoming migration fails on it. tests/e2e/test_stateblob_rollback.py
checks the same through the control channel directly, with an NV counter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.helpers.endpoint import start_vm_endpoint
from tests.helpers.guest import Guest, wait_loaded
from tests.helpers.hostd import Hostd
from tests.helpers.vmtools import create_vm

pytestmark = pytest.mark.e2e


def test_newest_save_restores_an_older_one_is_refused(
    sgx_hostd: Hostd, initrd: Path, tmp_path: Path
) -> None:
    create_vm(sgx_hostd, "savevm")
    ctrl = tmp_path / "vtpm.ctrl"
    ep = start_vm_endpoint(sgx_hostd.state, "savevm", "--ctrl", str(ctrl), log_dir=tmp_path)
    guests: list[Guest] = []
    try:
        first = Guest(tmp_path, initrd, ctrl, "first")
        guests.append(first)
        first.wait_for_boots(1, 120)
        first.save(tmp_path / "old.save")
        first.monitor("cont")
        first.monitor("system_reset")  # the VM runs on: firmware and kernel use the TPM
        first.wait_for_boots(2, 120)
        first.save(tmp_path / "new.save")
        first.stop()

        old = Guest(tmp_path, initrd, ctrl, "old", incoming=tmp_path / "old.save")
        guests.append(old)
        assert old.proc.wait(30) != 0
        assert "Setting the stateblob (type 1) failed with a TPM error 0x3" in old.console()

        new = Guest(tmp_path, initrd, ctrl, "new", incoming=tmp_path / "new.save")
        guests.append(new)
        wait_loaded(new)
        new.monitor("cont")
        new.monitor("system_reset")
        assert new.wait_for_boots(1, 120)[0].tpm_version == "2"
    finally:
        for guest in guests:
            guest.stop()
        ep.stop()
    assert "a newer export exists" in sgx_hostd.log()
