"""QEMU's state blobs cannot roll a VM's TPM back (the real instance, through ``vm attach``).

Driven as QEMU drives the swtpm control channel: savevm is GET_STATEBLOB of
the three types; QEMU then exits (SHUTDOWN); a restore is a new QEMU whose
machine reset sends INIT, then STOP, SET_STATEBLOB of each non-empty blob
and INIT(delete volatile). The newest save restores; an older one, or one the
VM has run on after, is refused with TPM_BAD_PARAMETER and logged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.helpers.endpoint import CtrlClient, start_vm_endpoint
from tests.helpers.hostd import Hostd
from tests.helpers.qemu_ctrl import (
    ctrl,
    loadvm,
    new_qemu,
    nv_counter,
    savevm,
    startup_state,
    tpm_ok,
)
from tests.helpers.vmtools import COUNTER_ATTRS, create_vm

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU
from sgxvtpm.wire.swtpm_ctrl import CtrlCmd
from sgxvtpm.wire.vtpm import TpmResult

pytestmark = pytest.mark.e2e

COUNTER = 0x01500040


def counter(c: CtrlClient) -> int:
    return nv_counter(c, COUNTER)


def increment(c: CtrlClient, times: int) -> None:
    for _ in range(times):
        tpm_ok(c, wire.nv_increment(COUNTER))


def test_old_state_blobs_cannot_roll_the_tpm_back(sgx_hostd: Hostd, tmp_path: Path) -> None:
    create_vm(sgx_hostd, "rollback")
    ep = start_vm_endpoint(
        sgx_hostd.state, "rollback", "--ctrl", str(tmp_path / "vtpm.ctrl"), log_dir=tmp_path
    )
    try:
        # QEMU #1: boot, an NV counter at 2, save; run on to 11, save again, exit.
        q = new_qemu(ep.address)
        tpm_ok(q, wire.startup(TPM2_SU.CLEAR))
        tpm_ok(q, wire.nv_define_space(COUNTER, 8, COUNTER_ATTRS))
        increment(q, 2)
        assert counter(q) == 2
        old = savevm(q)
        increment(q, 9)
        assert counter(q) == 11
        newest = savevm(q)
        assert ctrl(q, CtrlCmd.SHUTDOWN).result == 0
        q.close()

        # The host replays the older save: refused, blob by blob.
        q = new_qemu(ep.address)
        assert loadvm(q, old) == [TpmResult.BAD_PARAMETER] * 2
        q.close()

        # The newest save restores (after QEMU's SHUTDOWN, INIT and STOP in between).
        q = new_qemu(ep.address)
        assert all(result == 0 for result in loadvm(q, newest))
        assert ctrl(q, CtrlCmd.INIT, flags=1).result == 0
        assert counter(q) == 11
        increment(q, 1)

        # The VM ran on after that save: restoring it again would revert the TPM.
        assert loadvm(q, newest)[0] == TpmResult.BAD_PARAMETER
        assert ctrl(q, CtrlCmd.INIT).result == 0
        startup_state(q)
        assert counter(q) == 12
        q.close()
    finally:
        ep.stop()
    log = sgx_hostd.log()
    assert '"vtpm.state_refused"' in log and "rollback refused" in log
