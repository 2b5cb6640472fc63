"""Transports the latency client drives: ``transact(command) -> response``.

- :class:`EngineTransport`: libtpms in this process (target a, the limit);
- :class:`SocketTransport`: raw TPM commands on one persistent unix stream
  connection, as QEMU uses swtpm's data channel (targets b and c);
- :class:`K2Transport`: sgxvtpm's in-process K2 client (target d).

A transport does the least work it can per command (one send, usually one
recv) so that the client's own cost stays small and the same for every
target.
"""

from __future__ import annotations

import socket
from pathlib import Path

from sgxvtpm.endpoint.k2 import K2Client, VmBinding
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import HEADER_SIZE, TPM2_RC
from sgxvtpm.tpm.engine import LibtpmsEngine
from sgxvtpm.vmm.credentials import Credentials
from sgxvtpm.wire import vtpm

_RECV = 1 << 16


class TransportError(Exception):
    """The peer closed or broke the connection mid-response."""


class EngineTransport:
    def __init__(self, engine: LibtpmsEngine | None = None) -> None:
        self.engine = engine or LibtpmsEngine()
        if not self.engine.running:
            self.engine.start()

    def transact(self, command: bytes) -> bytes:
        return self.engine.process(command)

    def close(self) -> None:
        self.engine.stop()


def recv_response(sock: socket.socket) -> bytes:
    """One complete TPM response: the size field (bytes 2..6) says how long."""
    data = sock.recv(_RECV)
    if not data:
        raise TransportError("the TPM closed the connection")
    while len(data) < HEADER_SIZE:
        more = sock.recv(_RECV)
        if not more:
            raise TransportError("the TPM closed the connection inside a header")
        data += more
    size = int.from_bytes(data[2:6], "big")
    if size < HEADER_SIZE:
        raise TransportError(f"response size field {size} is shorter than a header")
    while len(data) < size:
        more = sock.recv(_RECV)
        if not more:
            raise TransportError(f"the TPM closed the connection after {len(data)}/{size} bytes")
        data += more
    return data


class SocketTransport:
    """One persistent connection to a swtpm-style raw data socket."""

    def __init__(self, path: Path | str, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))

    def transact(self, command: bytes) -> bytes:
        self.sock.sendall(command)
        return recv_response(self.sock)

    def close(self) -> None:
        self.sock.close()


class K2Transport:
    """Raw TPM commands through the in-process K2 client (sgxvtpm.endpoint.k2).

    An instance's TPM is powered off after manufacturing until its VM powers
    it on (swtpm's CMD_INIT, the vTPM INIT op); a TPM that answers
    TPM_RC_FAILURE to a first probe is powered on here, one that is already
    running is left alone (INIT would reset it).
    """

    def __init__(self, state_dir: Path, name: str, credentials: Path) -> None:
        binding = VmBinding.load(StateDir(state_dir), name, credentials=Credentials(credentials))
        self.client = K2Client(binding)
        self.client.connect()
        powered_off = wire.response_code(self.transact(wire.get_random(8))) == TPM2_RC.FAILURE
        if powered_off and not self.client.call(vtpm.VtpmRequest.init()).success:
            raise TransportError("the instance refused to power its TPM on (INIT)")

    def transact(self, command: bytes) -> bytes:
        response = self.client.call(vtpm.VtpmRequest.tpm_command(command))
        if not response.success:
            raise TransportError(f"vTPM request failed: TPM_RESULT {response.result:#x}")
        payload: bytes = response.payload
        return payload

    def close(self) -> None:
        self.client.close()
