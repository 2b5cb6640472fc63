"""The small part of CBOR (RFC 8949) that RA-TLS evidence needs, sans-IO.

Gramine's TCG DICE tagged evidence (channel/evidence.py) is built from
unsigned integers, byte strings, text strings, arrays, maps and one tag. This
module encodes those and decodes exactly those, and nothing else: floats,
simple values, negative integers and indefinite lengths are refused.

- :func:`encode` writes the preferred serialization (RFC 8949 4.1: the
  shortest argument form), as libcbor, which Gramine uses, does.
- :func:`decode` takes one complete data item: any argument length form a
  well-formed item may use, definite lengths only, no trailing bytes, no
  duplicate map keys, valid UTF-8 in text strings, and a bounded nesting
  depth. Anything else raises :class:`CborError` (never another exception).

Values: ``int`` (>= 0), ``bytes``, ``str``, ``list``, ``dict`` and
:class:`Tag`. Map keys may be ``int``, ``bytes`` or ``str``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeAlias

from sgxvtpm.errors import SgxvtpmError

MAX_DEPTH = 16

# Major types (RFC 8949 3.1).
_UINT, _NEGINT, _BYTES, _TEXT, _ARRAY, _MAP, _TAG, _SIMPLE = range(8)


class CborError(SgxvtpmError):
    """Input is not a CBOR item of the supported kinds; the message says where."""


@dataclass(frozen=True)
class Tag:
    """A tagged data item (major type 6)."""

    number: int
    value: Value


Key: TypeAlias = int | bytes | str
Value: TypeAlias = "int | bytes | str | list[Value] | dict[Key, Value] | Tag"


def _head(major: int, argument: int) -> bytes:
    if argument < 0 or argument >= 1 << 64:
        raise ValueError(f"CBOR argument out of range: {argument}")
    if argument < 24:
        return bytes([major << 5 | argument])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        size = struct.calcsize(fmt)
        if argument < 1 << (8 * size):
            return bytes([major << 5 | info]) + struct.pack(fmt, argument)
    raise AssertionError("unreachable")


def encode(value: Value) -> bytes:
    """The preferred serialization of ``value``; ValueError for what is not supported."""
    out = bytearray()
    _encode(value, out, 0)
    return bytes(out)


def _encode(value: Value, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("CBOR value nested too deeply")
    if isinstance(value, bool):  # bool is an int subclass: refuse, do not write 0/1
        raise ValueError("CBOR booleans are not supported")
    if isinstance(value, int):
        out += _head(_UINT, value)
    elif isinstance(value, bytes):
        out += _head(_BYTES, len(value)) + value
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out += _head(_TEXT, len(raw)) + raw
    elif isinstance(value, list):
        out += _head(_ARRAY, len(value))
        for item in value:
            _encode(item, out, depth + 1)
    elif isinstance(value, dict):
        out += _head(_MAP, len(value))
        for key, item in value.items():
            _encode(key, out, depth + 1)
            _encode(item, out, depth + 1)
    elif isinstance(value, Tag):
        out += _head(_TAG, value.number)
        _encode(value.value, out, depth + 1)
    else:
        raise ValueError(f"CBOR cannot encode {type(value).__name__}")


def decode(data: bytes) -> Value:
    """The one data item ``data`` holds; CborError if it holds anything else."""
    value, end = _Decoder(bytes(data)).item(0, 0)
    if end != len(data):
        raise CborError(f"{len(data) - end} trailing bytes after the CBOR item")
    return value


class _Decoder:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def _take(self, pos: int, n: int) -> bytes:
        if n > len(self.data) - pos:
            raise CborError(f"truncated CBOR at offset {pos}: {n} bytes needed")
        return self.data[pos : pos + n]

    def _head(self, pos: int) -> tuple[int, int, int]:
        (initial,) = self._take(pos, 1)
        major, info = initial >> 5, initial & 0x1F
        pos += 1
        if info < 24:
            return major, info, pos
        sizes = {24: 1, 25: 2, 26: 4, 27: 8}
        if info not in sizes:  # 28-30 reserved, 31 indefinite length
            raise CborError(f"unsupported CBOR additional information {info} at {pos - 1}")
        raw = self._take(pos, sizes[info])
        return major, int.from_bytes(raw, "big"), pos + len(raw)

    def item(self, pos: int, depth: int) -> tuple[Value, int]:
        if depth > MAX_DEPTH:
            raise CborError("CBOR nested too deeply")
        start = pos
        major, arg, pos = self._head(pos)
        if major == _UINT:
            return arg, pos
        if major == _BYTES:
            return self._take(pos, arg), pos + arg
        if major == _TEXT:
            try:
                return self._take(pos, arg).decode("utf-8"), pos + arg
            except UnicodeDecodeError:
                raise CborError(f"CBOR text string at {start} is not UTF-8") from None
        if major == _ARRAY:
            items: list[Value] = []
            for _ in range(arg):
                value, pos = self.item(pos, depth + 1)
                items.append(value)
            return items, pos
        if major == _MAP:
            return self._map(pos, arg, depth)
        if major == _TAG:
            value, pos = self.item(pos, depth + 1)
            return Tag(arg, value), pos
        raise CborError(f"unsupported CBOR major type {major} at {start}")

    def _map(self, pos: int, count: int, depth: int) -> tuple[Value, int]:
        result: dict[Key, Value] = {}
        for _ in range(count):
            key_at = pos
            key, pos = self.item(pos, depth + 1)
            if not isinstance(key, int | bytes | str):
                raise CborError(f"unsupported CBOR map key type at {key_at}")
            if key in result:
                raise CborError(f"duplicate CBOR map key at {key_at}")
            result[key], pos = self.item(pos, depth + 1)
        return result, pos
