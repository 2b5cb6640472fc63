"""The byte buffer under the sans-IO stream decoders (swtpm ctrl, mssim).

Bytes in with :meth:`receive_data` (``b""`` = the peer closed its side);
decoders take whole messages with :meth:`_need` and :meth:`_take`. A
subclass names its protocol's two error types; :meth:`_fail` builds the
protocol error and leaves the decoder broken: every later call raises again.
"""

from __future__ import annotations

import abc
import struct
from typing import ClassVar, Generic, TypeVar

_U32 = struct.Struct(">I")
R = TypeVar("R")


class BufferedDecoder:
    usage_error: ClassVar[type[Exception]] = ValueError
    protocol_error: ClassVar[type[Exception]] = ValueError

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._error = ""  # what broke the decoder

    def receive_data(self, data: bytes) -> None:
        """Feed bytes; ``b""`` means the peer closed its side."""
        if self._eof and data:
            raise self.usage_error("data after end of stream")
        if data:
            self._buf += data
        else:
            self._eof = True

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buf)

    def _fail(self, message: str) -> Exception:
        """The protocol error for ``message``, to raise; the decoder stays broken."""
        self._error = message
        return self.protocol_error(message)

    def _check(self) -> None:
        """Raise the protocol error again if an earlier one broke the decoder."""
        if self._error:
            raise self.protocol_error(f"decoder is broken after: {self._error}")

    def _peek_u32(self) -> int | None:
        """The big-endian u32 that the next message starts with (still buffered), or
        None until 4 bytes are here; raises if the decoder is broken."""
        self._check()
        if not self._need(4):
            return None
        return int(_U32.unpack_from(self._buf)[0])

    def _need(self, n: int) -> bool:
        """Whether ``n`` bytes are buffered; raises if the stream ended short."""
        if len(self._buf) >= n:
            return True
        if self._eof and self._buf:
            raise self._fail(f"stream ended inside a message ({len(self._buf)} of {n} bytes)")
        return False

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


class RequestDecoder(BufferedDecoder, Generic[R], abc.ABC):
    """A server's decoder: every request starts with a u32 code (mssim, swtpm ctrl)."""

    def next_request(self) -> R | None:
        """The next complete request, or None until more bytes arrive."""
        code = self._peek_u32()
        return None if code is None else self._request(code)

    @abc.abstractmethod
    def _request(self, code: int) -> R | None:
        """The request that starts with ``code``, or None until all of it is here."""
