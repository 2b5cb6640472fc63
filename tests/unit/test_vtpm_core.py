"""VtpmCore: swtpm semantics over a real libtpms engine (one per process, so
every test closes its core)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from sgxvtpm.enclaves.vtpm_core import NOT_RUNNING_RESPONSE, BlobCipherError, VtpmCore
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_RC, TPM2_SU
from sgxvtpm.tpm.engine import LibtpmsEngine, MemoryStateStore, StateType
from sgxvtpm.wire.vtpm import (
    TpmResult,
    VtpmOp,
    VtpmRequest,
    VtpmResponse,
    decode_response,
    encode_request,
)

R = VtpmRequest


@pytest.fixture
def store() -> MemoryStateStore:
    return MemoryStateStore()


@pytest.fixture
def core(store: MemoryStateStore) -> Iterator[VtpmCore]:
    c = VtpmCore(lambda: LibtpmsEngine(store))
    yield c
    c.close()


def tpm(core: VtpmCore, command: bytes, locality: int = 0) -> bytes:
    response = core.handle(R.tpm_command(command, locality))
    assert response.success
    return response.payload


def rc(core: VtpmCore, command: bytes) -> int:
    return wire.response_code(tpm(core, command))


def test_commands_before_init_get_swtpm_error(core: VtpmCore) -> None:
    # QEMU's version probe: TPM2_ReadClock must get the tagged TPM 2.0 error.
    assert tpm(core, wire.read_clock()) == bytes.fromhex("80010000000a00000101")
    assert tpm(core, b"\xc1\x00") == NOT_RUNNING_RESPONSE
    for op in (VtpmOp.GET_ESTABLISHED, VtpmOp.CANCEL, VtpmOp.STORE_VOLATILE):
        assert core.handle(R(op)).result == TpmResult.BAD_ORDINAL
    assert core.handle(R.get_stateblob(1)).result == TpmResult.BAD_ORDINAL
    assert core.handle(R.reset_established(3)).result == TpmResult.BAD_ORDINAL


def test_lifecycle_and_controls(core: VtpmCore) -> None:
    assert core.handle(R.set_buffersize(0)).buffer_sizes() == (4096, 2808, 4096)
    assert core.handle(R.init()).success
    assert rc(core, wire.startup(TPM2_SU.CLEAR)) == 0
    assert core.handle(R.set_buffersize(4096)).result == TpmResult.BAD_ORDINAL
    assert core.handle(R(VtpmOp.GET_ESTABLISHED)).established() is False
    assert core.handle(R.reset_established(0)).result == TpmResult.BAD_LOCALITY
    assert core.handle(R.reset_established(3)).success
    assert core.handle(R(VtpmOp.STORE_VOLATILE)).success
    assert core.handle(R(VtpmOp.CANCEL)).success
    assert '"family":"2.0"' in core.handle(R.get_info(1)).info()
    assert core.handle(R(VtpmOp.STOP)).success
    assert tpm(core, wire.get_random(4)) == NOT_RUNNING_RESPONSE
    assert core.handle(R(VtpmOp.SHUTDOWN)).success  # idempotent while stopped


def test_init_sends_orderly_shutdown(core: VtpmCore) -> None:
    """A reset without the guest's TPM2_Shutdown resumes: we sent Shutdown(STATE)."""
    core.handle(R.init())
    assert rc(core, wire.startup(TPM2_SU.CLEAR)) == 0
    assert rc(core, wire.get_random(8)) == 0
    core.handle(R.init())
    assert rc(core, wire.startup(TPM2_SU.STATE)) == 0


def test_guest_shutdown_is_not_repeated(core: VtpmCore) -> None:
    """After the guest's own TPM2_Shutdown(CLEAR) the core sends none: Startup(STATE)
    must then fail, as after a real orderly CLEAR shutdown."""
    core.handle(R.init())
    assert rc(core, wire.startup(TPM2_SU.CLEAR)) == 0
    assert rc(core, wire.shutdown(TPM2_SU.CLEAR)) == 0
    core.handle(R(VtpmOp.STOP))
    core.handle(R.init())
    assert rc(core, wire.startup(TPM2_SU.STATE)) != 0
    assert rc(core, wire.startup(TPM2_SU.CLEAR)) == 0


def test_state_blobs_only_while_stopped(core: VtpmCore) -> None:
    core.handle(R.init())
    rc(core, wire.startup(TPM2_SU.CLEAR))
    permanent = core.handle(R.get_stateblob(StateType.PERMANENT)).payload
    assert permanent
    assert core.handle(R.get_stateblob(3)).payload == b""  # no savestate yet
    assert core.handle(R.get_stateblob(7)).result == TpmResult.BAD_PARAMETER
    assert core.handle(R.set_stateblob(1, permanent)).result == TpmResult.BAD_ORDINAL
    core.handle(R(VtpmOp.STOP))
    assert core.handle(R.set_stateblob(1, permanent)).success
    assert core.handle(R.set_stateblob(3, b"")).success
    assert core.handle(R.set_stateblob(1, b"not a blob")).result != 0
    assert core.handle(R.set_stateblob(9, permanent)).result == TpmResult.BAD_PARAMETER


