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
from tests.helpers.vmtools import create_vm

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU, TPMA_NV
from sgxvtpm.wire.swtpm_ctrl import CtrlCmd, CtrlRequest, CtrlResponse
from sgxvtpm.wire.vtpm import TpmResult

pytestmark = pytest.mark.e2e

COUNTER = 0x01500040
COUNTER_ATTRS = (
    TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD
    | TPMA_NV.NO_DA | TPMA_NV.TPM_NT_COUNTER
)
RC_INITIALIZE = 0x100  # Startup on a TPM that resumed its saved state


def ctrl(c: CtrlClient, code: CtrlCmd, **kw: int | bytes) -> CtrlResponse:
    response = c.request(CtrlRequest(code, **kw))  # type: ignore[arg-type]
    assert isinstance(response, CtrlResponse)
    return response


def tpm_ok(c: CtrlClient, command: bytes) -> bytes:
    response = c.transact(command)
    assert wire.response_code(response) == 0, response.hex()
    return response


def counter(c: CtrlClient) -> int:
    return int.from_bytes(wire.parse_nv_read(tpm_ok(c, wire.nv_read(COUNTER, 8))), "big")


def increment(c: CtrlClient, times: int) -> None:
    for _ in range(times):
        tpm_ok(c, wire.nv_increment(COUNTER))


def savevm(c: CtrlClient) -> dict[int, bytes]:
    blobs = {}
    for kind in (1, 2, 3):  # permanent, volatile, savestate: QEMU's pre_save
        response = ctrl(c, CtrlCmd.GET_STATEBLOB, flags=1, blob_type=kind)
        assert response.result == 0, response
        blobs[kind] = response.data
    assert blobs[1] and blobs[2]
    return blobs


def new_qemu(address: str) -> CtrlClient:
    """A QEMU process attaching: data channel, then the machine reset's INIT."""
    c = CtrlClient(address, short_errors=False)
    c.attach_data()
    assert ctrl(c, CtrlCmd.INIT).result == 0
    return c


def loadvm(c: CtrlClient, blobs: dict[int, bytes]) -> list[int]:
    """QEMU's post_load: STOP, SET_STATEBLOB of each non-empty blob; the results."""
    assert ctrl(c, CtrlCmd.STOP).result == 0
    return [
        ctrl(c, CtrlCmd.SET_STATEBLOB, blob_type=kind, data=data).result
        for kind, data in blobs.items()
        if data
    ]


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
        assert wire.response_code(q.transact(wire.startup(TPM2_SU.STATE))) in (0, RC_INITIALIZE)
        assert counter(q) == 12
        q.close()
    finally:
        ep.stop()
    log = sgx_hostd.log()
    assert '"vtpm.state_refused"' in log and "rollback refused" in log
