"""swtpm control commands answered over a :class:`~sgxvtpm.endpoint.backend.VmTpm`.

Shared by the QEMU endpoint (which adds SET_DATAFD) and the tcti-swtpm
endpoint. Results follow swtpm 0.7.1's ctrlchannel.c; what swtpm answers
locally (capabilities, locality, configuration) is answered here, the rest
goes to the vTPM as a :mod:`sgxvtpm.wire.vtpm` request.
"""

from __future__ import annotations

import socket

from sgxvtpm.endpoint.backend import VmTpm
from sgxvtpm.endpoint.streams import FrameTimeout, Stream, next_message
from sgxvtpm.tpm.constants import TPM2_RC
from sgxvtpm.tpm.wire import error_response
from sgxvtpm.util import log
from sgxvtpm.wire.swtpm_ctrl import (
    GETINFO_CHUNK,
    CommandFramer,
    CtrlCmd,
    CtrlProtocolError,
    CtrlRequest,
    CtrlResponse,
    DataCommand,
    PtmCap,
    encode_response,
)
from sgxvtpm.wire.vtpm import (
    INIT_FLAG_DELETE_VOLATILE,
    MAX_LOCALITY,
    TpmResult,
    VtpmOp,
    VtpmProtocolError,
    VtpmRequest,
)

#: The answer to a control channel's malformed input, before the endpoint closes it.
BAD_CTRL_INPUT = encode_response(CtrlResponse(CtrlCmd.INIT, result=TpmResult.BAD_PARAMETER))

#: What swtpm 0.7.1 reports for a TPM 2.0 (0xffff), all implemented here:
#: HASHING is CMD_HASH_START/DATA/END, SEND_COMMAND_HEADER the TCG prefix on
#: the data channel. Not LOCK_STORAGE (swtpm 0.8+; 0.7.1 does not know the code).
SUPPORTED_CAPS = (
    PtmCap.INIT
    | PtmCap.SHUTDOWN
    | PtmCap.GET_TPMESTABLISHED
    | PtmCap.SET_LOCALITY
    | PtmCap.HASHING
    | PtmCap.CANCEL_TPM_CMD
    | PtmCap.STORE_VOLATILE
    | PtmCap.RESET_TPMESTABLISHED
    | PtmCap.GET_STATEBLOB
    | PtmCap.SET_STATEBLOB
    | PtmCap.STOP
    | PtmCap.GET_CONFIG
    | PtmCap.SET_DATAFD
    | PtmCap.SET_BUFFERSIZE
    | PtmCap.GET_INFO
    | PtmCap.SEND_COMMAND_HEADER
)


_HASH_OPS: dict[int, VtpmOp] = {
    CtrlCmd.HASH_START: VtpmOp.HASH_START,
    CtrlCmd.HASH_DATA: VtpmOp.HASH_DATA,
    CtrlCmd.HASH_END: VtpmOp.HASH_END,
}


