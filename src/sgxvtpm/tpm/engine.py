"""libtpms (Debian's libtpms0, 0.9.2) as an in-process TPM 2.0 engine.

libtpms keeps one TPM in global C state, so a process runs at most one
:class:`LibtpmsEngine` at a time; a second ``start()`` raises
:class:`EngineMisuseError`. Use one process per TPM (docs/ARCHITECTURE.md,
"Processes").

Call order (libtpms' tpm_library.h, as swtpm uses it):
ChooseTPMVersion(TPM 2.0) -> RegisterCallbacks -> [SetBufferSize] ->
[SetState] -> MainInit -> Process ... -> Terminate.

State persistence goes through the NVRAM callbacks to a :class:`StateStore`.
libtpms writes "permall" itself after every command that changes NV (and at
manufacture); "volatilestate" is written only on request
(:meth:`LibtpmsEngine.store_volatile`). If a store raises, the callback
returns TPM_FAIL and libtpms enters failure mode: that command and every later
one answer TPM_RC_FAILURE until the engine is restarted from the last durable
state, so no success is ever reported for a change that is not durable
(SECURITY.md property 16). The exception is kept in
:attr:`LibtpmsEngine.store_error`.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from sgxvtpm.errors import SgxvtpmError, UsageError
from sgxvtpm.tpm.constants import HEADER_SIZE, LIBTPMS_MAX_BUFFER, TPM2_CC, TPM2_RC, TPM2_SU
from sgxvtpm.tpm.wire import error_response, shutdown, validate_command
from sgxvtpm.util import log, measured

LIBTPMS_SONAME = "libtpms.so.0"

# TPM 1.2-style TPM_RESULT values used by the libtpms library API (tpm_error.h).
TPM_SUCCESS = 0x00
TPM_BAD_PARAMETER = 0x03
TPM_FAIL = 0x09
TPM_BAD_LOCALITY = 0x3D
TPM_RETRY = 0x800  # from loaddata: "no such blob", libtpms then manufactures

_TPMLIB_TPM_VERSION_2 = 1
_MAX_LOCALITY = 4


class StateType(enum.IntEnum):
    """The three state blobs, numbered as in swtpm's GET/SET_STATEBLOB.

    libtpms' own TPMLIB_StateType is a bit mask (1, 2, 4); the mapping is
    internal to this module.
    """

    PERMANENT = 1
    VOLATILE = 2
    SAVESTATE = 3


BLOB_NAMES: Mapping[StateType, str] = {
    StateType.PERMANENT: "permall",
    StateType.VOLATILE: "volatilestate",
    StateType.SAVESTATE: "savestate",
}
_TPMLIB_STATE = {StateType.PERMANENT: 1, StateType.VOLATILE: 2, StateType.SAVESTATE: 4}


class StateStore(Protocol):
    """Where libtpms keeps its blobs ("permall", "volatilestate", "savestate")."""

    def load(self, name: str) -> bytes | None:
        """The blob, or None if there is none (the TPM is then manufactured)."""
        ...

    def store(self, name: str, data: bytes) -> None:
        """Make ``data`` durable before returning; may raise OSError."""
        ...

    def delete(self, name: str) -> None:
        """Remove the blob; no error if it does not exist."""
        ...


class MemoryStateStore:
    """A dict-backed :class:`StateStore` (tests, and state that a caller seals)."""

    def __init__(self, blobs: Mapping[str, bytes] | None = None) -> None:
        self.blobs: dict[str, bytes] = dict(blobs or {})

    def load(self, name: str) -> bytes | None:
        return self.blobs.get(name)

    def store(self, name: str, data: bytes) -> None:
        self.blobs[name] = bytes(data)

    def delete(self, name: str) -> None:
        self.blobs.pop(name, None)


class EngineError(SgxvtpmError):
    """libtpms refused an operation; ``result`` is its TPM_RESULT.

    For a failed start() the cause (e.g. the store's error) is chained as
    ``__cause__``: fix the state or the store, then start again.
    """

    def __init__(self, message: str, result: int = TPM_FAIL) -> None:
        self.result = result
        super().__init__(f"{message} (TPM_RESULT {result:#x})")


class EngineMisuseError(UsageError, RuntimeError):
    """The engine was used in the wrong state (a bug in the caller).

    Examples: a second engine started in one process (run each TPM in its own
    process), process() on a stopped engine, set_state() on a running one.
    """


# ---------------------------------------------------------------- ctypes glue

_u8p = ctypes.POINTER(ctypes.c_ubyte)
_R = ctypes.c_uint32  # TPM_RESULT
_NvramInit = ctypes.CFUNCTYPE(_R)
_NvramLoad = ctypes.CFUNCTYPE(
    _R, ctypes.POINTER(_u8p), ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32, ctypes.c_char_p
)
_NvramStore = ctypes.CFUNCTYPE(_R, _u8p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_char_p)
_NvramDelete = ctypes.CFUNCTYPE(_R, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_ubyte)
_IoInit = ctypes.CFUNCTYPE(_R)
_IoGetLocality = ctypes.CFUNCTYPE(_R, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32)
_IoGetPP = ctypes.CFUNCTYPE(_R, ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint32)


class _Callbacks(ctypes.Structure):
    """struct libtpms_callbacks (tpm_library.h)."""

    _fields_ = (
        ("sizeOfStruct", ctypes.c_int),
        ("tpm_nvram_init", _NvramInit),
        ("tpm_nvram_loaddata", _NvramLoad),
        ("tpm_nvram_storedata", _NvramStore),
        ("tpm_nvram_deletename", _NvramDelete),
        ("tpm_io_init", _IoInit),
        ("tpm_io_getlocality", _IoGetLocality),
        ("tpm_io_getphysicalpresence", _IoGetPP),
    )


def _sig(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> None:
    if hasattr(lib, name):
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


@functools.cache
def _libtpms() -> ctypes.CDLL:
    # In an enclave: the measured bytes (util.measured); elsewhere: the soname.
    lib = ctypes.CDLL(measured.library_path("libtpms", LIBTPMS_SONAME))
    u32, u32p = ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)
    _sig(lib, "TPMLIB_GetVersion", u32)
    _sig(lib, "TPMLIB_ChooseTPMVersion", u32, ctypes.c_int)
    _sig(lib, "TPMLIB_RegisterCallbacks", u32, ctypes.POINTER(_Callbacks))
    _sig(lib, "TPMLIB_MainInit", u32)
    _sig(lib, "TPMLIB_Terminate", None)
    _sig(lib, "TPMLIB_Process", u32, ctypes.POINTER(_u8p), u32p, u32p, _u8p, u32)
    _sig(lib, "TPMLIB_VolatileAll_Store", u32, ctypes.POINTER(_u8p), u32p)
    _sig(lib, "TPMLIB_CancelCommand", u32)
    _sig(lib, "TPMLIB_GetInfo", ctypes.c_void_p, ctypes.c_int)
    _sig(lib, "TPMLIB_SetBufferSize", u32, u32, u32p, u32p)
    _sig(lib, "TPMLIB_SetState", u32, ctypes.c_int, ctypes.c_char_p, u32)
    _sig(lib, "TPMLIB_GetState", u32, ctypes.c_int, ctypes.POINTER(_u8p), u32p)
    _sig(lib, "TPM_IO_TpmEstablished_Get", u32, ctypes.POINTER(ctypes.c_ubyte))
    _sig(lib, "TPM_IO_TpmEstablished_Reset", u32)
    _sig(lib, "TPM_IO_Hash_Start", u32)
    _sig(lib, "TPM_IO_Hash_Data", u32, ctypes.c_char_p, u32)
    _sig(lib, "TPM_IO_Hash_End", u32)
    _sig(lib, "TPM_Free", None, ctypes.c_void_p)
    _sig(lib, "TPMLIB_SetDebugFD", None, ctypes.c_int)
    _silence_diagnostics(lib)
    return lib


def _silence_diagnostics(lib: ctypes.CDLL) -> None:
    """Send libtpms' own diagnostics to /dev/null instead of stderr.

    With no debug fd set, libtpms writes to stderr when it enters failure mode
    (e.g. after a failed state store), and that dump holds the bytes of the TPM
    command that failed: NV data, authValues in password sessions, sensitive
    areas. In an instance enclave stderr is the host's log (SECURITY.md
    property 12).
    Failures still reach the caller as TPM_RC_FAILURE and our own log line.
    """
    if hasattr(lib, "TPMLIB_SetDebugFD"):
        lib.TPMLIB_SetDebugFD(os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC))


@functools.cache
def _libc() -> ctypes.CDLL:
    # libtpms releases loaddata's buffer with free(), so it must come from
    # the same allocator: the process' libc malloc.
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.restype = None
    libc.free.argtypes = (ctypes.c_void_p,)
    return libc


def libtpms_version() -> tuple[int, int, int]:
    """(major, minor, micro) of the loaded libtpms."""
    v = int(_libtpms().TPMLIB_GetVersion())
    return (v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF


def libtpms_has(symbol: str) -> bool:
    """Whether libtpms exports ``symbol`` (e.g. TPMLIB_SetProfile, 0.10+)."""
    return hasattr(_libtpms(), symbol)


_process_lock = threading.Lock()
_running_engine: LibtpmsEngine | None = None


def _guarded(kind: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Wrap a libtpms callback so no Python exception crosses into C.

    ctypes would print the traceback and return 0 (TPM_SUCCESS): a failed
    store would then look durable. Return TPM_FAIL and record the error.
    """

    def wrap(fn: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(fn)
        def guarded(self: LibtpmsEngine, *args: Any) -> int:
            try:
                return fn(self, *args)
            except BaseException as exc:  # must not unwind through C
                self._record_callback_error(kind, exc)
                return TPM_FAIL

        return guarded

    return wrap


class LibtpmsEngine:
    """One libtpms TPM 2.0, fed raw command bytes.

    ``process()`` never raises for client bytes: malformed input gets a TPM
    error response. It does not retry TPM_RC_RETRY (libtpms returns it for
    the first DA-protected authorization after an orderly startup, Part 1,
    19.8.6 "g_daUsed"): like a hardware TPM, the client resends.

    Thread-safe: calls are serialised; :meth:`cancel` may be called from any
    thread while :meth:`process` runs.
    """

    def __init__(self, store: StateStore | None = None) -> None:
        self.store: StateStore = MemoryStateStore() if store is None else store
        self._lock = threading.Lock()
        self._running = False
        self._locality = 0
        self._buffer_size = 0  # 0: libtpms default
        self._store_failures = 0
        self._last_code = -1  # command code of the last process() call
        self._store_error: BaseException | None = None
        self._callback_error: BaseException | None = None
        # Cells reused by every process() call: the response buffer belongs
        # to libtpms between calls (it reallocs as needed) and is freed in stop().
        self._rbuf = _u8p()
        self._rlen = ctypes.c_uint32(0)
        self._rcap = ctypes.c_uint32(0)
        self._p_rbuf = ctypes.pointer(self._rbuf)
        self._p_rlen = ctypes.pointer(self._rlen)
        self._p_rcap = ctypes.pointer(self._rcap)
        self._set_command_buffer(LIBTPMS_MAX_BUFFER)
        self._callbacks = self._make_callbacks()

    def _set_command_buffer(self, capacity: int) -> None:
        self._cmd_capacity = capacity
        self._cmd = (ctypes.c_ubyte * capacity)()
        self._cmd_view = memoryview(self._cmd).cast("B")  # slice assignment: fastest copy

    # ------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._running

    @property
    def store_error(self) -> BaseException | None:
        """The last exception a state-store call raised inside libtpms, if any."""
        return self._store_error

    def start(self, delete_volatile: bool = False) -> None:
        """Start the TPM: load state from the store, or manufacture a new TPM.

        libtpms resumes from a stored "volatilestate" and leaves it in the
        store; ``delete_volatile`` deletes it after a successful start, as
        swtpm's INIT with PTM_INIT_FLAG_DELETE_VOLATILE does, so that the same
        snapshot is not resumed twice.

        Raises EngineMisuseError if any engine already runs in this process,
        EngineError (with the store's exception as cause) if libtpms cannot
        initialise, e.g. because a blob does not load.
        """
        global _running_engine
        with _process_lock, self._lock:
            if _running_engine is not None:
                raise EngineMisuseError(
                    "a libtpms engine already runs in this process; libtpms holds one "
                    "TPM per process, so stop it or start this one in another process"
                )
            lib = self._prepare_library()
            self._callback_error = None
            self._store_error = None
            self._last_code = -1
            rc = lib.TPMLIB_MainInit()
            if rc != TPM_SUCCESS:
                lib.TPMLIB_Terminate()
                cause = self._callback_error
                self._callback_error = None
                raise EngineError("TPMLIB_MainInit failed", rc) from cause
            if delete_volatile:
                try:
                    self.store.delete(BLOB_NAMES[StateType.VOLATILE])
                except Exception as exc:
                    lib.TPMLIB_Terminate()
                    raise EngineError("could not delete the volatile state") from exc
            self._running = True
            _running_engine = self

    def stop(self) -> None:
        """TPMLIB_Terminate: drop the TPM (state in the store stays). Idempotent."""
        global _running_engine
        with _process_lock, self._lock:
            if not self._running:
                return
            lib = _libtpms()
            lib.TPMLIB_Terminate()
            if self._rbuf:
                lib.TPM_Free(ctypes.cast(self._rbuf, ctypes.c_void_p))
            self._rbuf = _u8p()
            self._p_rbuf = ctypes.pointer(self._rbuf)
            self._rlen.value = self._rcap.value = 0
            self._running = False
            _running_engine = None

    def _prepare_library(self) -> ctypes.CDLL:
        """ChooseTPMVersion + RegisterCallbacks (+ SetBufferSize); caller holds locks."""
        lib = _libtpms()
        rc = lib.TPMLIB_ChooseTPMVersion(_TPMLIB_TPM_VERSION_2)
        if rc != TPM_SUCCESS:
            raise EngineError("TPMLIB_ChooseTPMVersion(2.0) failed", rc)
        rc = lib.TPMLIB_RegisterCallbacks(ctypes.byref(self._callbacks))
        if rc != TPM_SUCCESS:
            raise EngineError("TPMLIB_RegisterCallbacks failed", rc)
        if self._buffer_size:
            lib.TPMLIB_SetBufferSize(self._buffer_size, None, None)
        return lib

    def _require_stopped_process(self) -> None:
        if self._running:
            raise EngineMisuseError("the engine is running; stop() it first")
        if _running_engine is not None:
            raise EngineMisuseError("another libtpms engine runs in this process")

    # ------------------------------------------------------------ commands

    def process(self, command: bytes, locality: int = 0) -> bytes:
        """Execute one TPM command; returns the complete response.

        Malformed commands get TPM error responses. ``locality`` (0-4) is what
        the TPM sees for this command (swtpm SET_LOCALITY).
        """
        if not 0 <= locality <= _MAX_LOCALITY:
            raise ValueError(f"locality must be 0..4, got {locality}")
        if type(command) is not bytes:
            command = bytes(command)
        if not self._running:
            raise EngineMisuseError("process() on a stopped engine; start() it first")
        n = len(command)
        if n > self._cmd_capacity:
            # Larger than libtpms' buffer: it would answer from the header
            # alone (validate_command mirrors it), so do not copy.
            return error_response(
                validate_command(command, self._cmd_capacity) or TPM2_RC.COMMAND_SIZE
            )
        with self._lock:
            if not self._running:
                raise EngineMisuseError("process() on a stopped engine; start() it first")
            # libtpms may decrypt parameters in place: give it a copy.
            self._cmd_view[:n] = command
            self._locality = locality
            self._last_code = int.from_bytes(command[6:10], "big") if n >= HEADER_SIZE else -1
            failures = self._store_failures
            rc = _libtpms().TPMLIB_Process(self._p_rbuf, self._p_rlen, self._p_rcap, self._cmd, n)
            size = self._rlen.value
            if rc != TPM_SUCCESS or size < HEADER_SIZE or not self._rbuf:
                response = error_response(TPM2_RC.FAILURE)
            else:
                response = ctypes.string_at(self._rbuf, size)
            if self._store_failures != failures and response[6:10] == b"\0\0\0\0":
                # Never report success for a change that is not durable (SECURITY.md
                # property 16).
                response = error_response(TPM2_RC.FAILURE)
            self._raise_pending_base_exception()
        return response

    def ensure_orderly_shutdown(self) -> bool:
        """Send TPM2_Shutdown(STATE) unless the last command was a TPM2_Shutdown.

        Call before stop() when the guest may not have shut its TPM down (VM
        reset, STOP/INIT/SHUTDOWN on the control channel), as swtpm does: a
        TPM restarted without an orderly shutdown after a DA-protected
        authorization answers TPM_RC_LOCKOUT (Part 1, 19.8.6). Returns whether
        a Shutdown was sent.
        """
        if not self._running or self._last_code == TPM2_CC.Shutdown:
            return False
        self.process(shutdown(TPM2_SU.STATE))
        return True

    def cancel(self) -> None:
        """Ask libtpms to cancel the running command (TPMLIB_CancelCommand).

        Only long operations (e.g. RSA key generation) poll the flag; the
        command then ends with TPM_RC_CANCELED.
        """
        _libtpms().TPMLIB_CancelCommand()

    # ------------------------------------------------------------ state

    def get_state(self, kind: StateType) -> bytes:
        """TPMLIB_GetState: the unencrypted blob; b"" if there is none.

        While running this is the live state (VOLATILE is a snapshot of the
        running TPM); while stopped it is what the store (or a pending
        set_state) holds.
        """
        kind = StateType(kind)
        with _process_lock, self._lock:
            if not self._running:
                self._require_stopped_process()
                self._prepare_library()
            lib = _libtpms()
            buf = _u8p()
            length = ctypes.c_uint32(0)
            self._callback_error = None
            rc = lib.TPMLIB_GetState(_TPMLIB_STATE[kind], ctypes.byref(buf), ctypes.byref(length))
            try:
                if rc == TPM_RETRY:
                    return b""
                if rc != TPM_SUCCESS:
                    cause, self._callback_error = self._callback_error, None
                    raise EngineError(f"TPMLIB_GetState({kind.name}) failed", rc) from cause
                return ctypes.string_at(buf, length.value) if buf else b""
            finally:
                if buf:
                    lib.TPM_Free(ctypes.cast(buf, ctypes.c_void_p))

    def set_state(self, kind: StateType, data: bytes) -> None:
        """TPMLIB_SetState: the blob the next start() uses (only while stopped).

        libtpms checks the blob's header and keeps it until MainInit, which
        uses it instead of the store; it then writes PERMANENT to the store
        itself. Raises EngineError if libtpms refuses the blob.
        """
        kind = StateType(kind)
        with _process_lock, self._lock:
            self._require_stopped_process()
            lib = self._prepare_library()
            rc = lib.TPMLIB_SetState(_TPMLIB_STATE[kind], bytes(data), len(data))
            if rc != TPM_SUCCESS:
                raise EngineError(f"TPMLIB_SetState({kind.name}) refused the blob", rc)

    def store_volatile(self) -> None:
        """Write the running TPM's volatile state to the store (swtpm STORE_VOLATILE).

        Errors from the store propagate (this is not a callback).
        """
        with self._lock:
            if not self._running:
                raise EngineMisuseError("store_volatile() on a stopped engine")
            data = self._get_live(StateType.VOLATILE)
        self.store.store(BLOB_NAMES[StateType.VOLATILE], data)

    def _get_live(self, kind: StateType) -> bytes:
        lib = _libtpms()
        buf = _u8p()
        length = ctypes.c_uint32(0)
        rc = lib.TPMLIB_GetState(_TPMLIB_STATE[kind], ctypes.byref(buf), ctypes.byref(length))
        try:
            if rc != TPM_SUCCESS:
                raise EngineError(f"TPMLIB_GetState({kind.name}) failed", rc)
            return ctypes.string_at(buf, length.value) if buf else b""
        finally:
            if buf:
                lib.TPM_Free(ctypes.cast(buf, ctypes.c_void_p))

    # ------------------------------------------------------------ control

    def set_buffer_size(self, size: int) -> tuple[int, int, int]:
        """TPMLIB_SetBufferSize: returns (size in use, min, max); 0 only queries.

        Changing the size is only allowed while stopped (as in swtpm); libtpms
        clamps the request into [min, max].
        """
        if not 0 <= size <= 0xFFFFFFFF:
            raise ValueError(f"buffer size out of range: {size}")
        with _process_lock, self._lock:
            if size and self._running:
                raise EngineMisuseError("set_buffer_size() while running; stop() first")
            lib = _libtpms()
            if not self._running:
                self._require_stopped_process()
                rc = lib.TPMLIB_ChooseTPMVersion(_TPMLIB_TPM_VERSION_2)
                if rc != TPM_SUCCESS:
                    raise EngineError("TPMLIB_ChooseTPMVersion(2.0) failed", rc)
            lo, hi = ctypes.c_uint32(0), ctypes.c_uint32(0)
            actual = int(lib.TPMLIB_SetBufferSize(size, ctypes.byref(lo), ctypes.byref(hi)))
            if size:
                self._buffer_size = actual
                self._set_command_buffer(actual)
            return actual, lo.value, hi.value

    def established(self) -> bool:
        """The TPM_ESTABLISHED flag (TPM_IO_TpmEstablished_Get)."""
        with self._lock:
            if not self._running:
                raise EngineMisuseError("established() on a stopped engine")
            flag = ctypes.c_ubyte(0)
            rc = _libtpms().TPM_IO_TpmEstablished_Get(ctypes.byref(flag))
            if rc != TPM_SUCCESS:
                raise EngineError("TPM_IO_TpmEstablished_Get failed", rc)
            return bool(flag.value)

    def reset_established(self, locality: int) -> None:
        """Clear TPM_ESTABLISHED as ``locality`` would; libtpms requires 3 or 4.

        Raises EngineError with result TPM_BAD_LOCALITY from a lower locality.
        """
        if not 0 <= locality <= _MAX_LOCALITY:
            raise ValueError(f"locality must be 0..4, got {locality}")
        with self._lock:
            if not self._running:
                raise EngineMisuseError("reset_established() on a stopped engine")
            saved, self._locality = self._locality, locality
            try:
                rc = _libtpms().TPM_IO_TpmEstablished_Reset()
            finally:
                self._locality = saved
            if rc != TPM_SUCCESS:
                raise EngineError(f"TPM_IO_TpmEstablished_Reset at locality {locality}", rc)

    def hash_start(self, locality: int) -> None:
        """_TPM_Hash_Start at ``locality`` (TPM_IO_Hash_Start; Part 1, 34.3)."""
        self._indication("TPM_IO_Hash_Start", locality)

    def hash_data(self, data: bytes, locality: int) -> None:
        """_TPM_Hash_Data with ``data`` at ``locality`` (TPM_IO_Hash_Data)."""
        self._indication("TPM_IO_Hash_Data", locality, bytes(data), len(data))

    def hash_end(self, locality: int) -> None:
        """_TPM_Hash_End at ``locality`` (TPM_IO_Hash_End): extends the DRTM PCR."""
        self._indication("TPM_IO_Hash_End", locality)

    def _indication(self, name: str, locality: int, *args: Any) -> None:
        """Call the libtpms entry point ``name`` as if the platform signalled it
        from ``locality``; EngineError with libtpms' TPM_RESULT if it refuses."""
        if not 0 <= locality <= _MAX_LOCALITY:
            raise ValueError(f"locality must be 0..4, got {locality}")
        with self._lock:
            if not self._running:
                raise EngineMisuseError(f"{name} on a stopped engine")
            saved, self._locality = self._locality, locality
            failures = self._store_failures
            try:
                rc = getattr(_libtpms(), name)(*args)
            finally:
                self._locality = saved
            self._raise_pending_base_exception()
            if rc == TPM_SUCCESS and self._store_failures != failures:
                rc = TPM_FAIL  # a PCR change that is not durable is not a success
            if rc != TPM_SUCCESS:
                raise EngineError(f"{name} at locality {locality}", rc)

    def get_info(self, flags: int) -> str:
        """TPMLIB_GetInfo JSON (flags: 1 specification, 2 attributes, 4 features)."""
        lib = _libtpms()
        with self._lock:
            ptr = lib.TPMLIB_GetInfo(flags)
        if not ptr:
            return ""
        try:
            return ctypes.string_at(ptr).decode()
        finally:
            _libc().free(ptr)

    # ------------------------------------------------------------ callbacks

    def _make_callbacks(self) -> _Callbacks:
        return _Callbacks(
            ctypes.sizeof(_Callbacks),
            _NvramInit(lambda: TPM_SUCCESS),
            _NvramLoad(self._cb_load),
            _NvramStore(self._cb_store),
            _NvramDelete(self._cb_delete),
            _IoInit(lambda: TPM_SUCCESS),
            _IoGetLocality(self._cb_locality),
            _IoGetPP(self._cb_physical_presence),
        )

    def _record_callback_error(self, kind: str, exc: BaseException) -> None:
        self._callback_error = exc
        if kind == "store":
            self._store_failures += 1
            self._store_error = exc
        log.log(f"tpm.state_{kind}_failed", error=type(exc).__name__)

    def _raise_pending_base_exception(self) -> None:
        exc, self._callback_error = self._callback_error, None
        if exc is not None and not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt/SystemExit held back while in C

    @_guarded("load")
    def _cb_load(self, data: Any, length: Any, _tpm_number: int, name: bytes) -> int:
        blob = self.store.load(name.decode())
        if blob is None:
            return TPM_RETRY
        ptr = _libc().malloc(max(1, len(blob)))
        if not ptr:
            raise MemoryError("malloc failed for a state blob")
        ctypes.memmove(ptr, blob, len(blob))
        data[0] = ctypes.cast(ptr, _u8p)
        length[0] = len(blob)
        return TPM_SUCCESS

    @_guarded("store")
    def _cb_store(self, data: Any, length: int, _tpm_number: int, name: bytes) -> int:
        self.store.store(name.decode(), ctypes.string_at(data, length))
        return TPM_SUCCESS

    @_guarded("delete")
    def _cb_delete(self, _tpm_number: int, name: bytes, _must_exist: int) -> int:
        self.store.delete(name.decode())
        return TPM_SUCCESS

    @_guarded("locality")
    def _cb_locality(self, locality: Any, _tpm_number: int) -> int:
        locality[0] = self._locality
        return TPM_SUCCESS

    @_guarded("physical_presence")
    def _cb_physical_presence(self, pp: Any, _tpm_number: int) -> int:
        pp[0] = 0
        return TPM_SUCCESS
