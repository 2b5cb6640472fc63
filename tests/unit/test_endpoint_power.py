"""Starting an endpoint, or tcti-mssim's POWER_ON, never resets a running TPM.

A real libtpms behind a LocalBackend in this process (one engine per
process, so each test closes its backend) and the real endpoints on real
sockets. PCR 16 extended before the endpoint starts keeps its value; only the
platform's reset (CMD_INIT, mssim SIGNAL_RESET) starts it over.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.helpers.endpoint import free_port_pair
from tests.helpers.sockets import recv_tpm_response

from sgxvtpm.enclaves.vtpm_core import VtpmCore
from sgxvtpm.endpoint.backend import LocalBackend
from sgxvtpm.endpoint.tss import MssimEndpoint, SwtpmTssEndpoint
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU
from sgxvtpm.tpm.engine import LibtpmsEngine, MemoryStateStore
from sgxvtpm.tpm.nv import execute
from sgxvtpm.wire import mssim

DIGEST = hashlib.sha256(b"measured before the endpoint started").digest()
EXTENDED = hashlib.sha256(bytes(32) + DIGEST).digest()


@pytest.fixture
def backend() -> Iterator[LocalBackend]:
    b = LocalBackend(VtpmCore(lambda: LibtpmsEngine(MemoryStateStore())))
    yield b
    b.close()


def booted(backend: LocalBackend) -> None:
    backend.power_on()
    execute(backend.transact, wire.startup(TPM2_SU.CLEAR))
    execute(backend.transact, wire.pcr_extend(16, DIGEST))


def pcr16(transact: Callable[[bytes], bytes]) -> bytes:
    return wire.parse_pcr_read(execute(transact, wire.pcr_read([16]))).digests[0]


def test_swtpm_endpoint_starts_a_stopped_tpm_and_keeps_a_running_one(
    backend: LocalBackend, tmp_path: Path
) -> None:
    first = SwtpmTssEndpoint(backend, path=tmp_path / "first.sock")
    first.start()  # stopped: powered on
    first.close()
    execute(backend.transact, wire.startup(TPM2_SU.CLEAR))
    execute(backend.transact, wire.pcr_extend(16, DIGEST))
    second = SwtpmTssEndpoint(backend, path=tmp_path / "second.sock")
    second.start()  # running: left alone
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(tmp_path / "second.sock"))

            def transact(command: bytes) -> bytes:
                s.sendall(command)
                return recv_tpm_response(s)

            assert pcr16(transact) == EXTENDED
    finally:
        second.close()


class MssimClient:
    """tcti-mssim's two connections, on the sans-IO codec."""

    def __init__(self, port: int) -> None:
        self.command = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.platform = socket.create_connection(("127.0.0.1", port + 1), timeout=10)

    def signal(self, code: mssim.MssimCmd) -> int:
        self.platform.sendall(mssim.encode_request(mssim.MssimRequest(code)))
        answer = self._read(self.platform, mssim.Port.PLATFORM)
        assert isinstance(answer, int)
        return answer

    def transact(self, command: bytes) -> bytes:
        request = mssim.MssimRequest(mssim.MssimCmd.SEND_COMMAND, 0, command)
        self.command.sendall(mssim.encode_request(request))
        answer = self._read(self.command, mssim.Port.COMMAND)
        assert isinstance(answer, bytes)
        return answer

    @staticmethod
    def _read(sock: socket.socket, port: mssim.Port) -> bytes | int:
        decoder = mssim.MssimResponseDecoder(port)
        while (answer := decoder.next_response()) is None:
            chunk = sock.recv(65536)
            assert chunk, "the endpoint closed the connection"
            decoder.receive_data(chunk)
        return answer

    def close(self) -> None:
        self.command.close()
        self.platform.close()


def test_mssim_power_on_keeps_a_running_tpm_reset_starts_over(backend: LocalBackend) -> None:
    booted(backend)
    endpoint = MssimEndpoint(backend, port=free_port_pair())
    endpoint.start()
    client = MssimClient(endpoint.port)
    try:
        # What tcti-mssim sends on every connect: the simulator ignores it while powered.
        assert client.signal(mssim.MssimCmd.SIGNAL_POWER_ON) == 0
        assert client.signal(mssim.MssimCmd.SIGNAL_NV_ON) == 0
        assert pcr16(client.transact) == EXTENDED
        assert client.signal(mssim.MssimCmd.SIGNAL_RESET) == 0  # the platform's reset
        execute(client.transact, wire.startup(TPM2_SU.CLEAR))
        assert pcr16(client.transact) == bytes(32)
    finally:
        client.close()
        endpoint.close()
