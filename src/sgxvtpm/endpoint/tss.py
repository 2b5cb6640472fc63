"""TSS-facing endpoints: tcti-swtpm and tcti-mssim sockets for one VM's vTPM.

- :class:`SwtpmTssEndpoint`: swtpm's socket interface as tcti-swtpm uses it
  (``-T swtpm:path=PATH`` = data socket PATH + control socket PATH.ctrl, or
  ``-T swtpm:host=H,port=P`` = data P + control P+1). tcti-swtpm opens a new
  connection per command and per control command and only sends
  SET_LOCALITY and INIT, so the endpoint powers the TPM on when it starts,
  as ``swtpm --flags not-need-init`` does, unless it is running already (a
  new endpoint must not reset a TPM the VM is using); the client sends
  TPM2_Startup.
- :class:`MssimEndpoint`: tcti-mssim's command port P and platform port P+1.
  POWER_ON starts the TPM unless it is running (tcti-mssim sends it on
  every connect; the simulator ignores it while powered); the reset and
  power-off signals are the platform's and act as they say.

Unix sockets get the mode and owner of a
:class:`~sgxvtpm.endpoint.listeners.SocketAccess` (default 0600); TCP
listens on loopback only, where any local user can connect.

Each client connection is served by a thread of its own on a blocking
socket (:mod:`sgxvtpm.endpoint.listeners`); their TPM commands are
serialised by :class:`~sgxvtpm.endpoint.backend.VmTpm`. A client that stalls inside a
message is dropped after ``frame_timeout``, an idle one after
``idle_timeout``; a client that disconnects mid-command leaves the TPM
consistent (the command completes, its answer is dropped).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

from sgxvtpm.endpoint.backend import VmTpm, VtpmBackend
from sgxvtpm.endpoint.ctrl import BAD_CTRL_INPUT, SUPPORTED_CAPS, CtrlHandler, serve_data_commands
from sgxvtpm.endpoint.lifecycle import StopFlag
from sgxvtpm.endpoint.listeners import OWNER_ONLY, Listeners, SocketAccess
from sgxvtpm.endpoint.streams import FRAME_TIMEOUT, FrameTimeout, Stream, next_message
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.util import log
from sgxvtpm.wire import mssim
from sgxvtpm.wire.swtpm_ctrl import (
    CtrlCmd,
    CtrlProtocolError,
    CtrlRequestDecoder,
    CtrlResponse,
    PtmCap,
    encode_response,
)
from sgxvtpm.wire.vtpm import INIT_FLAG_IF_STOPPED, TpmResult, VtpmOp, VtpmRequest

IDLE_TIMEOUT = 60.0


class EndpointError(SgxvtpmError):
    """The endpoint could not start (address in use, backend refused INIT, ...).

    Choose a free socket path or port, or check the VM's instance (``sgxvtpm vm show``).
    """


class _TssBase:
    def __init__(
        self, backend: VtpmBackend, frame_timeout: float, idle_timeout: float | None
    ) -> None:
        self.tpm = VmTpm(backend)
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.stopped = StopFlag()
        self._listeners = Listeners()

    def serve_forever(self) -> None:
        """Until :meth:`close` (or ``stopped.set()``, e.g. from a signal handler)."""
        self.stopped.wait()

    def close(self) -> None:
        """Stop listening, end every connection and join their threads."""
        self.stopped.set()
        self._listeners.close()

    def _power_on(self) -> None:
        r = self.tpm.call(VtpmRequest.init(INIT_FLAG_IF_STOPPED))
        if not r.success:
            raise EndpointError(f"the vTPM refused INIT (TPM_RESULT {r.result:#x})")


class SwtpmTssEndpoint(_TssBase):
    """tcti-swtpm's data and control sockets (unix ``path``/``path.ctrl`` or TCP)."""

    def __init__(
        self,
        backend: VtpmBackend,
        *,
        path: Path | str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        frame_timeout: float = FRAME_TIMEOUT,
        idle_timeout: float | None = IDLE_TIMEOUT,
        power_on: bool = True,
        access: SocketAccess = OWNER_ONLY,
    ) -> None:
        super().__init__(backend, frame_timeout, idle_timeout)
        if (path is None) == (port is None):
            raise ValueError("give either a unix path or a TCP port")
        self.path = None if path is None else Path(path)
        self.host = host
        self.port = port
        self.power_on = power_on
        self.access = access
        # No SET_DATAFD on these sockets.
        self._ctrl = CtrlHandler(self.tpm, caps=SUPPORTED_CAPS & ~PtmCap.SET_DATAFD)

    def start(self) -> None:
        if self.power_on:
            self._power_on()
        if self.path is not None:
            self._listeners.unix(self.path, self._serve_data, access=self.access)
            self._listeners.unix(Path(f"{self.path}.ctrl"), self._serve_ctrl, access=self.access)
            log.log("endpoint.swtpm_listening", path=str(self.path))
        else:
            assert self.port is not None
            self.port = self._listeners.tcp(self.host, self.port, self._serve_data)
            self._listeners.tcp(self.host, self.port + 1, self._serve_ctrl)
            log.log("endpoint.swtpm_listening", host=self.host, port=self.port)

    def _serve_data(self, sock: socket.socket) -> None:
        serve_data_commands(
            sock, self.tpm, frame_timeout=self.frame_timeout, idle_timeout=self.idle_timeout,
            resync=False,
        )  # fmt: skip

    def _serve_ctrl(self, sock: socket.socket) -> None:
        stream = Stream(sock)
        decoder = CtrlRequestDecoder(locality_body=1)  # tcti-swtpm sends a bare u8
        while True:
            try:
                req = next_message(
                    stream.read, decoder, decoder.next_request,
                    frame_timeout=self.frame_timeout, idle_timeout=self.idle_timeout,
                )
            except (CtrlProtocolError, FrameTimeout) as exc:
                log.log("endpoint.ctrl_bad_input", reason=str(exc))
                if not stream.eof:
                    sock.sendall(BAD_CTRL_INPUT)
                return
            if req is None:
                return
            if req.code == CtrlCmd.SET_DATAFD:
                resp = CtrlResponse(req.code, result=TpmResult.BAD_ORDINAL)
            else:
                resp = self._ctrl.handle(req)
            sock.sendall(encode_response(resp))


