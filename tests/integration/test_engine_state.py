"""LibtpmsEngine state: store hook, restore in a new process, failures, misuse."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
from tests.helpers.tpm import EngineProcess, RemoteError, started_engine

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_RC, TPM2_SU, TPMA_NV
from sgxvtpm.tpm.engine import StateType

pytestmark = pytest.mark.integration

NV_INDEX = 0x01500100
NV_ATTRS = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.NO_DA
PERSISTENT = 0x81000001


def rc(response: bytes) -> int:
    return wire.response_code(response)


def _provision(ep: EngineProcess) -> tuple[bytes, wire.ReadPublicResult]:
    """NV data plus a persistent ECC primary; returns what a restore must show."""
    data = hashlib.sha256(b"nv contents").digest()
    assert rc(ep.process(wire.nv_define_space(NV_INDEX, 32, NV_ATTRS))) == 0
    assert rc(ep.process(wire.nv_write(NV_INDEX, data))) == 0
    primary = wire.parse_create_primary(ep.process(wire.create_primary(wire.ecc_p256_template())))
    assert rc(ep.process(wire.evict_control(primary.handle, PERSISTENT))) == 0
    assert rc(ep.process(wire.flush_context(primary.handle))) == 0
    public = wire.parse_read_public(ep.process(wire.read_public(PERSISTENT)))
    assert public.public == primary.public
    return data, public


def _check_restored(ep: EngineProcess, data: bytes, public: wire.ReadPublicResult) -> None:
    assert wire.parse_nv_read(ep.process(wire.nv_read(NV_INDEX, 32))) == data
    assert wire.parse_read_public(ep.process(wire.read_public(PERSISTENT))) == public


def test_state_in_store_restores_in_a_new_process(tmp_path: Path) -> None:
    with started_engine(tmp_path) as first:
        data, public = _provision(first)
        assert rc(first.process(wire.shutdown())) == 0
    assert (tmp_path / "permall").stat().st_size > 1000
    with started_engine(tmp_path) as second:
        _check_restored(second, data, public)
        # Same TPM, not a re-manufactured one: primaries derive from the same seed.
        again = second.process(wire.create_primary(wire.ecc_p256_template()))
        assert wire.parse_create_primary(again).public == public.public


def test_unorderly_stop_still_keeps_nv(tmp_path: Path) -> None:
    """NV writes are durable when the command returns (libtpms stores permall)."""
    with started_engine(tmp_path) as first:
        data, public = _provision(first)
        first.proc.kill()  # no Shutdown, no stop(): like kill -9
        first.proc.wait()
    with started_engine(tmp_path) as second:
        _check_restored(second, data, public)


def test_get_state_set_state_moves_a_running_tpm() -> None:
    """Migration: permanent + volatile blobs resume the TPM without Startup."""
    event = hashlib.sha256(b"boot").digest()
    with started_engine() as source:
        data, public = _provision(source)
        assert rc(source.process(wire.pcr_extend(10, event))) == 0
        transient = wire.parse_create_primary(
            source.process(wire.create_primary(wire.ecc_p256_template(signing=True)))
        )
        pcrs = source.process(wire.pcr_read([10]))
        permanent = source.call("get_state", StateType.PERMANENT)
        volatile = source.call("get_state", StateType.VOLATILE)
        assert source.call("get_state", StateType.SAVESTATE) == b""  # TPM 2.0: unused
    with EngineProcess() as dest:
        dest.call("set_state", StateType.PERMANENT, permanent)
        dest.call("set_state", StateType.VOLATILE, volatile)
        dest.call("start")
        assert dest.process(wire.pcr_read([10])) == pcrs
        _check_restored(dest, data, public)
        moved = wire.parse_read_public(dest.process(wire.read_public(transient.handle)))
        assert moved.public == transient.public
        # libtpms wrote the permanent blob to the new store itself at MainInit
        assert dest.call("get_state", StateType.PERMANENT)
        assert ("store", "permall") in dest.call("store_calls")


def test_set_state_refuses_garbage_and_running_engine() -> None:
    with EngineProcess() as ep:
        with pytest.raises(RemoteError, match="EngineError") as info:
            ep.call("set_state", StateType.PERMANENT, b"not a libtpms blob")
        assert "refused" in str(info.value)
        ep.call("start")
        with pytest.raises(RemoteError, match="EngineMisuseError"):
            ep.call("set_state", StateType.PERMANENT, b"")


def test_store_volatile_resumes_after_restart(tmp_path: Path) -> None:
    event = hashlib.sha256(b"resume").digest()
    with started_engine(tmp_path) as first:
        assert rc(first.process(wire.pcr_extend(16, event))) == 0
        pcrs = first.process(wire.pcr_read([16]))
        first.call("store_volatile")
    assert (tmp_path / "volatilestate").exists()
    with EngineProcess(tmp_path) as second:
        second.call("start")
        assert second.process(wire.pcr_read([16])) == pcrs  # no Startup needed
        assert rc(second.process(wire.startup())) == TPM2_RC.INITIALIZE
    # libtpms leaves the snapshot in the store: it would resume again ...
    assert (tmp_path / "volatilestate").exists()
    with EngineProcess(tmp_path) as third:
        third.call("start", True)  # ... unless deleted at start (swtpm INIT flag 1)
        assert third.process(wire.pcr_read([16])) == pcrs
    assert not (tmp_path / "volatilestate").exists()
    with EngineProcess(tmp_path) as fourth:
        fourth.call("start")
        assert rc(fourth.process(wire.pcr_read([16]))) == TPM2_RC.INITIALIZE


def test_get_state_while_stopped_reads_the_store(tmp_path: Path) -> None:
    with started_engine(tmp_path) as ep:
        live = ep.call("get_state", StateType.PERMANENT)
        ep.call("stop")
        assert ep.call("get_state", StateType.PERMANENT) == (tmp_path / "permall").read_bytes()
        assert ep.call("get_state", StateType.VOLATILE) == b""
        assert len(live) == (tmp_path / "permall").stat().st_size


def test_store_failure_fails_the_command_and_nothing_after() -> None:
    """A store that raises (full disk) never yields a success for that change
    (SECURITY.md property 16)."""
    with started_engine() as ep:
        primary_before = ep.process(wire.create_primary(wire.ecc_p256_template()))
        ep.call("fail", True, False)
        assert rc(ep.process(wire.nv_define_space(NV_INDEX, 32, NV_ATTRS))) == TPM2_RC.FAILURE
        assert ep.call("store_error") == ("OSError", errno.ENOSPC)
        # libtpms is in failure mode until restarted from durable state
        assert rc(ep.process(wire.get_random(8))) == TPM2_RC.FAILURE
        ep.call("fail", False, False)
        assert rc(ep.process(wire.get_random(8))) == TPM2_RC.FAILURE
        ep.call("stop")
        ep.call("start")
        assert ep.call("store_error") is None
        assert rc(ep.process(wire.startup())) == 0
        # the failed define never became durable
        assert rc(ep.process(wire.nv_read_public(NV_INDEX))) == 0x18B  # HANDLE, handle 1
        after = ep.process(wire.create_primary(wire.ecc_p256_template()))
        assert wire.parse_create_primary(after).public == (
            wire.parse_create_primary(primary_before).public
        )


def test_load_failure_refuses_start_and_never_remanufactures(tmp_path: Path) -> None:
    with started_engine(tmp_path) as ep:
        before = wire.parse_create_primary(
            ep.process(wire.create_primary(wire.ecc_p256_template()))
        )
        ep.call("stop")
        ep.call("fail", False, True)
        with pytest.raises(RemoteError) as info:
            ep.call("start")
        assert info.value.type_name == "EngineError" and info.value.cause == "OSError"
        assert ep.call("running") is False
        ep.call("fail", False, False)
        ep.call("start")
        assert rc(ep.process(wire.startup())) == 0
        after = wire.parse_create_primary(ep.process(wire.create_primary(wire.ecc_p256_template())))
        assert after.public == before.public


def test_one_engine_per_process() -> None:
    with started_engine() as ep:
        with pytest.raises(RemoteError, match=r"EngineMisuseError.*one TPM per process"):
            ep.call("second_engine_start")
        assert rc(ep.process(wire.get_random(8))) == 0  # the first is unharmed
        ep.call("stop")
        with pytest.raises(RemoteError, match="EngineMisuseError"):
            ep.process(wire.get_random(8))
        ep.call("second_engine_start")  # allowed once the first is stopped


def _use_da(ep: EngineProcess, index: int, write: bytes) -> None:
    """Two failed authorizations: failedTries = 2 of libtpms' default maxTries 3."""
    attrs = TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD  # DA-protected
    assert rc(ep.process(wire.nv_define_space(index, 8, attrs, auth=b"pw"))) == 0
    assert rc(ep.process(write)) == TPM2_RC.RETRY
    assert rc(ep.process(write)) == 0
    bad = wire.nv_write(index, b"x", auth_handle=index, auth=b"wrong")
    for _ in range(2):
        assert rc(ep.process(bad)) == 0x98E  # TPM_RC_AUTH_FAIL, session 1


def test_unorderly_restart_locks_out_unless_shut_down(tmp_path: Path) -> None:
    """A restart without Shutdown after DA use counts as one more failed try.

    Part 1, 19.8.6. swtpm therefore sends TPM2_Shutdown(STATE) itself on
    STOP/INIT; ensure_orderly_shutdown() is that step.
    """
    index = 0x01500101
    write = wire.nv_write(index, b"x", auth_handle=index, auth=b"pw")
    with started_engine(tmp_path) as ep:
        _use_da(ep, index, write)
        ep.call("stop")
        ep.call("start")
        assert rc(ep.process(wire.startup())) == 0
        assert rc(ep.process(write)) == TPM2_RC.LOCKOUT
    (tmp_path / "orderly").mkdir()
    with started_engine(tmp_path / "orderly") as ep:
        _use_da(ep, index, write)
        assert ep.call("ensure_orderly_shutdown") is True
        assert ep.call("ensure_orderly_shutdown") is False  # last command was Shutdown
        ep.call("stop")
        ep.call("start")
        assert rc(ep.process(wire.startup(TPM2_SU.STATE))) == 0
        assert rc(ep.process(write)) in (0, TPM2_RC.RETRY)
        assert rc(ep.process(write)) == 0
