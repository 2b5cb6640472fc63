"""Bad input on every endpoint socket: an error or a clean close in bounded time,
and the endpoint keeps serving the next client; never a crash or a hang.

Each endpoint runs with a 0.5 s frame timeout. After each fuzzed input the
client half-closes and must see the endpoint close within a few seconds; then
a well-behaved client gets a working TPM.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers.endpoint import (
    CtrlClient,
    EndpointProcess,
    free_port_pair,
    start_local,
)
from tests.helpers.qemu_ctrl import new_qemu
from tests.helpers.sockets import recv_tpm_response

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_RC, TPM2_SU
from sgxvtpm.wire import mssim
from sgxvtpm.wire.swtpm_ctrl import CtrlCmd, CtrlRequest, CtrlResponse

pytestmark = pytest.mark.e2e
FRAME_TIMEOUT = 0.5
BOUND = 5.0  # seconds within which the endpoint must answer or close
FUZZ = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# Inputs that look like the protocols: a real code or header, then noise.
ctrl_input = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda c, b: c.to_bytes(4, "big") + b, st.integers(0, 25), st.binary(max_size=40)),
)
tpm_input = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda t, n, b: t.to_bytes(2, "big") + n.to_bytes(4, "big") + b,
              st.sampled_from([0x8001, 0x8002, 0xC1, 0]), st.integers(0, 1 << 32 - 1),
              st.binary(max_size=40)),
)
mssim_input = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda c, b: c.to_bytes(4, "big") + b, st.integers(0, 32), st.binary(max_size=40)),
)


def drain_until_closed(sock: socket.socket, bound: float = BOUND) -> bytes:
    """Read until the peer closes; fail if it neither answers nor closes in time."""
    sock.settimeout(bound)
    got = b""
    deadline = time.monotonic() + bound
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got
        except TimeoutError:
            raise AssertionError(f"endpoint neither closed nor finished within {bound} s") from None
        if not chunk:
            return got
        got += chunk
        if time.monotonic() > deadline:
            raise AssertionError("endpoint kept sending")


def assert_survives_garbage(ep: EndpointProcess, path: str, data: bytes) -> None:
    """``data`` on a new connection to unix socket ``path``: an answer or a close in
    time (:func:`send_garbage`), and the endpoint lives on."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        send_garbage(s, data)
    assert ep.alive()


def send_garbage(sock: socket.socket, data: bytes) -> bytes:
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        return b""
    return drain_until_closed(sock)


def ready_tpm_via_ctrl(ctrl: Path | str) -> None:
    c = CtrlClient(ctrl, short_errors=False, locality_body=1)
    try:
        resp = c.request(CtrlRequest(CtrlCmd.INIT))
        assert isinstance(resp, CtrlResponse) and resp.result == 0
    finally:
        c.close()


def swtpm_data_command(path: str, command: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(BOUND)
        s.connect(path)
        s.sendall(command)
        return recv_tpm_response(s)


# ---------------------------------------------------------------- tcti-swtpm (unix)


@pytest.fixture(scope="module")
def swtpm_ep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EndpointProcess]:
    work = tmp_path_factory.mktemp("bad-swtpm")
    ep = start_local(work / "state", swtpm=work / "tpm.sock", frame_timeout=FRAME_TIMEOUT)
    yield ep
    ep.stop()


def assert_swtpm_serves(ep: EndpointProcess) -> None:
    assert ep.alive()
    ready_tpm_via_ctrl(ep.address + ".ctrl")
    assert wire.response_code(swtpm_data_command(ep.address, wire.startup(TPM2_SU.CLEAR))) == 0
    response = swtpm_data_command(ep.address, wire.get_random(8))
    assert wire.response_code(response) == 0 and len(response) == 20


@FUZZ
@given(data=tpm_input)
def test_swtpm_data_socket_fuzz(swtpm_ep: EndpointProcess, data: bytes) -> None:
    assert_survives_garbage(swtpm_ep, swtpm_ep.address, data)


@FUZZ
@given(data=ctrl_input)
def test_swtpm_ctrl_socket_fuzz(swtpm_ep: EndpointProcess, data: bytes) -> None:
    assert_survives_garbage(swtpm_ep, swtpm_ep.address + ".ctrl", data)


def test_swtpm_serves_after_fuzz_and_bad_frames(swtpm_ep: EndpointProcess) -> None:
    # Oversized size field: TPM_RC_COMMAND_SIZE, then close.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(swtpm_ep.address)
        s.sendall(bytes.fromhex("80010010000000000144"))
        answer = drain_until_closed(s)
        assert answer == wire.error_response(TPM2_RC.COMMAND_SIZE)
    # A client that never finishes its frame is dropped after the frame timeout.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(swtpm_ep.address)
        s.sendall(bytes.fromhex("8001000000"))
        t0 = time.monotonic()
        drain_until_closed(s)
        assert time.monotonic() - t0 < FRAME_TIMEOUT + 2
    assert_swtpm_serves(swtpm_ep)


def test_swtpm_client_gone_mid_command(swtpm_ep: EndpointProcess) -> None:
    assert_swtpm_serves(swtpm_ep)
    # An RSA primary takes a while; the client leaves before the answer.
    slow = wire.create_primary(wire.rsa2048_template())
    for _ in range(3):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(swtpm_ep.address)
            s.sendall(slow)
    assert_swtpm_serves(swtpm_ep)


