"""TSS-facing endpoints: tcti-swtpm and tcti-mssim sockets for one VM's vTPM.

- :class:`SwtpmTssEndpoint`: swtpm's socket interface as tcti-swtpm uses it
  (``-T swtpm:path=PATH`` = data socket PATH + control socket PATH.ctrl, or
  ``-T swtpm:host=H,port=P`` = data P + control P+1). tcti-swtpm opens a new
  connection per command and per control command and only sends
  SET_LOCALITY and INIT, so the endpoint powers the TPM on (INIT) when it
  starts, as ``swtpm --flags not-need-init`` does; the client sends
  TPM2_Startup.
- :class:`MssimEndpoint`: tcti-mssim's command port P and platform port P+1.
  POWER_ON starts the TPM if this endpoint has not (tcti-mssim sends it on
  every connect; the simulator ignores it while powered).

Clients are served concurrently; their TPM commands are serialised by
:class:`~sgxvtpm.endpoint.backend.VmTpm`. A client that stalls inside a
message is dropped after ``frame_timeout``, an idle one after
``idle_timeout``; a client that disconnects mid-command leaves the TPM
consistent (the command completes, its answer is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from sgxvtpm.endpoint.backend import VmTpm, VtpmBackend
from sgxvtpm.endpoint.ctrl import SUPPORTED_CAPS, CtrlHandler
from sgxvtpm.endpoint.streams import FRAME_TIMEOUT, READ_CHUNK, FrameTimeout, next_message
from sgxvtpm.tpm.wire import error_response
from sgxvtpm.util import log
from sgxvtpm.wire import mssim
from sgxvtpm.wire.swtpm_ctrl import (
    CommandFramer,
    CtrlCmd,
    CtrlProtocolError,
    CtrlRequestDecoder,
    CtrlResponse,
    PtmCap,
    encode_response,
)
from sgxvtpm.wire.vtpm import TpmResult, VtpmOp, VtpmRequest

IDLE_TIMEOUT = 60.0
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class EndpointError(Exception):
    """The endpoint could not start (address in use, backend refused INIT, ...)."""


class _Servers:
    """Listening sockets and their connection tasks."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.paths: list[Path] = []

    async def unix(self, path: Path, handler: Handler) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.servers.append(await asyncio.start_unix_server(handler, str(path)))
        os.chmod(path, 0o600)
        self.paths.append(path)

    async def tcp(self, host: str, port: int, handler: Handler) -> int:
        server = await asyncio.start_server(handler, host, port)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.servers.clear()


def _reader(reader: asyncio.StreamReader) -> Callable[[], Awaitable[bytes]]:
    async def read() -> bytes:
        return await reader.read(READ_CHUNK)

    return read


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