class MssimEndpoint(_TssBase):
    """tcti-mssim's command port and platform port (``port`` and ``port + 1``)."""

    def __init__(
        self,
        backend: VtpmBackend,
        *,
        host: str = "127.0.0.1",
        port: int = 2321,
        frame_timeout: float = FRAME_TIMEOUT,
        idle_timeout: float | None = IDLE_TIMEOUT,
    ) -> None:
        super().__init__(backend, frame_timeout, idle_timeout)
        self.host = host
        self.port = port
        self.powered = False
        self._power_lock = threading.Lock()  # platform connections run in parallel

    def start(self) -> None:
        self.port = self._listeners.tcp(self.host, self.port, self._serve_command)
        self._listeners.tcp(self.host, self.port + 1, self._serve_platform)
        log.log("endpoint.mssim_listening", host=self.host, port=self.port)

    def _requests(
        self, port: mssim.Port, sock: socket.socket,
        answer: Callable[[mssim.MssimRequest], bytes],
    ) -> None:
        stream = Stream(sock)
        decoder = mssim.MssimRequestDecoder(port)
        while True:
            try:
                req = next_message(
                    stream.read, decoder, decoder.next_request,
                    frame_timeout=self.frame_timeout, idle_timeout=self.idle_timeout,
                )
            except (mssim.MssimProtocolError, FrameTimeout) as exc:
                log.log("endpoint.mssim_bad_input", port=port.value, reason=str(exc))
                return
            if req is None or req.code in mssim.END_CODES:
                return
            sock.sendall(answer(req))

    def _serve_command(self, sock: socket.socket) -> None:
        transact = self.tpm.transact

        def answer(req: mssim.MssimRequest) -> bytes:
            return mssim.encode_command_response(transact(req.command, req.locality))

        self._requests(mssim.Port.COMMAND, sock, answer)

    def _serve_platform(self, sock: socket.socket) -> None:
        self._requests(mssim.Port.PLATFORM, sock, self._signal)

    def _signal(self, req: mssim.MssimRequest) -> bytes:
        with self._power_lock:
            return mssim.encode_ack(self._signal_result(req.code))

    def _signal_result(self, code: mssim.MssimCmd) -> int:
        result = 0
        if code in (mssim.MssimCmd.SIGNAL_RESET, mssim.MssimCmd.SIGNAL_RESTART):
            result = self.tpm.call(VtpmRequest.init(0)).result
            self.powered = result == 0
        elif code is mssim.MssimCmd.SIGNAL_POWER_ON:
            # Whether this endpoint powered it or not: a TPM left running by
            # the VM's previous endpoint keeps its state.
            result = self.tpm.call(VtpmRequest.init(INIT_FLAG_IF_STOPPED)).result
            self.powered = result == 0
        elif code is mssim.MssimCmd.SIGNAL_POWER_OFF:
            result = self.tpm.call(VtpmRequest(VtpmOp.STOP)).result
            self.powered = False
        elif code is mssim.MssimCmd.SIGNAL_CANCEL_ON and self.powered:
            result = self.tpm.call(VtpmRequest(VtpmOp.CANCEL)).result
        # NV_ON/OFF, PHYS_PRES_*, KEY_CACHE_*, CANCEL_OFF: nothing to do for libtpms.
        return result
