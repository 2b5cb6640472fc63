"""swtpm semantics over a libtpms engine: the vTPM inside an instance enclave.

:class:`VtpmCore` answers :mod:`sgxvtpm.wire.vtpm` requests the way swtpm's
control and data channels answer QEMU and TSS clients (swtpm 0.7.1
``ctrlchannel.c``/``mainloop.c``; the automatic TPM2_Shutdown is from swtpm
0.10, see :meth:`VtpmCore._orderly_shutdown`):

- INIT starts the TPM (flag 1 deletes the volatile state first); on a
  running TPM it is a reset (swtpm stops and restarts libtpms), unless it
  carries INIT_FLAG_IF_STOPPED, which leaves a running TPM alone. STOP and
  SHUTDOWN stop it. SHUTDOWN does not end anything here (swtpm exits): the
  instance enclave outlives the VM's QEMU process.
- A TPM command while the TPM is stopped gets the 10-byte TPM 2.0 error
  response ``80 01 00000000a 00000101`` (TPM_RC_FAILURE) that swtpm sends; QEMU
  probes the TPM version with TPM2_ReadClock before INIT and only checks the
  tag (TPM_ST_NO_SESSIONS means TPM 2.0).
- Control operations that need a running TPM answer TPM_BAD_ORDINAL while it
  is stopped, as swtpm does; SET_STATEBLOB and a non-zero SET_BUFFERSIZE
  answer TPM_BAD_ORDINAL while it runs.
- State blobs for migration pass through :attr:`VtpmCore.blob_cipher`, which
  the core also tells when the guest changes the TPM (so an instance can
  refuse blobs older than that: blobcipher.py). The default
  :class:`IdentityBlobCipher` does NOT protect them; the instance enclave's
  cipher seals them, so QEMU's migration stream never carries plaintext TPM
  state and cannot roll the TPM back.

One engine per process (libtpms keeps global state): the core creates its
engine once, on first use, from ``engine_factory``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import ClassVar, Protocol

from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.tpm.constants import HEADER_SIZE, TPM2_CC, TPM2_RC, TPM2_SU
from sgxvtpm.tpm.engine import EngineError, EngineMisuseError, StateType
from sgxvtpm.tpm.wire import error_response, shutdown, stir_random
from sgxvtpm.util import log
from sgxvtpm.wire.vtpm import (
    INIT_FLAG_DELETE_VOLATILE,
    INIT_FLAG_IF_STOPPED,
    TpmResult,
    VtpmOp,
    VtpmProtocolError,
    VtpmRequest,
    VtpmResponse,
    decode_request,
    encode_response,
    encode_tpm_response,
    tpm_command_of,
)

#: What swtpm answers any command while the TPM is not running
#: (tpmlib_write_fatal_error_response: TPM_ST_NO_SESSIONS, 10, TPM_RC_FAILURE).
NOT_RUNNING_RESPONSE = error_response(TPM2_RC.FAILURE)


class Engine(Protocol):
    """What the core needs from :class:`sgxvtpm.tpm.engine.LibtpmsEngine`."""

    @property
    def running(self) -> bool: ...

    def start(self, delete_volatile: bool = False) -> None: ...

    def stop(self) -> None: ...

    def process(self, command: bytes, locality: int = 0) -> bytes: ...

    def get_state(self, kind: StateType) -> bytes: ...

    def set_state(self, kind: StateType, data: bytes) -> None: ...

    def store_volatile(self) -> None: ...

    def cancel(self) -> None: ...

    def set_buffer_size(self, size: int) -> tuple[int, int, int]: ...

    def established(self) -> bool: ...

    def reset_established(self, locality: int) -> None: ...

    def get_info(self, flags: int) -> str: ...

    def hash_start(self, locality: int) -> None: ...

    def hash_data(self, data: bytes, locality: int) -> None: ...

    def hash_end(self, locality: int) -> None: ...


class BlobCipherError(SgxvtpmError):
    """A state blob did not decrypt (wrong key, tampered, not ours, or not the latest).

    The instance answers SET_STATEBLOB with an error: give back, unchanged, the
    blob this VM's instance exported last.
    """


class BlobCipher(Protocol):
    """Protects state blobs that leave the enclave (GET/SET_STATEBLOB)."""

    def state_changed(self) -> None:
        """The guest changed the TPM (a command, RESET_TPMESTABLISHED): blobs exported
        before describe an older TPM. Called for every command: keep it cheap."""
        ...

    def encrypt(self, kind: StateType, blob: bytes) -> bytes:
        """The protected blob; raises BlobCipherError if it cannot be made."""
        ...

    def decrypt(self, kind: StateType, blob: bytes) -> bytes:
        """The plaintext blob; raises BlobCipherError if it does not verify or is stale."""
        ...


class IdentityBlobCipher:
    """Blobs unchanged: only for the local, unprotected endpoint used in tests.

    The instance enclave uses blobcipher.SealedBlobCipher.
    """

    def state_changed(self) -> None:
        pass

    def encrypt(self, kind: StateType, blob: bytes) -> bytes:
        return blob

    def decrypt(self, kind: StateType, blob: bytes) -> bytes:
        return blob


class VtpmCore:
    """Answers vTPM requests with swtpm's semantics over one engine.

    Not thread-safe: the instance enclave calls :meth:`handle` for one request
    at a time. (So CANCEL can only reach libtpms between commands; it is
    accepted, as swtpm accepts it, and has nothing to cancel.)
    """

    def __init__(
        self,
        engine_factory: Callable[[], Engine],
        blob_cipher: BlobCipher | None = None,
    ) -> None:
        self._factory = engine_factory
        self._engine: Engine | None = None
        self.blob_cipher: BlobCipher = blob_cipher or IdentityBlobCipher()
        # Command code of the last TPM command the guest sent since the TPM
        # started (None: none yet). swtpm tracks the same ("lastCommand").
        self._last_code: int | None = None

    # ------------------------------------------------------------ public API

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self._factory()
        return self._engine

    @property
    def running(self) -> bool:
        return self._engine is not None and self._engine.running

    def handle_message(self, message: bytes) -> bytes:
        """One encoded request in, one encoded response out; never raises for bad bytes."""
        return self.answer(message, tpm_command_of(message))

    def answer(self, message: bytes, command: tuple[bytes, int] | None) -> bytes:
        """:meth:`handle_message` for a caller that has ``tpm_command_of(message)`` already."""
        if command is not None and self.running:  # the hot path: no request objects
            try:
                return encode_tpm_response(self._process(*command))
            except (EngineError, EngineMisuseError) as exc:
                return encode_response(self._engine_failure(VtpmOp.TPM_COMMAND, exc))
        try:
            request = decode_request(message)
        except VtpmProtocolError as exc:
            log.log("vtpm.bad_request", reason=str(exc))
            return encode_response(VtpmResponse.error(TpmResult.BAD_PARAMETER))
        return encode_response(self.handle(request))

    def handle(self, request: VtpmRequest) -> VtpmResponse:
        """Answer one request. Engine failures become TPM_RESULT codes."""
        handler = self._HANDLERS.get(VtpmOp(request.op))
        if handler is None:  # ATTACH: the instance answers it, for its sessions
            return VtpmResponse.error(TpmResult.BAD_ORDINAL)
        try:
            return handler(self, request)
        except (EngineError, EngineMisuseError) as exc:
            return self._engine_failure(VtpmOp(request.op), exc)

    @staticmethod
    def _engine_failure(op: VtpmOp, exc: EngineError | EngineMisuseError) -> VtpmResponse:
        if isinstance(exc, EngineError):
            log.log("vtpm.engine_error", op=op.name, reason=str(exc))
            return VtpmResponse.error(exc.result or TpmResult.FAIL)
        log.log("vtpm.engine_misuse", op=op.name, reason=str(exc))
        return VtpmResponse.error(TpmResult.FAIL)

    def snapshot(self, volatile: bytes | None = None) -> tuple[bool, bytes, int | None]:
        """(running, libtpms VOLATILE state if running, last command code): what a
        resume record keeps of this core (sgxvtpm/enclaves/resume.py).

        ``volatile``: the caller knows the VOLATILE state is still this
        (resume.QuietCommands), which is then not read again.
        """
        if not self.running:
            return False, b"", self._last_code
        if volatile is None:
            volatile = self.engine.get_state(StateType.VOLATILE)
        return True, volatile, self._last_code

    def resume(self, running: bool, volatile: bytes, last_code: int | None) -> None:
        """Come back as :meth:`snapshot` saw the core, in a fresh process.

        The TPM restarts from ``volatile`` without TPM2_Startup (as after an
        orderly Shutdown(STATE) and Startup(STATE), but with no DA penalty and
        nothing lost), then its DRBG is stirred so no random output repeats. A TPM
        powered on but not yet started answers the stir TPM_RC_INITIALIZE, as it
        answers every command but TPM2_Startup, which instantiates its DRBG anew
        from fresh entropy (CryptStartup): nothing to stir then.
        EngineError if libtpms refuses the state.
        """
        if self.running:
            raise EngineMisuseError("resume() on a running TPM")
        self._last_code = last_code
        if not running:
            return
        engine = self.engine
        engine.set_state(StateType.VOLATILE, volatile)
        engine.start()
        rc = _rc(engine.process(stir_random(os.urandom(32))))
        if rc not in (TPM2_RC.SUCCESS, TPM2_RC.INITIALIZE):
            engine.stop()
            raise EngineError(f"TPM2_StirRandom after resume answered {rc:#x}")

    def fail(self) -> None:
        """The state a command changed could not be made durable: stop libtpms without a
        Shutdown, so every command answers TPM_RC_FAILURE until the VM's platform
        powers the TPM on again (INIT restarts it from the durable state), as a TPM
        in failure mode needs _TPM_Init (Part 1, 12.3)."""
        if self.running:
            self.engine.stop()
        self._last_code = None

    def close(self) -> None:
        """Shut the TPM down in order and stop it (the enclave is ending)."""
        if self.running:
            self._stop()

    # ------------------------------------------------------------ lifecycle

    def _orderly_shutdown(self) -> None:
        """Send TPM2_Shutdown(STATE), else (CLEAR), unless the guest's last command was one.

        A TPM that restarts without an orderly shutdown after a DA-protected
        authorization counts a failed authorization (Part 1, 19.8.6), so VM
        resets would creep into lockout. swtpm 0.10 does this
        (tpmlib_maybe_send_tpm2_shutdown); swtpm 0.7.1, Debian 12's, does not.
        TPM_RC_INITIALIZE means the TPM was never started: nothing to do.
        """
        if self._last_code in (None, TPM2_CC.Shutdown):
            return
        engine = self.engine
        for su in (TPM2_SU.STATE, TPM2_SU.CLEAR):
            rc = _rc(engine.process(shutdown(su)))
            if rc in (TPM2_RC.SUCCESS, TPM2_RC.INITIALIZE):
                break
        self._last_code = TPM2_CC.Shutdown

    def _stop(self) -> None:
        if self.engine.running:
            self._orderly_shutdown()
            self.engine.stop()
        self._last_code = None

    # ------------------------------------------------------------ handlers

    def _tpm_command(self, request: VtpmRequest) -> VtpmResponse:
        if not self.running:
            return VtpmResponse.ok(NOT_RUNNING_RESPONSE)
        return VtpmResponse.ok(self._process(request.data, request.locality))

    def _process(self, command: bytes, locality: int) -> bytes:
        self.blob_cipher.state_changed()
        if len(command) >= HEADER_SIZE:
            self._last_code = int.from_bytes(command[6:10], "big")
        return self.engine.process(command, locality)

    def _init(self, request: VtpmRequest) -> VtpmResponse:
        if request.flags & INIT_FLAG_IF_STOPPED and self.running:
            return VtpmResponse.ok()  # even INIT(0) would be a reset in libtpms terms
        self._stop()
        self.engine.start(delete_volatile=bool(request.flags & INIT_FLAG_DELETE_VOLATILE))
        return VtpmResponse.ok()

    def _stop_op(self, request: VtpmRequest) -> VtpmResponse:
        self._stop()
        return VtpmResponse.ok()

    def _get_established(self, request: VtpmRequest) -> VtpmResponse:
        if not self.running:
            return VtpmResponse.error(TpmResult.BAD_ORDINAL)
        return VtpmResponse.for_established(self.engine.established())

    def _reset_established(self, request: VtpmRequest) -> VtpmResponse:
        if not self.running:
            return VtpmResponse.error(TpmResult.BAD_ORDINAL)
        self.blob_cipher.state_changed()
        self.engine.reset_established(request.locality)
        return VtpmResponse.ok()

    def _set_buffersize(self, request: VtpmRequest) -> VtpmResponse:
        if request.size and self.running:
            return VtpmResponse.error(TpmResult.BAD_ORDINAL)
        return VtpmResponse.for_buffer_sizes(*self.engine.set_buffer_size(request.size))

    def _blob_kind(self, request: VtpmRequest) -> StateType | None:
        try:
            return StateType(request.blob_type)
        except ValueError:
            return None

    def _get_stateblob(self, request: VtpmRequest) -> VtpmResponse:
        if not self.running:
            return VtpmResponse.error(TpmResult.BAD_ORDINAL)
        kind = self._blob_kind(request)
        if kind is None:
            return VtpmResponse.error(TpmResult.BAD_PARAMETER)
        blob = self.engine.get_state(kind)
        # An absent blob stays empty (swtpm: no data), so the peer can tell
        # "no savestate" without decrypting; only real state is wrapped.
        if not blob:
            return VtpmResponse.ok(b"")
        try:
            return VtpmResponse.ok(self.blob_cipher.encrypt(kind, blob))
        except BlobCipherError as exc:
            log.log("vtpm.state_export_failed", state_type=kind.name, reason=str(exc))
            return VtpmResponse.error(TpmResult.FAIL)

    def _set_stateblob(self, request: VtpmRequest) -> VtpmResponse:
        if self.running:
            return VtpmResponse.error(TpmResult.BAD_ORDINAL)
        kind = self._blob_kind(request)
        if kind is None:
            return VtpmResponse.error(TpmResult.BAD_PARAMETER)
        if not request.data:
            return VtpmResponse.ok()  # QEMU sends absent blobs with length 0
        try:
            blob = self.blob_cipher.decrypt(kind, request.data)
        except BlobCipherError as exc:
            # Tampered, foreign or stale (a rollback): one answer, the reason in the log.
            log.log("vtpm.state_refused", state_type=kind.name, reason=str(exc))
            return VtpmResponse.error(TpmResult.BAD_PARAMETER)
        self.engine.set_state(kind, blob)
        return VtpmResponse.ok()

    def _cancel(self, request: VtpmRequest) -> VtpmResponse:
        if not self.running:
            return VtpmResponse.error(TpmResult.BAD_ORDINAL)
        self.engine.cancel()
        return VtpmResponse.ok()

    def _store_volatile(self, request: VtpmRequest) -> VtpmResponse:
        if not self.running:
            return VtpmResponse.error(TpmResult.BAD_ORDINAL)
        try:
            self.engine.store_volatile()
        except OSError:
            return VtpmResponse.error(TpmResult.IOERROR)
        return VtpmResponse.ok()

    def _get_info(self, request: VtpmRequest) -> VtpmResponse:
        return VtpmResponse.ok(self.engine.get_info(request.flags).encode())

    def _hash(self, request: VtpmRequest) -> VtpmResponse:
        """HASH_START/DATA/END: the platform's DRTM indications at the request's
        locality (swtpm: TPM_IO_Hash_*; TPM_BAD_ORDINAL while stopped)."""
        if not self.running:
            return VtpmResponse.error(TpmResult.BAD_ORDINAL)
        self.blob_cipher.state_changed()
        engine, locality = self.engine, request.locality
        if request.op == VtpmOp.HASH_START:
            engine.hash_start(locality)
        elif request.op == VtpmOp.HASH_DATA:
            engine.hash_data(request.data, locality)
        else:
            engine.hash_end(locality)
        return VtpmResponse.ok()

    _HANDLERS: ClassVar[dict[VtpmOp, Callable[[VtpmCore, VtpmRequest], VtpmResponse]]] = {
        VtpmOp.TPM_COMMAND: _tpm_command,
        VtpmOp.INIT: _init,
        VtpmOp.SHUTDOWN: _stop_op,
        VtpmOp.STOP: _stop_op,
        VtpmOp.GET_ESTABLISHED: _get_established,
        VtpmOp.RESET_ESTABLISHED: _reset_established,
        VtpmOp.SET_BUFFERSIZE: _set_buffersize,
        VtpmOp.GET_STATEBLOB: _get_stateblob,
        VtpmOp.SET_STATEBLOB: _set_stateblob,
        VtpmOp.CANCEL: _cancel,
        VtpmOp.STORE_VOLATILE: _store_volatile,
        VtpmOp.GET_INFO: _get_info,
        VtpmOp.HASH_START: _hash,
        VtpmOp.HASH_DATA: _hash,
        VtpmOp.HASH_END: _hash,
    }


def _rc(response: bytes) -> int:
    if len(response) < HEADER_SIZE:
        return int(TPM2_RC.FAILURE)
    return int(struct.unpack_from(">I", response, 6)[0])