class _XorCipher:
    """A stand-in cipher that tags blobs, to see the hook is used both ways."""

    def state_changed(self) -> None:
        pass

    def encrypt(self, kind: StateType, blob: bytes) -> bytes:
        return b"ENC" + bytes(b ^ 0x5A for b in blob)

    def decrypt(self, kind: StateType, blob: bytes) -> bytes:
        if not blob.startswith(b"ENC"):
            raise BlobCipherError("not ours")
        return bytes(b ^ 0x5A for b in blob[3:])


def test_blob_cipher_hook(store: MemoryStateStore) -> None:
    core = VtpmCore(lambda: LibtpmsEngine(store), blob_cipher=_XorCipher())
    try:
        core.handle(R.init())
        blob = core.handle(R.get_stateblob(1)).payload
        assert blob.startswith(b"ENC")
        core.handle(R(VtpmOp.STOP))
        assert core.handle(R.set_stateblob(1, blob[3:])).result == TpmResult.BAD_PARAMETER
        assert core.handle(R.set_stateblob(1, blob)).success
    finally:
        core.close()


def test_handle_message_never_raises(core: VtpmCore) -> None:
    bad = decode_response(core.handle_message(b"\xff\x00"))
    assert bad == VtpmResponse.error(TpmResult.BAD_PARAMETER)
    ok = decode_response(core.handle_message(encode_request(R.tpm_command(wire.read_clock()))))
    assert ok.payload == NOT_RUNNING_RESPONSE


def test_bad_command_bytes_get_tpm_errors(core: VtpmCore) -> None:
    core.handle(R.init())
    for junk in (b"", b"\x80\x01", bytes(10), bytes.fromhex("80010000000c00000144")):
        response = tpm(core, junk)
        assert wire.response_code(response) != TPM2_RC.SUCCESS


def test_init_if_stopped_never_resets_a_running_tpm(core: VtpmCore) -> None:
    if_stopped = 0x80000000  # sgxvtpm.wire.vtpm.INIT_FLAG_IF_STOPPED (checked below)
    digest = bytes(range(32))
    assert core.handle(R.init(if_stopped)).success  # stopped: it starts
    assert rc(core, wire.startup(TPM2_SU.CLEAR)) == TPM2_RC.SUCCESS
    assert rc(core, wire.pcr_extend(16, digest)) == TPM2_RC.SUCCESS
    extended = wire.parse_pcr_read(tpm(core, wire.pcr_read([16]))).digests[0]
    assert extended != bytes(32)
    assert core.handle(R.init(if_stopped)).success  # running: left alone
    assert wire.parse_pcr_read(tpm(core, wire.pcr_read([16]))).digests[0] == extended
    assert rc(core, wire.startup(TPM2_SU.CLEAR)) == TPM2_RC.INITIALIZE  # still started
    assert core.handle(R.init(0)).success  # the platform's INIT is a reset
    assert rc(core, wire.startup(TPM2_SU.CLEAR)) == TPM2_RC.SUCCESS
    assert wire.parse_pcr_read(tpm(core, wire.pcr_read([16]))).digests[0] == bytes(32)
    from sgxvtpm.wire import vtpm

    assert if_stopped == vtpm.INIT_FLAG_IF_STOPPED
    # ATTACH belongs to the instance enclave (its sessions), not to the TPM.
    assert core.handle(R.attach()).result == TpmResult.BAD_ORDINAL


def test_drtm_hash_sequence_at_locality_4_extends_pcr17(core: VtpmCore) -> None:
    """HASH_START/DATA/END (swtpm's CMD_HASH_*) are _TPM_Hash_Start/Data/End: from
    locality 4 after Startup, PCR 17 is reset and extended with the data's digest
    (TPM 2.0 Part 1, 34.3), and TPM_ESTABLISHED is set."""
    for op in (VtpmOp.HASH_START, VtpmOp.HASH_END):
        assert core.handle(R(op, locality=4)).result == TpmResult.BAD_ORDINAL  # not running
    assert core.handle(R.hash_data(b"x", 4)).result == TpmResult.BAD_ORDINAL
    assert core.handle(R.init()).success
    assert rc(core, wire.startup(TPM2_SU.CLEAR)) == 0
    assert core.handle(R(VtpmOp.GET_ESTABLISHED)).established() is False
    mle = b"measured launch environment" * 200
    assert core.handle(R(VtpmOp.HASH_START, locality=4)).success
    for i in range(0, len(mle), 4096):
        assert core.handle(R.hash_data(mle[i:i + 4096], 4)).success
    assert core.handle(R(VtpmOp.HASH_END, locality=4)).success
    expected = hashlib.sha256(bytes(32) + hashlib.sha256(mle).digest()).digest()
    assert tpm(core, wire.pcr_read([17]))[-32:] == expected
    assert core.handle(R(VtpmOp.GET_ESTABLISHED)).established() is True
    # Through the encoded path too (what the instance enclave receives).
    message = encode_request(R(VtpmOp.HASH_START, locality=4))
    assert decode_response(core.handle_message(message)).success