class CtrlHandler:
    """Turns one :class:`CtrlRequest` into one :class:`CtrlResponse`."""

    def __init__(self, tpm: VmTpm, caps: int = SUPPORTED_CAPS) -> None:
        self.tpm = tpm
        self.caps = caps

    def handle(self, req: CtrlRequest) -> CtrlResponse:
        code = req.code
        try:
            return self._dispatch(req)
        except VtpmProtocolError:
            return CtrlResponse(code, result=TpmResult.FAIL)

    def _simple(self, code: int, request: VtpmRequest) -> CtrlResponse:
        return CtrlResponse(code, result=self.tpm.call(request).result)

    def _dispatch(self, req: CtrlRequest) -> CtrlResponse:
        code = req.code
        if code == CtrlCmd.GET_CAPABILITY:
            return CtrlResponse(code, caps=int(self.caps))
        if code == CtrlCmd.INIT:
            # swtpm reads only PTM_INIT_FLAG_DELETE_VOLATILE: CMD_INIT always
            # (re)starts the TPM, as the platform's reset does.
            return self._simple(code, VtpmRequest.init(req.flags & INIT_FLAG_DELETE_VOLATILE))
        if code == CtrlCmd.SHUTDOWN:
            return self._simple(code, VtpmRequest(VtpmOp.SHUTDOWN))
        if code == CtrlCmd.STOP:
            return self._simple(code, VtpmRequest(VtpmOp.STOP))
        if code == CtrlCmd.SET_LOCALITY:
            if req.locality > MAX_LOCALITY:
                return CtrlResponse(code, result=TpmResult.BAD_LOCALITY)
            self.tpm.locality = req.locality
            return CtrlResponse(code)
        if code == CtrlCmd.GET_TPMESTABLISHED:
            r = self.tpm.call(VtpmRequest(VtpmOp.GET_ESTABLISHED))
            flag = r.established() if r.success else False
            return CtrlResponse(code, result=r.result, established=flag)
        if code == CtrlCmd.RESET_TPMESTABLISHED:
            if req.locality > MAX_LOCALITY:
                return CtrlResponse(code, result=TpmResult.BAD_LOCALITY)
            return self._simple(code, VtpmRequest.reset_established(req.locality))
        if code == CtrlCmd.CANCEL_TPM_CMD:
            return self._simple(code, VtpmRequest(VtpmOp.CANCEL))
        if code == CtrlCmd.STORE_VOLATILE:
            return self._simple(code, VtpmRequest(VtpmOp.STORE_VOLATILE))
        if code == CtrlCmd.GET_STATEBLOB:
            r = self.tpm.call(VtpmRequest.get_stateblob(req.blob_type))
            return CtrlResponse(code, result=r.result, data=r.payload[req.offset :])
        if code == CtrlCmd.SET_STATEBLOB:
            return self._simple(code, VtpmRequest.set_stateblob(req.blob_type, req.data))
        if code == CtrlCmd.GET_CONFIG:
            return CtrlResponse(code, flags=0)  # no file key, no migration key on this host
        if code == CtrlCmd.SET_BUFFERSIZE:
            r = self.tpm.call(VtpmRequest.set_buffersize(req.size))
            return CtrlResponse(code, result=r.result, sizes=r.buffer_sizes() if r.success else
                                (0, 0, 0))
        if code == CtrlCmd.GET_INFO:
            return self._get_info(req)
        if code in _HASH_OPS:
            # At the current locality, as swtpm's libtpms locality callback answers.
            return self._simple(code, VtpmRequest(_HASH_OPS[code], locality=self.tpm.locality,
                                                  data=req.data))
        # Unknown codes, LOCK_STORAGE (swtpm 0.8+) among them, as swtpm 0.7.1 answers.
        return CtrlResponse(code, result=TpmResult.BAD_ORDINAL)

    def _get_info(self, req: CtrlRequest) -> CtrlResponse:
        code = req.code
        r = self.tpm.call(VtpmRequest.get_info(req.flags))
        if not r.success:
            return CtrlResponse(code, result=r.result)
        text = r.info().encode()
        if req.offset >= len(text):  # swtpm: offset >= strlen is TPM_BAD_PARAMETER
            return CtrlResponse(code, result=TpmResult.BAD_PARAMETER)
        whole = text + b"\0"  # swtpm sends, and counts, the terminating NUL
        chunk = whole[req.offset : req.offset + GETINFO_CHUNK]
        return CtrlResponse(code, totlength=len(whole), data=chunk)


def answer_data_command(tpm: VmTpm, command: DataCommand) -> bytes:
    """The data channel's answer to ``command``, framed as it came.

    A TCG prefix sets the locality for this and the next commands, as swtpm
    does. swtpm hands a prefix locality above 4 to libtpms as it is; the
    vTPM protocol carries 0-4, so that command gets TPM_RC_LOCALITY.
    """
    if command.locality is not None:
        if command.locality > MAX_LOCALITY:
            return command.frame_response(error_response(TPM2_RC.LOCALITY))
        tpm.locality = command.locality
    return command.frame_response(tpm.transact(command.command))


def serve_data_commands(
    sock: socket.socket,
    tpm: VmTpm,
    *,
    frame_timeout: float,
    idle_timeout: float | None = None,
    resync: bool,
) -> None:
    """A data channel's per-command path until its end: one recv, the framer,
    the vTPM, one sendall.

    A malformed or stalled frame gets libtpms' answer to a bad size (or the
    framer's code). With ``resync`` (swtpm's data channel, which hands
    whatever one read() gave it to libtpms and goes on) the connection then
    carries on with a fresh framer; without it (the TSS ports) a stalled frame
    gets no answer and the connection ends.
    """
    stream = Stream(sock)
    framer = CommandFramer()
    while True:
        try:
            command = next_message(
                stream.read, framer, framer.next_data_command,
                frame_timeout=frame_timeout, idle_timeout=idle_timeout,
            )  # fmt: skip
        except (CtrlProtocolError, FrameTimeout) as exc:
            quiet = isinstance(exc, FrameTimeout) and not resync
            event = "endpoint.data_timeout" if quiet else "endpoint.data_bad_frame"
            log.log(event, reason=str(exc))
            if stream.eof or quiet:
                return
            rc = exc.rc if isinstance(exc, CtrlProtocolError) else TPM2_RC.COMMAND_SIZE
            sock.sendall(error_response(rc))
            if not resync:
                return
            framer = CommandFramer()
            continue
        if command is None:
            return
        sock.sendall(answer_data_command(tpm, command))
