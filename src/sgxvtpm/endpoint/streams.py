"""Reading framed messages from a socket with bounded waits (shared by the endpoints)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

T = TypeVar("T")

#: A client must finish a message it started within this many seconds.
FRAME_TIMEOUT = 5.0
READ_CHUNK = 65536


class Decoder(Protocol):
    def receive_data(self, data: bytes) -> None: ...

    @property
    def pending(self) -> int: ...


class FrameTimeout(Exception):
    """The peer started a message and did not finish it in time."""


async def next_message(
    read: Callable[[], Awaitable[bytes]],
    decoder: Decoder,
    get: Callable[[], T | None],
    *,
    frame_timeout: float = FRAME_TIMEOUT,
    idle_timeout: float | None = None,
) -> T | None:
    """The next message, or None at a clean end of stream (or idle timeout).

    ``get`` raises the codec's protocol error for bad or truncated input.
    Raises :class:`FrameTimeout` if a started message stalls.
    """
    while True:
        message = get()
        if message is not None:
            return message
        started = decoder.pending > 0
        try:
            data = await asyncio.wait_for(read(), frame_timeout if started else idle_timeout)
        except TimeoutError:
            if started:
                raise FrameTimeout(f"message incomplete after {frame_timeout} s") from None
            return None
        except (ConnectionError, OSError):
            data = b""
        decoder.receive_data(data)
        if not data:
            message = get()  # raises if the stream ended inside a message
            return message
