"""The echo enclave (tests/helpers/sim_echo_enclave.py) from the outside: its code, its
spec and its client side (one framed request, one reply)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from tests.helpers.sockets import recv_exact

from sgxvtpm.platform import EnclaveSpec

# tests/helpers is a package; an enclave gets a copy of this file outside it
# (:func:`copy_echo_code`), so that its measured relative name (and module
# name) is just "sim_echo_enclave.py".
ECHO_SOURCE = Path(__file__).with_name("sim_echo_enclave.py")


def copy_echo_code(directory: Path) -> Path:
    path = directory / ECHO_SOURCE.name
    path.write_bytes(ECHO_SOURCE.read_bytes())
    return path


def echo_spec(code: Path, config: bytes = b"{}") -> EnclaveSpec:
    """The echo enclave's spec, not signed."""
    return EnclaveSpec("echo", "sim_echo_enclave:main", [code], config, isv_prod_id=7, isv_svn=3)


def call(stream: socket.socket, payload: bytes) -> bytes:
    stream.settimeout(20)
    stream.sendall(struct.pack(">I", len(payload)) + payload)
    head = recv_exact(stream, 4)
    return recv_exact(stream, struct.unpack(">I", head)[0])
