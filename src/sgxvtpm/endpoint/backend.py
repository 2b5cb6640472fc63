"""What a VM endpoint forwards to: a vTPM that answers :mod:`sgxvtpm.wire.vtpm` requests.

- :class:`sgxvtpm.endpoint.k2.K2Client`: the instance enclave over K2 (the
  real thing);
- :class:`LocalBackend`: a :class:`~sgxvtpm.enclaves.vtpm_core.VtpmCore` in
  this process. NOT protected by any enclave: for tests, and as a
  comparison point.

:class:`VmTpm` is what the endpoints share per VM: it serialises requests
(a TPM runs one command at a time; the endpoints serve each connection in
a thread of its own), keeps the locality that tcti-swtpm and QEMU set on
the control channel, and turns backend failures into the TPM errors a
client can handle instead of a hang.
"""

from __future__ import annotations

import abc
import threading
from typing import Protocol

from sgxvtpm.enclaves.vtpm_core import VtpmCore
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.tpm.constants import TPM2_RC
from sgxvtpm.tpm.wire import error_response
from sgxvtpm.util import log
from sgxvtpm.wire.vtpm import (
    INIT_FLAG_IF_STOPPED,
    TpmResult,
    VtpmRequest,
    VtpmResponse,
    decode_response,
    encode_request,
    encode_tpm_command,
    tpm_response_of,
)

#: The data-channel answer when the backend cannot be reached.
BACKEND_FAILURE_RESPONSE = error_response(TPM2_RC.FAILURE)
#: How long :meth:`VmTpm.close` waits for a command in progress.
CLOSE_TIMEOUT = 2.0


class VtpmBackend(Protocol):
    def call(self, request: VtpmRequest) -> VtpmResponse: ...

    def transact(self, command: bytes, locality: int) -> bytes:
        """A TPM command's response; raises if the vTPM answered a TPM_RESULT error."""
        ...

    def close(self) -> None: ...


class VtpmRefused(SgxvtpmError):
    """The vTPM answered a TPM command with a TPM_RESULT error (not powered on, ...).

    Power the TPM on (INIT) before sending commands; the result code says the rest.
    """


class MessageBackend(abc.ABC):
    """The vTPM operations over any ``request(message) -> message`` (sgxvtpm.wire.vtpm)."""

    #: Raised when the vTPM answers with a TPM_RESULT error.
    Refused: type[Exception] = VtpmRefused

    @abc.abstractmethod
    def request(self, payload: bytes) -> bytes: ...

    def call(self, request: VtpmRequest) -> VtpmResponse:
        return decode_response(self.request(encode_request(request)))

    def power_on(self, flags: int = 0) -> None:
        """INIT (swtpm's CMD_INIT): start the TPM; the client then sends TPM2_Startup.

        On a running TPM this is a reset (its PCRs start over): what a VM's
        platform does at reboot, never what a client does to get started.
        """
        response = self.call(VtpmRequest.init(flags))
        if not response.success:
            raise self.Refused(f"the vTPM refused INIT (result {response.result:#x})")

    def power_on_if_stopped(self) -> None:
        """Start the TPM if it is not running; a running TPM keeps its state and PCRs."""
        self.power_on(INIT_FLAG_IF_STOPPED)

    def transact(self, command: bytes, locality: int = 0) -> bytes:
        """One raw TPM command, one raw TPM response (TPM errors are responses).

        The codec's TPM_COMMAND fast path: no request or response objects.
        """
        message = self.request(encode_tpm_command(command, locality))
        response = tpm_response_of(message)
        if response is None:
            result = decode_response(message).result  # VtpmProtocolError if malformed
            raise self.Refused(f"the vTPM refused the command (result {result:#x})")
        return response


class LocalBackend(MessageBackend):
    """A vTPM in this process (NOT protected by an enclave; tests and comparisons).

    Requests take the same encoded path as in the instance enclave.
    """

    def __init__(self, core: VtpmCore) -> None:
        self.core = core
        self._lock = threading.Lock()  # the core is not thread-safe

    def request(self, payload: bytes) -> bytes:
        with self._lock:
            return self.core.handle_message(payload)

    def close(self) -> None:
        with self._lock:
            self.core.close()  # orderly TPM2_Shutdown + stop; the state stays in its store


class VmTpm:
    """One VM's vTPM as the endpoints see it (thread-safe)."""

    def __init__(self, backend: VtpmBackend) -> None:
        self.backend = backend
        self.locality = 0
        self._lock = threading.Lock()

    def call(self, request: VtpmRequest) -> VtpmResponse:
        """Forward ``request``; a backend failure becomes TPM_FAIL (logged).

        A client that disconnects meanwhile does not interrupt the command:
        it completes and its answer is dropped, so the TPM stays consistent.
        """
        with self._lock:
            try:
                return self.backend.call(request)
            except Exception as exc:  # K2 down, instance gone, bad answer...
                log.log("endpoint.backend_failed", op=request.op.name, error=type(exc).__name__,
                        reason=str(exc))
                return VtpmResponse.error(TpmResult.FAIL)

    def transact(self, command: bytes, locality: int | None = None) -> bytes:
        """One TPM command at ``locality`` (default: the current one) -> TPM response.

        The data channels' per-command path: one lock, the backend's
        TPM_COMMAND fast path. A failure or an empty answer becomes TPM_RC_FAILURE.
        """
        loc = self.locality if locality is None else locality
        with self._lock:
            try:
                response = self.backend.transact(command, loc)
            except Exception as exc:  # K2 down, instance gone, refused, bad answer...
                log.log("endpoint.backend_failed", op="TPM_COMMAND", error=type(exc).__name__,
                        reason=str(exc))
                return BACKEND_FAILURE_RESPONSE
        return response or BACKEND_FAILURE_RESPONSE

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close the backend once the command in progress (if any) is done.

        If a command is still running after ``timeout`` (the process is
        exiting), the backend is left to the end of the process.
        """
        if not self._lock.acquire(timeout=timeout):
            log.log("endpoint.close_busy", timeout=timeout)
            return
        try:
            self.backend.close()
        finally:
            self._lock.release()
