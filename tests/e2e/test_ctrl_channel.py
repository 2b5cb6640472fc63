"""The QEMU-facing control channel, driven like QEMU does, against ours and real swtpm.

Each step runs on both and the answers are compared; the known, deliberate
differences are asserted explicitly (the automatic TPM2_Shutdown that swtpm
only has from 0.10 on). test_swtpm_ioctl_conformance.py compares ``vm attach``
with swtpm through swtpm_ioctl and byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers.endpoint import (
    CtrlClient,
    EndpointProcess,
    start_local,
    start_swtpm_ctrl,
)
from tests.helpers.qemu_ctrl import savevm
from tests.helpers.swtpm import swtpm_available

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU
from sgxvtpm.wire.swtpm_ctrl import CtrlCmd, CtrlRequest, CtrlResponse, PtmCap

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not swtpm_available(), reason="needs Debian's swtpm"),
]
NOT_RUNNING = bytes.fromhex("80010000000a00000101")
#: What QEMU 7.2 requires of a TPM 2.0 emulator (tpm_emulator.c, TPM2 caps).
QEMU_REQUIRED = (PtmCap.INIT | PtmCap.SHUTDOWN | PtmCap.GET_TPMESTABLISHED | PtmCap.SET_LOCALITY
                 | PtmCap.RESET_TPMESTABLISHED | PtmCap.SET_DATAFD | PtmCap.STOP
                 | PtmCap.SET_BUFFERSIZE)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[CtrlClient, CtrlClient]]:
    procs: list[EndpointProcess] = [
        start_swtpm_ctrl(tmp_path / "sw", tmp_path / "sw.ctrl"),
        start_local(tmp_path / "ours", ctrl=tmp_path / "ours.ctrl"),
    ]
    swtpm = CtrlClient(procs[0].address, short_errors=True)
    ours = CtrlClient(procs[1].address, short_errors=False)
    yield swtpm, ours
    for c in (swtpm, ours):
        c.close()
    for p in procs:
        p.stop()


def both(pair: tuple[CtrlClient, CtrlClient], req: CtrlRequest) -> CtrlResponse:
    a, b = (c.request(req) for c in pair)
    assert isinstance(a, CtrlResponse) and isinstance(b, CtrlResponse)
    assert a == b, f"{CtrlCmd(req.code).name}: swtpm {a} ours {b}"
    return a


def tpm_both(pair: tuple[CtrlClient, CtrlClient], command: bytes) -> bytes:
    a, b = (c.transact(command) for c in pair)
    assert a[:10] == b[:10], f"swtpm {a.hex()} ours {b.hex()}"
    return b


def test_qemu_sequence_matches_swtpm(pair: tuple[CtrlClient, CtrlClient]) -> None:
    for c in pair:
        c.attach_data()
    # QEMU's version probe before INIT: the tagged TPM 2.0 error.
    assert tpm_both(pair, wire.read_clock()) == NOT_RUNNING
    caps = [c.request(CtrlRequest(CtrlCmd.GET_CAPABILITY)) for c in pair]
    assert caps[0].caps == caps[1].caps == 0xFFFF  # type: ignore[attr-defined]
    for cap in caps:
        assert cap.caps & QEMU_REQUIRED == QEMU_REQUIRED  # type: ignore[attr-defined]
    # Machine reset: STOP, SET_BUFFERSIZE(0), STOP, SET_BUFFERSIZE(n), INIT.
    both(pair, CtrlRequest(CtrlCmd.STOP))
    assert both(pair, CtrlRequest(CtrlCmd.SET_BUFFERSIZE, size=0)).sizes == (4096, 2808, 4096)
    both(pair, CtrlRequest(CtrlCmd.STOP))
    assert both(pair, CtrlRequest(CtrlCmd.SET_BUFFERSIZE, size=100)).sizes[0] == 2808
    both(pair, CtrlRequest(CtrlCmd.SET_BUFFERSIZE, size=4096))
    assert both(pair, CtrlRequest(CtrlCmd.INIT)).result == 0
    tpm_both(pair, wire.startup(TPM2_SU.CLEAR))
    assert both(pair, CtrlRequest(CtrlCmd.SET_BUFFERSIZE, size=4096)).result == 0x0A
    assert both(pair, CtrlRequest(CtrlCmd.GET_TPMESTABLISHED)).established is False
    assert both(pair, CtrlRequest(CtrlCmd.SET_LOCALITY, locality=5)).result == 0x3D
    both(pair, CtrlRequest(CtrlCmd.SET_LOCALITY, locality=3))
    tpm_both(pair, wire.get_random(8))
    both(pair, CtrlRequest(CtrlCmd.SET_LOCALITY, locality=0))
    assert both(pair, CtrlRequest(CtrlCmd.RESET_TPMESTABLISHED, locality=0)).result == 0x3D
    assert both(pair, CtrlRequest(CtrlCmd.RESET_TPMESTABLISHED, locality=3)).result == 0
    info = both(pair, CtrlRequest(CtrlCmd.GET_INFO, flags=3))
    assert info.data.endswith(b"}\0") and info.totlength == len(info.data)
    assert both(pair, CtrlRequest(CtrlCmd.GET_INFO, flags=3, offset=10)).data == info.data[10:]
    assert both(pair, CtrlRequest(CtrlCmd.GET_CONFIG)).flags == 0
    both(pair, CtrlRequest(CtrlCmd.STORE_VOLATILE))
    both(pair, CtrlRequest(CtrlCmd.CANCEL_TPM_CMD))
    assert both(pair, CtrlRequest(99)).result == 0x0A  # unknown code: TPM_BAD_ORDINAL
    both(pair, CtrlRequest(CtrlCmd.STOP))
    assert tpm_both(pair, wire.get_random(8)) == NOT_RUNNING
    assert both(pair, CtrlRequest(CtrlCmd.GET_TPMESTABLISHED)).result == 0x0A
    assert both(pair, CtrlRequest(CtrlCmd.GET_STATEBLOB, flags=1, blob_type=1)).result == 0x0A


def test_init_sends_orderly_shutdown_unlike_swtpm_0_7(
    pair: tuple[CtrlClient, CtrlClient],
) -> None:
    """After INIT without a guest TPM2_Shutdown, ours resumes (Startup(STATE)
    works: we sent Shutdown(STATE) as swtpm 0.10 does); swtpm 0.7.1 did not."""
    swtpm, ours = pair
    for c in pair:
        c.attach_data()
        c.request(CtrlRequest(CtrlCmd.INIT))
        c.transact(wire.startup(TPM2_SU.CLEAR))
        c.transact(wire.get_random(4))
        c.request(CtrlRequest(CtrlCmd.INIT))
    assert wire.response_code(ours.transact(wire.startup(TPM2_SU.STATE))) == 0
    assert wire.response_code(swtpm.transact(wire.startup(TPM2_SU.STATE))) == 0x1C4


def test_migration_blobs_roundtrip(tmp_path: Path) -> None:
    """QEMU's migration: GET_STATEBLOB x3 from a running TPM, then into a fresh
    endpoint STOP, SET_STATEBLOB x3, INIT(delete volatile): PCRs and NV survive."""
    src_p = start_local(tmp_path / "src", ctrl=tmp_path / "src.ctrl")
    dst_p = start_local(tmp_path / "dst", ctrl=tmp_path / "dst.ctrl")
    src = CtrlClient(src_p.address, short_errors=False)
    dst = CtrlClient(dst_p.address, short_errors=False)
    try:
        src.attach_data()
        dst.attach_data()
        src.request(CtrlRequest(CtrlCmd.INIT))
        src.transact(wire.startup(TPM2_SU.CLEAR))
        digest = hashlib.sha256(b"migrate me").digest()
        assert wire.response_code(src.transact(wire.pcr_extend(16, digest))) == 0
        pcr = src.transact(wire.pcr_read([16]))
        blobs = savevm(src)  # permanent and volatile exist
        dst.request(CtrlRequest(CtrlCmd.STOP))
        for kind, data in blobs.items():
            r = dst.request(CtrlRequest(CtrlCmd.SET_STATEBLOB, blob_type=kind, data=data))
            assert isinstance(r, CtrlResponse) and r.result == 0, (kind, r)
        assert dst.request(CtrlRequest(CtrlCmd.INIT, flags=1)).result == 0  # type: ignore[attr-defined]
        assert dst.transact(wire.pcr_read([16])) == pcr
        # SET_STATEBLOB is refused while running (swtpm: TPM_BAD_ORDINAL).
        r = dst.request(CtrlRequest(CtrlCmd.SET_STATEBLOB, blob_type=1, data=blobs[1]))
        assert isinstance(r, CtrlResponse) and r.result == 0x0A
    finally:
        src.close()
        dst.close()
        src_p.stop()
        dst_p.stop()


def test_a_qemu_restarted_during_the_last_command_of_the_previous_attaches(
    tmp_path: Path,
) -> None:
    """A QEMU that exits with a command in flight closes its data channel, but the
    thread serving it first answers that command. A QEMU started in that moment must
    attach: SET_DATAFD waits for the previous channel to end (it answered TPM_IOERROR
    at once, which a restarted VM gets as a failed start)."""
    ep = start_local(tmp_path / "ours", ctrl=tmp_path / "ours.ctrl")
    try:
        first = CtrlClient(ep.address, short_errors=False)
        try:
            data = first.attach_data()
            assert first.request(CtrlRequest(CtrlCmd.INIT)).result == 0  # type: ignore[attr-defined]
            assert wire.response_code(first.transact(wire.startup(TPM2_SU.CLEAR))) == 0
            data.sendall(wire.create_primary(wire.rsa2048_template()))  # an RSA keygen
        finally:
            first.close()
        second = CtrlClient(ep.address, short_errors=False)
        try:
            second.attach_data()
            assert second.request(CtrlRequest(CtrlCmd.INIT)).result == 0  # type: ignore[attr-defined]
            assert wire.response_code(second.transact(wire.startup(TPM2_SU.CLEAR))) == 0
        finally:
            second.close()
    finally:
        ep.stop()
