"""The enclave's way to the host's TPM: TPM frames on its own host stream.

An enclave has one stream to hostd (the loader's socketpair; on Gramine,
stdin/stdout). :class:`HostTpmTap` sits on it, inside the enclave, between
the stream and the enclave's runtime: relay frames pass through whole, in
both directions, except TPM frames (wire/relay.py, type 6, session 0), which
it takes for itself. :meth:`HostTpmTap.transact` sends one TPM command as a
TPM frame and waits for hostd's TPM frame with the response. hostd hands the
bytes to the host's TPM and back without looking at them; what makes them
trustworthy is not the relay but the HMAC sessions of tpm/nvcounter.py.

The runtime gets the tap's inner socket as its stream. Descriptors hostd
passes with HANDOFF frames (SCM_RIGHTS) are passed on with the bytes they
came with, no later than their HANDOFF frame, as the instance loop expects.
The end of either side is passed on as the end of the other.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

from sgxvtpm.platform.base import PlatformError
from sgxvtpm.wire.relay import (
    CONTROL_SESSION,
    Frame,
    FrameType,
    RelayDecoder,
    RelayProtocolError,
    encode,
)

_READ = 64 * 1024
_MAX_FDS = 8
#: How long one TPM command may take through hostd (a real TPM's RSA key
#: generation takes seconds; ours are NV and session commands).
TRANSACT_TIMEOUT = 60.0


class HostTpmTap:
    """Splits TPM frames off an enclave's host stream; see the module doc."""

    def __init__(self, host: socket.socket, timeout: float = TRANSACT_TIMEOUT) -> None:
        self._host = host
        self._host.setblocking(True)
        self.stream, self._inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._timeout = timeout
        self._write_lock = threading.Lock()  # whole frames onto the host stream
        self._call_lock = threading.Lock()  # one TPM command at a time
        self._answer = threading.Condition()
        self._response: bytes | None = None
        self._ended = ""  # why no response can come any more
        self._threads = [
            threading.Thread(target=self._from_host, name="host-tpm-in", daemon=True),
            threading.Thread(target=self._to_host, name="host-tpm-out", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------ the TPM side

    def transact(self, command: bytes) -> bytes:
        """Send ``command`` to the host's TPM through hostd; its response bytes.

        PlatformError when hostd has no host TPM, the stream ended, or no
        answer came in time. The response is whatever the host sent: the
        caller authenticates it.
        """
        with self._call_lock:
            with self._answer:
                if self._ended:
                    raise PlatformError(f"no host TPM: {self._ended}")
                self._response = None
            self._write(encode(Frame(FrameType.TPM, CONTROL_SESSION, bytes(command))))
            with self._answer:
                if not self._answer.wait_for(
                    lambda: self._response is not None or bool(self._ended), self._timeout
                ):
                    # A late answer must not pass for the next command's: no more commands.
                    self._ended = f"the host TPM did not answer in {self._timeout:g} s"
                    raise PlatformError(self._ended)
                response, self._response = self._response, None
                if response is None:
                    raise PlatformError(f"no host TPM: {self._ended}")
        if not response:
            raise PlatformError("hostd relays no host TPM (start it with --counters tpm:...)")
        return response

    def _end(self, why: str) -> None:
        with self._answer:
            if not self._ended:
                self._ended = why
            self._answer.notify_all()

    # ------------------------------------------------------------ the two pumps

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            try:
                self._host.sendall(data)
            except OSError as exc:
                raise PlatformError(f"the host stream is gone: {exc}") from None

    def _from_host(self) -> None:
        decoder = RelayDecoder()
        fds: list[int] = []
        try:
            while True:
                data, new_fds, _, _ = socket.recv_fds(self._host, _READ, _MAX_FDS)
                fds += new_fds
                decoder.receive_data(data)
                out = bytearray()
                while (frame := decoder.next_frame()) is not None:
                    if frame.type is FrameType.TPM:
                        with self._answer:
                            self._response = frame.payload
                            self._answer.notify_all()
                    else:
                        out += encode(frame)
                if out:
                    if fds:
                        socket.send_fds(self._inner, [bytes(out)], fds)
                        for fd in fds:
                            os.close(fd)  # the runtime holds its own copy now
                        fds = []
                    else:
                        self._inner.sendall(out)
                if not data:
                    break
        except (OSError, RelayProtocolError) as exc:
            self._end(f"the host stream broke: {exc}")
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._end("the host stream ended")
        with contextlib.suppress(OSError):
            self._inner.shutdown(socket.SHUT_WR)  # the runtime sees the host's EOF

    def _to_host(self) -> None:
        decoder = RelayDecoder()
        try:
            while True:
                data = self._inner.recv(_READ)
                decoder.receive_data(data)
                out = bytearray()
                while (frame := decoder.next_frame()) is not None:
                    out += encode(frame)
                if out:
                    self._write(bytes(out))
                if not data:
                    break
        except (OSError, RelayProtocolError, PlatformError):
            pass
        self._end("the enclave closed its stream")
        with contextlib.suppress(OSError):
            self._host.shutdown(socket.SHUT_WR)  # hostd sees the enclave's EOF

    def close(self, timeout: float = 5.0) -> None:
        """End the runtime's side and let what it wrote reach hostd first."""
        with contextlib.suppress(OSError):
            self.stream.close()
        self._threads[1].join(timeout)
        with contextlib.suppress(OSError):
            self._host.shutdown(socket.SHUT_RD)  # nothing more is read for the runtime
        self._threads[0].join(timeout)
        self._inner.close()
