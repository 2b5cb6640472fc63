"""SealedBlobCipher's freshness on real parts in one process: the sim platform's keys and
counters, the sealed state store, libtpms (one engine per process: every test closes it).

tests/e2e/test_stateblob_rollback.py drives the same through ``vm attach``; here the
instance is also restarted between save and restore, as after a hostd restart.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sgxvtpm.enclaves.blobcipher import SealedBlobCipher
from sgxvtpm.enclaves.sealing import SealError, parse_header
from sgxvtpm.enclaves.state import Bundle, EngineStoreAdapter, SealedStateStore
from sgxvtpm.enclaves.vtpm_core import VtpmCore
from sgxvtpm.platform.base import EnclavePlatform
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU
from sgxvtpm.tpm.engine import LibtpmsEngine
from sgxvtpm.util import log
from sgxvtpm.wire.vtpm import TpmResult, VtpmOp, VtpmRequest

R = VtpmRequest
ID = "ab" * 16


def start_instance(platform: EnclavePlatform, path: Path) -> VtpmCore:
    """What InstanceEnclave does: open (or create) the sealed state, wrap a core around it."""
    store = SealedStateStore(platform, ID, path)
    if path.exists():
        store.load()
    else:
        store.create({"instance_id": ID, "vm_id": "vm"})
    return VtpmCore(
        lambda: LibtpmsEngine(EngineStoreAdapter(store)), SealedBlobCipher(platform, ID, store)
    )


def tpm(core: VtpmCore, command: bytes) -> bytes:
    response = core.handle(R.tpm_command(command))
    assert response.success and wire.response_code(response.payload) == 0
    return response.payload


def savevm(core: VtpmCore) -> dict[int, bytes]:
    return {kind: core.handle(R.get_stateblob(kind)).payload for kind in (1, 2, 3)}


def loadvm(core: VtpmCore, blobs: dict[int, bytes]) -> list[int]:
    assert core.handle(R(VtpmOp.STOP)).success
    return [core.handle(R.set_stateblob(k, b)).result for k, b in blobs.items() if b]


def boot(core: VtpmCore) -> bytes:
    """INIT, Startup, a measurement; the PCR value."""
    assert core.handle(R.init()).success
    tpm(core, wire.startup(TPM2_SU.CLEAR))
    tpm(core, wire.pcr_extend(16, hashlib.sha256(b"boot").digest()))
    return tpm(core, wire.pcr_read([16]))


def test_one_save_has_one_version_and_restores_after_an_instance_restart(
    enclave_platform: EnclavePlatform, tmp_path: Path
) -> None:
    path = tmp_path / "state.sealed"
    core = start_instance(enclave_platform, path)
    pcr = boot(core)
    blobs = savevm(core)
    versions = {parse_header(b)[0].version for b in blobs.values() if b}
    assert len(versions) == 1  # the three blobs are one snapshot
    assert savevm(core).keys() == blobs.keys()  # no TPM change: the same export again
    assert {parse_header(b)[0].version for b in savevm(core).values() if b} == versions
    core.close()  # the instance stops (hostd restarts): its Shutdown(STATE) is committed

    core = start_instance(enclave_platform, path)
    try:
        assert loadvm(core, blobs) == [TpmResult.SUCCESS] * 2
        assert core.handle(R.init(1)).success
        assert tpm(core, wire.pcr_read([16])) == pcr  # resumed the saved volatile state
    finally:
        core.close()


def test_an_export_the_guest_ran_on_from_is_refused_also_after_a_restart(
    enclave_platform: EnclavePlatform, tmp_path: Path
) -> None:
    path = tmp_path / "state.sealed"
    core = start_instance(enclave_platform, path)
    boot(core)
    blobs = savevm(core)
    tpm(core, wire.pcr_extend(16, hashlib.sha256(b"after the save").digest()))
    core.close()

    core = start_instance(enclave_platform, path)
    try:
        with log.capture() as records:
            assert loadvm(core, blobs) == [TpmResult.BAD_PARAMETER] * 2
        reasons = [r["reason"] for r in records if r["event"] == "vtpm.state_refused"]
        assert len(reasons) == 2 and all("used since it was exported" in r for r in reasons)
    finally:
        core.close()


def test_a_blob_type_cannot_pass_for_another(
    enclave_platform: EnclavePlatform, tmp_path: Path
) -> None:
    core = start_instance(enclave_platform, tmp_path / "state.sealed")
    try:
        boot(core)
        blobs = savevm(core)
        assert core.handle(R(VtpmOp.STOP)).success
        assert core.handle(R.set_stateblob(2, blobs[1])).result == TpmResult.BAD_PARAMETER
        assert core.handle(R.set_stateblob(1, blobs[1])).result == TpmResult.SUCCESS
    finally:
        core.close()


def test_bundle_records_the_export_and_reads_bundles_without_one() -> None:
    plain = Bundle({"vm_id": "vm"}, {"permall": b"p"})
    assert Bundle.decode(plain.encode()).exported == 0
    marked = Bundle({"vm_id": "vm"}, {"permall": b"p"}, exported=7)
    assert Bundle.decode(marked.encode()) == marked
    for junk in (b"\x00", b"\x00" * 8, b"\x00" * 9):
        with pytest.raises(SealError, match="malformed"):
            Bundle.decode(plain.encode() + junk)
