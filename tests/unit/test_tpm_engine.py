"""LibtpmsEngine pieces that need no running TPM (the rest: tests/integration)."""

from __future__ import annotations

import ctypes
import errno

import pytest

from sgxvtpm.tpm.engine import (
    TPM_FAIL,
    TPM_RETRY,
    TPM_SUCCESS,
    EngineMisuseError,
    LibtpmsEngine,
    MemoryStateStore,
    StateType,
    libtpms_has,
    libtpms_version,
)


def test_libtpms_version_and_probes() -> None:
    assert libtpms_version() == (0, 9, 2)
    assert libtpms_has("TPMLIB_GetState")
    assert not libtpms_has("TPMLIB_SetProfile")  # 0.10+


def test_state_type_numbers_follow_swtpm_blob_types() -> None:
    assert [int(t) for t in StateType] == [1, 2, 3]


def test_memory_store() -> None:
    store = MemoryStateStore({"permall": b"p"})
    assert store.load("permall") == b"p"
    store.store("volatilestate", b"v")
    assert store.blobs["volatilestate"] == b"v"
    store.delete("volatilestate")
    store.delete("volatilestate")  # no error when absent
    assert store.load("volatilestate") is None


def test_misuse_before_start() -> None:
    engine = LibtpmsEngine()
    assert not engine.running
    with pytest.raises(EngineMisuseError):
        engine.process(b"\x80\x01\x00\x00\x00\x0a\x00\x00\x01\x7b")
    with pytest.raises(EngineMisuseError):
        engine.established()
    with pytest.raises(ValueError):
        engine.reset_established(7)
    engine.stop()  # idempotent


class _FullDisk(MemoryStateStore):
    def store(self, name: str, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_store_callback_turns_exceptions_into_tpm_fail() -> None:
    engine = LibtpmsEngine(_FullDisk())
    data = (ctypes.c_ubyte * 4).from_buffer_copy(b"blob")
    rc = engine._cb_store(ctypes.cast(data, ctypes.POINTER(ctypes.c_ubyte)), 4, 0, b"permall")
    assert rc == TPM_FAIL
    assert isinstance(engine.store_error, OSError)
    assert engine.store_error.errno == errno.ENOSPC


def test_load_callback_hands_libtpms_a_malloced_copy() -> None:
    engine = LibtpmsEngine(MemoryStateStore({"permall": b"state-bytes"}))
    out = ctypes.POINTER(ctypes.c_ubyte)()
    length = ctypes.c_uint32()
    assert engine._cb_load(ctypes.pointer(out), ctypes.pointer(length), 0, b"permall") == 0
    assert ctypes.string_at(out, length.value) == b"state-bytes"
    libc = ctypes.CDLL(None)
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.free(ctypes.cast(out, ctypes.c_void_p))  # what libtpms does with it
    missing = engine._cb_load(ctypes.pointer(out), ctypes.pointer(length), 0, b"savestate")
    assert missing == TPM_RETRY
    assert TPM_SUCCESS == 0
