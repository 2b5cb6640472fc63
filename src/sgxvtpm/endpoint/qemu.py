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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from sgxvtpm.endpoint.backend import VmTpm, VtpmBackend
from sgxvtpm.endpoint.ctrl import CtrlHandler
from sgxvtpm.endpoint.streams import FRAME_TIMEOUT, READ_CHUNK, FrameTimeout, next_message
from sgxvtpm.tpm.constants import TPM2_RC
from sgxvtpm.tpm.wire import error_response
from sgxvtpm.util import log
from sgxvtpm.wire.swtpm_ctrl import (
    CommandFramer,
    CtrlCmd,
    CtrlProtocolError,
    CtrlRequest,
    CtrlRequestDecoder,
    CtrlResponse,
    encode_response,
)
from sgxvtpm.wire.vtpm import TpmResult

_MAX_FDS = 4


async def _wait_readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


class _FdSocket:
    """A non-blocking unix stream socket read with recvmsg, keeping passed fds."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fds: list[int] = []

    async def read(self) -> bytes:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, READ_CHUNK, _MAX_FDS)
            except BlockingIOError:
                await _wait_readable(self.sock)
                continue
            self.fds.extend(fds)
            return data

    async def write(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self.sock.close()


class QemuEndpoint:
    """Serves one VM's vTPM to QEMU on a swtpm-compatible control socket."""

    def __init__(
        self,
        backend: VtpmBackend,
        ctrl_path: Path | str,
        *,
        frame_timeout: float = FRAME_TIMEOUT,
        exit_on_shutdown: bool = False,
    ) -> None:
        self.tpm = VmTpm(backend)
        self.ctrl_path = Path(ctrl_path)
        self.frame_timeout = frame_timeout
        self.exit_on_shutdown = exit_on_shutdown
        self._handler = CtrlHandler(self.tpm)
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._data_task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.ctrl_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.ctrl_path))
        os.chmod(self.ctrl_path, 0o600)
        listener.listen(4)
        listener.setblocking(False)
        self._listener = listener
        self._spawn(self._accept_loop())
        log.log("endpoint.qemu_listening", ctrl=str(self.ctrl_path))

    async def serve_forever(self) -> None:
        if self._listener is None:
            await self.start()
        await self._done.wait()

    async def close(self) -> None:
        self._done.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.ctrl_path.unlink()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            self._spawn(self._serve_ctrl(_FdSocket(conn)))

    # ------------------------------------------------------------ control channel

    async def _serve_ctrl(self, conn: _FdSocket) -> None:
        decoder = CtrlRequestDecoder()
        owned_data: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    req = await next_message(
                        conn.read, decoder, decoder.next_request, frame_timeout=self.frame_timeout
                    )
                except (CtrlProtocolError, FrameTimeout) as exc:
                    log.log("endpoint.ctrl_bad_input", reason=str(exc))
                    with contextlib.suppress(OSError):
                        await conn.write(encode_response(
                            CtrlResponse(CtrlCmd.INIT, result=TpmResult.BAD_PARAMETER)))
                    return
                if req is None:
                    return
                if req.code == CtrlCmd.SET_DATAFD:
                    resp, task = self._set_datafd(req, conn)
                    owned_data = task or owned_data
                else:
                    resp = await self._handler.handle(req)
                await conn.write(encode_response(resp))
                if req.code == CtrlCmd.SHUTDOWN and resp.result == 0:
                    self._stop_data()
                    if self.exit_on_shutdown:
                        self._done.set()
                    return
        except OSError:
            return
        finally:
            if owned_data is not None and owned_data is self._data_task:
                self._stop_data()
            conn.close()

    def _set_datafd(
        self, req: CtrlRequest, conn: _FdSocket
    ) -> tuple[CtrlResponse, asyncio.Task[None] | None]:
        fds, conn.fds = conn.fds, []
        if self._data_task is not None and not self._data_task.done():
            for fd in fds:
                os.close(fd)
            return CtrlResponse(req.code, result=TpmResult.IOERROR), None  # swtpm: err_io
        if not fds:
            return CtrlResponse(req.code, result=TpmResult.BAD_PARAMETER), None
        for extra in fds[1:]:
            os.close(extra)
        try:
            data_sock = socket.socket(fileno=fds[0])
        except OSError:
            os.close(fds[0])
            return CtrlResponse(req.code, result=TpmResult.BAD_PARAMETER), None
        if data_sock.type != socket.SOCK_STREAM:
            data_sock.close()
            return CtrlResponse(req.code, result=TpmResult.BAD_PARAMETER), None
        self._data_task = self._spawn(self._serve_data(data_sock))
        return CtrlResponse(req.code), self._data_task

    def _stop_data(self) -> None:
        if self._data_task is not None:
            self._data_task.cancel()
            self._data_task = None

    # ------------------------------------------------------------ data channel

    async def _serve_data(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)

        async def read() -> bytes:
            return await reader.read(READ_CHUNK)

        framer = CommandFramer()
        try:
            while True:
                try:
                    command = await next_message(
                        read, framer, framer.next_command, frame_timeout=self.frame_timeout
                    )
                except (CtrlProtocolError, FrameTimeout) as exc:
                    # swtpm hands whatever one read() gave it to libtpms, which
                    # answers TPM_RC_COMMAND_SIZE; answer the same and go on.
                    log.log("endpoint.data_bad_frame", reason=str(exc))
                    if reader.at_eof():
                        return
                    rc = exc.rc if isinstance(exc, CtrlProtocolError) else TPM2_RC.COMMAND_SIZE
                    writer.write(error_response(rc))
                    await writer.drain()
                    framer = CommandFramer()
                    continue
                if command is None:
                    return
                writer.write(await self.tpm.transact(command))
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
