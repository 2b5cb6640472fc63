"""The QEMU-facing endpoint: swtpm's control channel on a unix socket.

QEMU is started with::

    -chardev socket,id=chrtpm,path=CTRL -tpmdev emulator,id=tpm0,chardev=chrtpm
    -device tpm-tis,tpmdev=tpm0

It connects to CTRL, creates a socketpair and passes one end with
CMD_SET_DATAFD (SCM_RIGHTS); TPM commands then travel raw on that data
channel. QEMU 7.2's sequence (backends/tpm/tpm_emulator.c): SET_DATAFD, a
TPM2_ReadClock probe on the data channel before INIT (the tag of the error
answer says TPM 2.0), GET_CAPABILITY, then at every machine reset STOP,
SET_BUFFERSIZE, INIT; SET_LOCALITY before commands whose locality changed;
SHUTDOWN when QEMU ends.

Unlike swtpm, the endpoint does not exit on SHUTDOWN by default: the vTPM
lives in its instance enclave, and the next QEMU of this VM may attach
(``exit_on_shutdown=True`` gives swtpm's behaviour).

Each control connection and the data channel are served by threads of
their own on blocking sockets (:mod:`sgxvtpm.endpoint.listeners`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

from sgxvtpm.endpoint.backend import VmTpm, VtpmBackend
from sgxvtpm.endpoint.ctrl import BAD_CTRL_INPUT, CtrlHandler, serve_data_commands
from sgxvtpm.endpoint.lifecycle import StopFlag
from sgxvtpm.endpoint.listeners import OWNER_ONLY, Listeners, SocketAccess
from sgxvtpm.endpoint.streams import (
    FRAME_TIMEOUT,
    READ_CHUNK,
    FrameTimeout,
    Stream,
    next_message,
    timeval,
)
from sgxvtpm.util import log
from sgxvtpm.wire.swtpm_ctrl import (
    LOCALITY_AS_READ,
    CtrlCmd,
    CtrlProtocolError,
    CtrlRequest,
    CtrlRequestDecoder,
    CtrlResponse,
    encode_response,
)
from sgxvtpm.wire.vtpm import TpmResult

_MAX_FDS = 4
#: How long SET_DATAFD waits for the previous data channel's thread to end before it
#: refuses (TPM_IOERROR, as swtpm). A QEMU that exits closes its end, but the thread
#: serving it first answers the command in flight (an RSA CreatePrimary takes a
#: fraction of a second); a QEMU restarted in that moment must still attach.
DATA_HANDOVER_WAIT = 3.0


class _FdStream(Stream):
    """A unix stream socket read with recvmsg, keeping the descriptors passed (SCM_RIGHTS)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.fds: list[int] = []

    def _recv(self) -> bytes:
        data, fds, _flags, _addr = socket.recv_fds(self.sock, READ_CHUNK, _MAX_FDS)
        self.fds.extend(fds)
        return data

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def _data_socket(fds: list[int]) -> socket.socket | None:
    """The stream socket SET_DATAFD passed (the first descriptor; the others are closed)."""
    if not fds:
        return None
    for extra in fds[1:]:
        os.close(extra)
    try:
        sock = socket.socket(fileno=fds[0])
    except OSError:
        os.close(fds[0])
        return None
    try:
        if sock.type != socket.SOCK_STREAM:
            raise OSError("SET_DATAFD: not a stream socket")
        # It comes with QEMU's settings: make it blocking with no kernel
        # timeouts, as Stream assumes of a new socket.
        sock.setblocking(True)
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            sock.setsockopt(socket.SOL_SOCKET, option, timeval(None))
    except OSError:
        sock.close()
        return None
    return sock


