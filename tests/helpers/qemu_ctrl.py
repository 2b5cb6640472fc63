"""QEMU's side of the swtpm control channel, for e2e tests that drive a ``vm attach``
endpoint as QEMU's tpm-emulator does (tests/e2e/test_stateblob_rollback.py,
tests/e2e/test_fleet_migration.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.helpers.endpoint import CtrlClient, EndpointProcess, start_vm_endpoint
from tests.helpers.vmtools import TPM2_RC_INITIALIZE

from sgxvtpm.host.statedir import StateDir
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU
from sgxvtpm.wire.swtpm_ctrl import CtrlCmd, CtrlRequest, CtrlResponse


@contextlib.contextmanager
def attached(workdir: Path, *vms: tuple[StateDir, str]) -> Iterator[list[EndpointProcess]]:
    """``vm attach`` endpoints of (host state, VM) pairs, their control sockets
    ``a.ctrl``, ``b.ctrl``, ... in ``workdir`` (their logs too); stopped at the end."""
    started: list[EndpointProcess] = []
    try:
        for letter, (state, name) in zip("abcdefgh", vms, strict=False):
            ctrl_path = str(workdir / f"{letter}.ctrl")
            started.append(start_vm_endpoint(state, name, "--ctrl", ctrl_path, log_dir=workdir))
        yield started
    finally:
        for endpoint in started:
            endpoint.stop()


def ctrl(c: CtrlClient, code: CtrlCmd, **kw: int | bytes) -> CtrlResponse:
    response = c.request(CtrlRequest(code, **kw))  # type: ignore[arg-type]
    assert isinstance(response, CtrlResponse)
    return response


def tpm_ok(c: CtrlClient, command: bytes) -> bytes:
    response = c.transact(command)
    assert wire.response_code(response) == 0, response.hex()
    return response


def nv_counter(c: CtrlClient, index: int) -> int:
    """The value of the NV counter at ``index``."""
    return int.from_bytes(wire.parse_nv_read(tpm_ok(c, wire.nv_read(index, 8))), "big")


def new_qemu(address: str, *, init: bool = True) -> CtrlClient:
    """A QEMU process attaching: data channel, then (``init``) the machine reset's INIT."""
    c = CtrlClient(address, short_errors=False)
    try:
        c.attach_data()
        if init:
            assert ctrl(c, CtrlCmd.INIT).result == 0
    except BaseException:
        c.close()
        raise
    return c


def savevm(c: CtrlClient) -> dict[int, bytes]:
    """QEMU's pre_save: GET_STATEBLOB of permanent, volatile and savestate."""
    blobs = {}
    for kind in (1, 2, 3):
        response = ctrl(c, CtrlCmd.GET_STATEBLOB, flags=1, blob_type=kind)
        assert response.result == 0, response
        blobs[kind] = response.data
    assert blobs[1] and blobs[2]
    return blobs


def loadvm(c: CtrlClient, blobs: dict[int, bytes]) -> list[int]:
    """QEMU's post_load: STOP, SET_STATEBLOB of each non-empty blob; the results."""
    assert ctrl(c, CtrlCmd.STOP).result == 0
    return [
        ctrl(c, CtrlCmd.SET_STATEBLOB, blob_type=kind, data=data).result
        for kind, data in blobs.items()
        if data
    ]


def startup_state(c: CtrlClient) -> None:
    """The guest's Startup(STATE) after a restore: done, or TPM_RC_INITIALIZE where the
    restored TPM had started already."""
    code = wire.response_code(c.transact(wire.startup(TPM2_SU.STATE)))
    assert code in (0, TPM2_RC_INITIALIZE), hex(code)
