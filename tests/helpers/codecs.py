"""Driving the sans-IO decoders of sgxvtpm.wire in tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def decode_in_chunks(
    receive: Callable[[bytes], None], next_message: Callable[[], T | None], data: bytes, chunk: int
) -> list[T]:
    """Every message a decoder makes of ``data`` fed ``chunk`` bytes at a time, then the
    end of the stream; nothing may be left over."""
    out: list[T] = []
    for i in range(0, len(data), chunk):
        receive(data[i : i + chunk])
        while (message := next_message()) is not None:
            out.append(message)
    receive(b"")
    assert next_message() is None
    return out
