"""Minimal DER (X.690) encoding: the few types cryptography has no builder for
(the EK certificate's subjectDirectoryAttributes, the sim PCK's SGX extensions)."""

from __future__ import annotations


def tlv(tag: int, content: bytes) -> bytes:
    """One element: ``tag``, its definite length (short or long form), ``content``."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def uint(value: int) -> bytes:
    """An INTEGER that is not negative (a leading zero byte keeps it positive)."""
    if value < 0:
        raise ValueError("negative INTEGER not needed here")
    return tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER from its dotted form ("1.2.840.113741.1.13.1")."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return tlv(0x06, bytes(out))