class _TssBase:
    def __init__(
        self, backend: VtpmBackend, frame_timeout: float, idle_timeout: float | None
    ) -> None:
        self.tpm = VmTpm(backend)
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self._servers = _Servers()

    async def close(self) -> None:
        await self._servers.close()

    async def serve_forever(self) -> None:
        await asyncio.gather(*(s.serve_forever() for s in self._servers.servers))

    async def _power_on(self) -> None:
        r = await self.tpm.call(VtpmRequest.init(0))
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
    ) -> None:
        super().__init__(backend, frame_timeout, idle_timeout)
        if (path is None) == (port is None):
            raise ValueError("give either a unix path or a TCP port")
        self.path = None if path is None else Path(path)
        self.host = host
        self.port = port
        self.power_on = power_on
        # No SET_DATAFD on these sockets.
        self._ctrl = CtrlHandler(self.tpm, caps=SUPPORTED_CAPS & ~PtmCap.SET_DATAFD)

    async def start(self) -> None:
        if self.power_on:
            await self._power_on()
        if self.path is not None:
            await self._servers.unix(self.path, self._serve_data)
            await self._servers.unix(Path(f"{self.path}.ctrl"), self._serve_ctrl)
            log.log("endpoint.swtpm_listening", path=str(self.path))
        else:
            assert self.port is not None
            self.port = await self._servers.tcp(self.host, self.port, self._serve_data)
            await self._servers.tcp(self.host, self.port + 1, self._serve_ctrl)
            log.log("endpoint.swtpm_listening", host=self.host, port=self.port)

    async def _serve_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = CommandFramer()
        try:
            while True:
                try:
                    command = await next_message(
                        _reader(reader), framer, framer.next_command,
                        frame_timeout=self.frame_timeout, idle_timeout=self.idle_timeout,
                    )
                except CtrlProtocolError as exc:
                    log.log("endpoint.data_bad_frame", reason=str(exc))
                    if not reader.at_eof():
                        writer.write(error_response(exc.rc))
                    return
                except FrameTimeout as exc:
                    log.log("endpoint.data_timeout", reason=str(exc))
                    return
                if command is None:
                    return
                writer.write(await self.tpm.transact(command))
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            await _close(writer)

    async def _serve_ctrl(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = CtrlRequestDecoder(locality_body=1)  # tcti-swtpm sends a bare u8
        try:
            while True:
                try:
                    req = await next_message(
                        _reader(reader), decoder, decoder.next_request,
                        frame_timeout=self.frame_timeout, idle_timeout=self.idle_timeout,
                    )
                except (CtrlProtocolError, FrameTimeout) as exc:
                    log.log("endpoint.ctrl_bad_input", reason=str(exc))
                    if not reader.at_eof():
                        writer.write(encode_response(
                            CtrlResponse(CtrlCmd.INIT, result=TpmResult.BAD_PARAMETER)))
                    return
                if req is None:
                    return
                if req.code == CtrlCmd.SET_DATAFD:
                    resp = CtrlResponse(req.code, result=TpmResult.BAD_ORDINAL)
                else:
                    resp = await self._ctrl.handle(req)
                writer.write(encode_response(resp))
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            await _close(writer)


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

    async def start(self) -> None:
        self.port = await self._servers.tcp(self.host, self.port, self._serve_command)
        await self._servers.tcp(self.host, self.port + 1, self._serve_platform)
        log.log("endpoint.mssim_listening", host=self.host, port=self.port)

    async def _requests(
        self, port: mssim.Port, reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter, answer: Callable[[mssim.MssimRequest], Awaitable[bytes]],
    ) -> None:
        decoder = mssim.MssimRequestDecoder(port)
        try:
            while True:
                try:
                    req = await next_message(
                        _reader(reader), decoder, decoder.next_request,
                        frame_timeout=self.frame_timeout, idle_timeout=self.idle_timeout,
                    )
                except (mssim.MssimProtocolError, FrameTimeout) as exc:
                    log.log("endpoint.mssim_bad_input", port=port.value, reason=str(exc))
                    return
                if req is None or req.code in mssim.END_CODES:
                    return
                writer.write(await answer(req))
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            await _close(writer)

    async def _serve_command(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        async def answer(req: mssim.MssimRequest) -> bytes:
            response = await self.tpm.transact(req.command, req.locality)
            return mssim.encode_command_response(response)

        await self._requests(mssim.Port.COMMAND, reader, writer, answer)

    async def _serve_platform(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._requests(mssim.Port.PLATFORM, reader, writer, self._signal)

    async def _signal(self, req: mssim.MssimRequest) -> bytes:
        code = req.code
        result = 0
        reset = code in (mssim.MssimCmd.SIGNAL_RESET, mssim.MssimCmd.SIGNAL_RESTART)
        if reset or (code is mssim.MssimCmd.SIGNAL_POWER_ON and not self.powered):
            result = (await self.tpm.call(VtpmRequest.init(0))).result
            self.powered = result == 0
        elif code is mssim.MssimCmd.SIGNAL_POWER_OFF:
            result = (await self.tpm.call(VtpmRequest(VtpmOp.STOP))).result
            self.powered = False
        elif code is mssim.MssimCmd.SIGNAL_CANCEL_ON and self.powered:
            result = (await self.tpm.call(VtpmRequest(VtpmOp.CANCEL))).result
        # NV_ON/OFF, PHYS_PRES_*, KEY_CACHE_*, CANCEL_OFF: nothing to do for libtpms.
        return mssim.encode_ack(result)
