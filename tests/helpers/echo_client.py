"""The client side of tests/helpers/sim_echo_enclave.py: one framed request, one reply."""

from __future__ import annotations

import socket
import struct


def call(stream: socket.socket, payload: bytes) -> bytes:
    stream.settimeout(20)
    stream.sendall(struct.pack(">I", len(payload)) + payload)
    head = _recv(stream, 4)
    return _recv(stream, struct.unpack(">I", head)[0])


def _recv(stream: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = stream.recv(n - len(buf))
        assert chunk, "enclave closed its stream"
        buf += chunk
    return buf