class QemuEndpoint:
    """Serves one VM's vTPM to QEMU on a swtpm-compatible control socket."""

    def __init__(
        self,
        backend: VtpmBackend,
        ctrl_path: Path | str,
        *,
        frame_timeout: float = FRAME_TIMEOUT,
        exit_on_shutdown: bool = False,
        access: SocketAccess = OWNER_ONLY,
        listener: socket.socket | None = None,
        terminate: bool = False,
    ) -> None:
        """``listener``: serve this socket, already bound to ``ctrl_path`` and listening,
        instead of binding one (the libvirt executable binds before its imports).
        ``terminate``: stop when the data channel's peer (QEMU) closes it, as swtpm
        0.7.1's ``--terminate`` does; a control connection ending (swtpm_ioctl's, or
        QEMU's while its data channel lives) does not stop it."""
        self.tpm = VmTpm(backend)
        self.terminate = terminate
        self._listener = listener
        self.ctrl_path = Path(ctrl_path)
        self.access = access
        self.frame_timeout = frame_timeout
        self.exit_on_shutdown = exit_on_shutdown
        self.stopped = StopFlag()
        self._handler = CtrlHandler(self.tpm)
        self._listeners = Listeners()
        self._started = False
        # The data channel QEMU passed (SET_DATAFD), served by its own thread.
        self._data: tuple[socket.socket, threading.Thread | None] | None = None
        self._data_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._listener is not None:
            self._listeners.adopt(self._listener, self._serve_ctrl, self.ctrl_path)
        else:
            self._listeners.unix(self.ctrl_path, self._serve_ctrl, backlog=4, access=self.access)
        self._started = True
        log.log("endpoint.qemu_listening", ctrl=str(self.ctrl_path))

    def serve_forever(self) -> None:
        """Until :meth:`close`, ``stopped.set()`` or (exit_on_shutdown) QEMU's SHUTDOWN."""
        if not self._started:
            self.start()
        self.stopped.wait()

    def close(self) -> None:
        """Stop listening, end the control and data connections, join their threads."""
        self.stopped.set()
        self._listeners.close()

    # ------------------------------------------------------------ control channel

    def _serve_ctrl(self, sock: socket.socket) -> None:
        conn = _FdStream(sock)
        try:
            self._ctrl_loop(conn)
        finally:
            conn.close_fds()

    def _ctrl_loop(self, conn: _FdStream) -> None:
        """Serve control requests until the client closes or sends SHUTDOWN.

        The data channel a connection set (SET_DATAFD) outlives it, as in
        swtpm 0.7.1: it ends when its peer closes it, or at SHUTDOWN.
        """
        # QEMU pads SET_LOCALITY/RESET_TPMESTABLISHED to 4 bytes, swtpm_ioctl does not.
        decoder = CtrlRequestDecoder(locality_body=LOCALITY_AS_READ)
        try:
            while True:
                try:
                    req = next_message(
                        conn.read, decoder, decoder.next_request, frame_timeout=self.frame_timeout
                    )
                except (CtrlProtocolError, FrameTimeout) as exc:
                    log.log("endpoint.ctrl_bad_input", reason=str(exc))
                    with contextlib.suppress(OSError):
                        conn.sock.sendall(BAD_CTRL_INPUT)
                    return
                if req is None:
                    return
                if req.code == CtrlCmd.SET_DATAFD:
                    resp = self._set_datafd(req, conn)
                else:
                    resp = self._handler.handle(req)
                conn.sock.sendall(encode_response(resp))
                # With exit_on_shutdown, as swtpm, the process ends on SHUTDOWN even if
                # the VM's instance refused it (a VM migrated away: libvirt's stop).
                if req.code == CtrlCmd.SHUTDOWN and (resp.result == 0 or self.exit_on_shutdown):
                    self._stop_data()
                    if self.exit_on_shutdown:
                        self.stopped.set()
                    return
        except OSError:
            return

    def _set_datafd(self, req: CtrlRequest, conn: _FdStream) -> CtrlResponse:
        fds, conn.fds = conn.fds, []
        with self._data_lock:
            previous = None if self._data is None else self._data[1]
        if previous is not None:
            previous.join(DATA_HANDOVER_WAIT)
        with self._data_lock:
            thread = None if self._data is None else self._data[1]
            if thread is not None and thread.is_alive():
                for fd in fds:
                    os.close(fd)
                return CtrlResponse(req.code, result=TpmResult.IOERROR)  # swtpm: err_io
            data_sock = _data_socket(fds)
            if data_sock is None:
                return CtrlResponse(req.code, result=TpmResult.BAD_PARAMETER)
            thread = self._listeners.serve(data_sock, self._serve_data)
            self._data = (data_sock, thread)
            return CtrlResponse(req.code)

    def _stop_data(self) -> None:
        """End the data channel, if there is one."""
        with self._data_lock:
            if self._data is None:
                return
            sock, self._data = self._data[0], None
        self._listeners.shutdown(sock)

    # ------------------------------------------------------------ data channel

    def _serve_data(self, sock: socket.socket) -> None:
        try:
            self._data_loop(sock)
        finally:
            if self.terminate:
                self.stopped.set()

    def _data_loop(self, sock: socket.socket) -> None:
        serve_data_commands(sock, self.tpm, frame_timeout=self.frame_timeout, resync=True)
