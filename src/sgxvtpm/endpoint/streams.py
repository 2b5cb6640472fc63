"""Reading framed messages from a blocking socket with bounded waits (shared by the endpoints).

Each connection is served by one thread on a blocking socket. The waits are
the kernel's receive timeout (SO_RCVTIMEO, socket(7)) rather than
``socket.settimeout``: CPython implements a socket timeout with a poll(2)
before every recv(2), while SO_RCVTIMEO costs nothing per read and is only
changed when the wait changes (idle vs inside a message). A recv(2) that
times out fails with EAGAIN.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Protocol, TypeVar

from sgxvtpm.errors import SgxvtpmError

T = TypeVar("T")

#: A client must finish a message it started within this many seconds.
FRAME_TIMEOUT = 5.0
READ_CHUNK = 65536

_TIMEVAL = struct.Struct("@ll")  # struct timeval {time_t tv_sec; suseconds_t tv_usec;}


class Decoder(Protocol):
    def receive_data(self, data: bytes) -> None: ...

    @property
    def pending(self) -> int: ...


class FrameTimeout(SgxvtpmError):
    """The peer started a message and did not finish it in time.

    The connection is closed; the client must reconnect and send whole messages.
    """


def timeval(seconds: float | None) -> bytes:
    """SO_RCVTIMEO's value for ``seconds``; None (wait forever) is the kernel's 0.

    A positive wait never rounds down to 0, which would mean forever.
    """
    if seconds is None:
        return _TIMEVAL.pack(0, 0)
    if seconds <= 0:
        raise ValueError(f"a timeout must be positive or None, got {seconds}")
    micros = max(1, round(seconds * 1_000_000))
    return _TIMEVAL.pack(*divmod(micros, 1_000_000))


class Stream:
    """One connected stream socket, read with kernel receive timeouts.

    :meth:`read` returns ``b""`` at the end of the stream or when the
    connection broke (then :attr:`eof` is True), raises TimeoutError when
    the wait expired.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.eof = False
        self._timeout: float | None = None  # a new socket waits forever

    def read(self, timeout: float | None) -> bytes:
        if timeout != self._timeout:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(timeout))
            self._timeout = timeout
        try:
            data = self._recv()
        except BlockingIOError:  # EAGAIN from a blocking socket: SO_RCVTIMEO expired
            raise TimeoutError from None
        except OSError:  # reset by the peer, shut down by close(): the stream ended
            data = b""
        if not data:
            self.eof = True
        return data

    def _recv(self) -> bytes:
        return self.sock.recv(READ_CHUNK)


def next_message(
    read: Callable[[float | None], bytes],
    decoder: Decoder,
    get: Callable[[], T | None],
    *,
    frame_timeout: float = FRAME_TIMEOUT,
    idle_timeout: float | None = None,
) -> T | None:
    """The next message, or None at a clean end of stream (or idle timeout).

    ``read(timeout)`` returns bytes (``b""`` at the end) or raises
    TimeoutError; ``get`` raises the codec's protocol error for bad or
    truncated input. Raises :class:`FrameTimeout` if a started message
    stalls for ``frame_timeout`` (per read, as a byte-a-second client is
    not stalled).
    """
    while True:
        message = get()
        if message is not None:
            return message
        started = decoder.pending > 0
        try:
            data = read(frame_timeout if started else idle_timeout)
        except TimeoutError:
            if started:
                raise FrameTimeout(f"message incomplete after {frame_timeout} s") from None
            return None
        decoder.receive_data(data)
        if not data:
            return get()  # raises if the stream ended inside a message
