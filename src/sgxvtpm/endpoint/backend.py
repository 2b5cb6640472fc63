"""What a VM endpoint forwards to: a vTPM that answers :mod:`sgxvtpm.wire.vtpm` requests.

- :class:`sgxvtpm.endpoint.k2.K2Backend`: the instance enclave over K2 (the
  real thing);
- :class:`LocalBackend`: a :class:`~sgxvtpm.enclaves.vtpm_core.VtpmCore` in
  this process. NOT protected by any enclave: for tests, and as a
  comparison point.

:class:`VmTpm` is what the endpoints share per VM: it serialises requests
(a TPM runs one command at a time), keeps the locality that tcti-swtpm and
QEMU set on the control channel, and turns backend failures into the TPM
errors a client can handle instead of a hang.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Protocol

from sgxvtpm.enclaves.vtpm_core import VtpmCore
from sgxvtpm.tpm.constants import TPM2_RC
from sgxvtpm.tpm.wire import error_response
from sgxvtpm.util import log
from sgxvtpm.wire.vtpm import TpmResult, VtpmRequest, VtpmResponse

#: The data-channel answer when the backend cannot be reached.
BACKEND_FAILURE_RESPONSE = error_response(TPM2_RC.FAILURE)


class VtpmBackend(Protocol):
    async def call(self, request: VtpmRequest) -> VtpmResponse: ...


class LocalBackend:
    """A vTPM in this process (NOT protected by an enclave; tests and comparisons).

    libtpms work runs in a worker thread so the endpoint keeps serving its
    sockets (timeouts, other clients) during a slow command.
    """

    def __init__(self, core: VtpmCore) -> None:
        self.core = core
        self._lock = threading.Lock()  # the core is not thread-safe

    def _handle(self, request: VtpmRequest) -> VtpmResponse:
        with self._lock:
            return self.core.handle(request)

    async def call(self, request: VtpmRequest) -> VtpmResponse:
        # shield: a caller cancelled mid-command must not abandon the engine
        # half-way; the command completes and its answer is dropped.
        return await asyncio.shield(asyncio.to_thread(self._handle, request))


class VmTpm:
    """One VM's vTPM as the endpoints see it."""

    def __init__(self, backend: VtpmBackend) -> None:
        self.backend = backend
        self.locality = 0
        self._lock = asyncio.Lock()

    async def call(self, request: VtpmRequest) -> VtpmResponse:
        """Forward ``request``; a backend failure becomes TPM_FAIL (logged)."""
        async with self._lock:
            try:
                return await self.backend.call(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # K2 down, instance gone, bad answer...
                log.log("endpoint.backend_failed", op=request.op.name, error=type(exc).__name__,
                        reason=str(exc))
                return VtpmResponse.error(TpmResult.FAIL)

    async def transact(self, command: bytes, locality: int | None = None) -> bytes:
        """One TPM command at ``locality`` (default: the current one) -> TPM response."""
        loc = self.locality if locality is None else locality
        response = await self.call(VtpmRequest.tpm_command(command, loc))
        if not response.success or not response.payload:
            return BACKEND_FAILURE_RESPONSE
        return response.payload
