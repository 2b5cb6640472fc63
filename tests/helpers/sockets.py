"""Reading whole messages from a socket or a pipe, for tests and their child processes."""

from __future__ import annotations

import socket
from collections.abc import Callable


def read_exact(read: Callable[[int], bytes], n: int) -> bytes:
    """Exactly ``n`` bytes from ``read`` (a socket's ``recv``, a pipe's ``read``).

    Raises ConnectionError if the other end closes first.
    """
    buf = b""
    while len(buf) < n:
        chunk = read(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_exact(sock: socket.socket, n: int) -> bytes:
    return read_exact(sock.recv, n)


def recv_tpm_response(sock: socket.socket) -> bytes:
    """One TPM response: the 10-byte header, then the rest of the size it gives."""
    header = recv_exact(sock, 10)
    size = int.from_bytes(header[2:6], "big")
    return header + recv_exact(sock, max(0, size - 10))