# ---------------------------------------------------------------- QEMU control + data


@pytest.fixture(scope="module")
def qemu_ep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EndpointProcess]:
    work = tmp_path_factory.mktemp("bad-qemu")
    ep = start_local(work / "state", ctrl=work / "q.ctrl", frame_timeout=FRAME_TIMEOUT)
    yield ep
    ep.stop()


def attach(ep: EndpointProcess) -> CtrlClient:
    """A fresh QEMU-like client (the endpoint waits for the previous data channel to end)."""
    return new_qemu(ep.address, init=False)


def assert_qemu_serves(ep: EndpointProcess) -> None:
    assert ep.alive()
    c = attach(ep)
    try:
        assert c.request(CtrlRequest(CtrlCmd.INIT)).result == 0  # type: ignore[attr-defined]
        assert wire.response_code(c.transact(wire.startup(TPM2_SU.CLEAR))) == 0
        assert wire.response_code(c.transact(wire.get_random(8))) == 0
    finally:
        c.close()


@FUZZ
@given(data=ctrl_input)
def test_qemu_ctrl_socket_fuzz(qemu_ep: EndpointProcess, data: bytes) -> None:
    assert_survives_garbage(qemu_ep, qemu_ep.address, data)


@FUZZ
@given(data=tpm_input)
def test_qemu_data_channel_fuzz(qemu_ep: EndpointProcess, data: bytes) -> None:
    c = attach(qemu_ep)
    try:
        assert c.data is not None
        send_garbage(c.data, data)
    finally:
        c.close()
    assert qemu_ep.alive()


def test_qemu_data_channel_recovers_from_bad_frames(qemu_ep: EndpointProcess) -> None:
    c = attach(qemu_ep)
    try:
        assert c.data is not None
        c.request(CtrlRequest(CtrlCmd.INIT))
        # A short frame (size field says 12, 10 bytes sent): after the frame
        # timeout the guest gets TPM_RC_COMMAND_SIZE and the channel goes on.
        c.data.sendall(bytes.fromhex("80010000000c00000144"))
        assert recv_tpm_response(c.data) == wire.error_response(TPM2_RC.COMMAND_SIZE)
        c.data.sendall(bytes.fromhex("8001ffffffff00000144"))
        assert recv_tpm_response(c.data) == wire.error_response(TPM2_RC.COMMAND_SIZE)
        assert wire.response_code(c.transact(wire.startup(TPM2_SU.CLEAR))) == 0
        # A second SET_DATAFD while one is active: TPM_IOERROR, as swtpm.
        other = socket.socketpair()
        try:
            resp = c.request(CtrlRequest(CtrlCmd.SET_DATAFD), [other[1].fileno()])
            assert isinstance(resp, CtrlResponse) and resp.result == 0x1F
        finally:
            for s in other:
                s.close()
    finally:
        c.close()
    assert_qemu_serves(qemu_ep)


# ---------------------------------------------------------------- mssim


@pytest.fixture(scope="module")
def mssim_ep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EndpointProcess]:
    work = tmp_path_factory.mktemp("bad-mssim")
    ep = start_local(work / "state", mssim=free_port_pair(), frame_timeout=FRAME_TIMEOUT)
    yield ep
    ep.stop()


def mssim_call(port: int, which: mssim.Port, req: mssim.MssimRequest) -> bytes | int:
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as s:
        s.sendall(mssim.encode_request(req))
        dec = mssim.MssimResponseDecoder(which)
        while True:
            out = dec.next_response()
            if out is not None:
                return out
            chunk = s.recv(65536)
            dec.receive_data(chunk)
            if not chunk:
                raise ConnectionError("closed")


def assert_mssim_serves(ep: EndpointProcess) -> None:
    assert ep.alive()
    plat, cmd = ep.port + 1, ep.port
    for code in (mssim.MssimCmd.SIGNAL_POWER_OFF, mssim.MssimCmd.SIGNAL_POWER_ON):
        assert mssim_call(plat, mssim.Port.PLATFORM, mssim.MssimRequest(code)) == 0
    startup = mssim.MssimRequest(mssim.MssimCmd.SEND_COMMAND, 0, wire.startup(TPM2_SU.CLEAR))
    resp = mssim_call(cmd, mssim.Port.COMMAND, startup)
    assert isinstance(resp, bytes) and wire.response_code(resp) == 0


@FUZZ
@given(data=mssim_input, platform=st.booleans())
def test_mssim_fuzz(mssim_ep: EndpointProcess, data: bytes, platform: bool) -> None:
    with socket.create_connection(("127.0.0.1", mssim_ep.port + int(platform))) as s:
        send_garbage(s, data)
    assert mssim_ep.alive()


def test_mssim_serves_after_bad_input(mssim_ep: EndpointProcess) -> None:
    with socket.create_connection(("127.0.0.1", mssim_ep.port)) as s:
        s.sendall((8).to_bytes(4, "big") + b"\0" + (1 << 20).to_bytes(4, "big"))
        assert drain_until_closed(s) == b""  # oversized: closed, nothing executed
    with socket.create_connection(("127.0.0.1", mssim_ep.port)) as s:
        s.sendall((8).to_bytes(4, "big") + b"\0")  # never finished
        t0 = time.monotonic()
        drain_until_closed(s)
        assert time.monotonic() - t0 < FRAME_TIMEOUT + 2
    assert_mssim_serves(mssim_ep)
