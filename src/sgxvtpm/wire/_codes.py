"""A code read off the wire as its enum member (sans-IO), for the binary codecs
(relay, vtpm, mssim)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TypeVar

E = TypeVar("E", bound=enum.IntEnum)


def member(
    cls: type[E], raw: int, error: Callable[[str], Exception], what: str, where: str = ""
) -> E:
    """``raw`` as a member of ``cls``; else raises ``error("unknown WHAT RAW WHERE")``
    (``error``: the protocol's error class, or a decoder's method that records it)."""
    try:
        return cls(raw)
    except ValueError:
        raise error(f"unknown {what} {raw!r}{where}") from None
