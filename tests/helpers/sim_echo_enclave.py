"""A tiny enclave for the sim loader tests (run inside a zygote child).

Frames on the stream: u32 big-endian length, then the payload. Requests:
  b"P"              -> b"pong"
  b"Q" + 64 bytes   -> platform.quote(report data)
  b"C"              -> the measured config the platform gives us
  b"A"              -> the launch args, as JSON
  b"R"              -> the attestation root PEM the platform gives us
  b"D"              -> prctl(PR_GET_DUMPABLE) as one ASCII digit
  b"K"              -> EGETKEY(SEAL, MRSIGNER policy)
  b"L" + prefix     -> load the measured library named prefix*; the path it came from
  b"X"              -> the enclave returns from main (exits 0)
"""

from __future__ import annotations

import ctypes
import json
import socket
import struct
from collections.abc import Mapping
from typing import Any


# Not tests.helpers.sockets: an enclave runs only its measured code, this one file.
def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def _json(value: object) -> object:
    return value.hex() if isinstance(value, bytes) else str(value)


def main(platform: Any, stream: socket.socket, args: Mapping[str, Any]) -> None:
    while True:
        head = _recv_exactly(stream, 4)
        if head is None:
            return
        request = _recv_exactly(stream, struct.unpack(">I", head)[0])
        if request is None:
            return
        op, body = request[:1], request[1:]
        if op == b"P":
            _send(stream, b"pong")
        elif op == b"Q":
            _send(stream, platform.quote(body))
        elif op == b"C":
            _send(stream, platform.config)
        elif op == b"A":
            _send(stream, json.dumps(dict(args), default=_json, sort_keys=True).encode())
        elif op == b"R":
            _send(stream, platform.attestation_root_pem)
        elif op == b"D":
            _send(stream, str(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)).encode())  # PR_GET_DUMPABLE
        elif op == b"K":
            from sgxvtpm.platform.base import KeyName, KeyPolicy, KeyRequest

            _send(stream, platform.get_key(KeyRequest(KeyName.SEAL, KeyPolicy.MRSIGNER)))
        elif op == b"L":
            from sgxvtpm.util import measured

            path = measured.library_path(body.decode(), body.decode())
            ctypes.CDLL(path)
            _send(stream, path.encode())
        elif op == b"X":
            return
        else:
            _send(stream, b"?")
