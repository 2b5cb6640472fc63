"""The enclave's host-TPM tap (platform/host_tpm.py) and the TPM relay frame.

The tap sits on an enclave's host stream: relay frames pass whole both ways,
TPM frames are its own. Real sockets (socketpairs), no processes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from sgxvtpm.host.switch import TPM_PENDING_MAX, Relay
from sgxvtpm.mux.connection import RelayConnection, RelayRemoteError, Role
from sgxvtpm.platform.base import PlatformError
from sgxvtpm.platform.host_tpm import HostTpmTap
from sgxvtpm.wire.relay import (
    Frame,
    FrameType,
    RelayDecoder,
    RelayProtocolError,
    RelayUsageError,
    encode,
    encode_header,
)


class Host:
    """hostd's end of an enclave stream: reads frames, answers TPM frames."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = RelayDecoder()

    def frame(self) -> Frame:
        while (frame := self.decoder.next_frame()) is None:
            data = self.sock.recv(65536)
            assert data, "the tap closed the stream"
            self.decoder.receive_data(data)
        return frame

    def answer_tpm(self, response: bytes) -> bytes:
        frame = self.frame()
        assert frame.type is FrameType.TPM and frame.session_id == 0
        self.sock.sendall(encode(Frame(FrameType.TPM, 0, response)))
        return frame.payload


@pytest.fixture
def pair() -> Iterator[tuple[Host, HostTpmTap]]:
    host_end, enclave_end = socket.socketpair()
    host_end.settimeout(10)
    tap = HostTpmTap(enclave_end, timeout=5)
    tap.stream.settimeout(10)
    yield Host(host_end), tap
    tap.close()
    host_end.close()
    enclave_end.close()


def _read_frames(sock: socket.socket, n: int) -> list[Frame]:
    decoder, frames = RelayDecoder(), []
    while len(frames) < n:
        decoder.receive_data(sock.recv(65536))
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    return frames


def test_tpm_command_and_response_cross_the_host_stream(pair: tuple[Host, HostTpmTap]) -> None:
    host, tap = pair
    seen: list[bytes] = []
    answerer = threading.Thread(target=lambda: seen.append(host.answer_tpm(b"\x80\x01resp")))
    answerer.start()
    assert tap.transact(b"\x80\x01command") == b"\x80\x01resp"
    answerer.join()
    assert seen == [b"\x80\x01command"]


def test_relay_frames_pass_whole_around_tpm_frames(pair: tuple[Host, HostTpmTap]) -> None:
    host, tap = pair
    # From hostd: a TPM response between two DATA frames, split at odd places.
    wire = (
        encode(Frame.data(7, b"a" * 5000))
        + encode(Frame(FrameType.TPM, 0, b"tpm answer"))
        + encode(Frame.control({"ok": True}))
    )
    result: list[bytes] = []
    caller = threading.Thread(target=lambda: result.append(tap.transact(b"cmd")))
    caller.start()
    assert host.frame() == Frame(FrameType.TPM, 0, b"cmd")
    for i in range(0, len(wire), 777):
        host.sock.sendall(wire[i : i + 777])
    caller.join(10)
    assert result == [b"tpm answer"]
    assert _read_frames(tap.stream, 2) == [Frame.data(7, b"a" * 5000), Frame.control({"ok": True})]
    # From the enclave: its frames reach hostd whole, even written a byte at a time.
    out = encode(Frame.open(1, "manager")) + encode(Frame.data(1, b"b" * 3000))
    for i in range(len(out)):
        tap.stream.sendall(out[i : i + 1])
    assert [host.frame(), host.frame()] == [Frame.open(1, "manager"), Frame.data(1, b"b" * 3000)]


def test_handoff_descriptors_pass_with_their_frame(pair: tuple[Host, HostTpmTap]) -> None:
    host, tap = pair
    r, w = os.pipe()
    try:
        header = encode_header(FrameType.HANDOFF, 0x8000_0001, 0)
        socket.send_fds(host.sock, [header], [r])
        data, fds, _, _ = socket.recv_fds(tap.stream, 64, 4)
        assert data == header and len(fds) == 1
        os.write(w, b"through")
        assert os.read(fds[0], 16) == b"through"  # the same pipe
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_empty_response_means_no_host_tpm(pair: tuple[Host, HostTpmTap]) -> None:
    host, tap = pair
    answerer = threading.Thread(target=host.answer_tpm, args=(b"",))
    answerer.start()
    with pytest.raises(PlatformError, match="relays no host TPM"):
        tap.transact(b"cmd")
    answerer.join()


def test_host_gone_ends_calls_and_the_stream(pair: tuple[Host, HostTpmTap]) -> None:
    host, tap = pair
    host.sock.shutdown(socket.SHUT_WR)
    assert tap.stream.recv(10) == b""  # the enclave's runtime sees the host's EOF
    with pytest.raises(PlatformError, match="no host TPM"):
        tap.transact(b"cmd")


def test_no_answer_times_out_and_ends_the_tap(pair: tuple[Host, HostTpmTap]) -> None:
    """A late answer must never pass for the next command's: after a timeout, no more calls."""
    host, tap = pair
    tap._timeout = 0.2
    with pytest.raises(PlatformError, match="did not answer"):
        tap.transact(b"cmd")
    assert host.frame() == Frame(FrameType.TPM, 0, b"cmd")
    host.sock.sendall(encode(Frame(FrameType.TPM, 0, b"late answer to cmd")))
    with pytest.raises(PlatformError, match="did not answer"):
        tap.transact(b"next")


def test_enclave_eof_reaches_the_host_after_its_frames(pair: tuple[Host, HostTpmTap]) -> None:
    host, tap = pair
    tap.stream.sendall(encode(Frame.control({"op": "manager_refused"})))
    tap.close()
    assert host.frame() == Frame.control({"op": "manager_refused"})
    assert host.sock.recv(10) == b""


def test_tpm_frames_are_session_zero_only() -> None:
    with pytest.raises(RelayUsageError):
        encode(Frame(FrameType.TPM, 3, b"x"))
    decoder = RelayDecoder()
    decoder.receive_data(encode_header(FrameType.TPM, 3, 0))
    with pytest.raises(RelayProtocolError):
        decoder.next_frame()


@pytest.mark.parametrize("role", [Role.ENCLAVE, Role.CLIENT])
def test_a_tpm_frame_past_the_tap_breaks_the_connection(role: Role) -> None:
    conn = RelayConnection(role)
    with pytest.raises(RelayRemoteError, match="TPM frame"):
        conn.receive_data(encode(Frame(FrameType.TPM, 0, b"x")))
        conn.next_event()


# ------------------------------------------------------------ hostd's switch


async def _frame(reader: asyncio.StreamReader) -> Frame | None:
    decoder = RelayDecoder()
    while (frame := decoder.next_frame()) is None:
        data = await reader.read(65536)
        decoder.receive_data(data)
        if not data:
            return None
    return frame


async def _switch_exchange(kind: str, on_tpm: bool) -> tuple[Frame | None, list[bytes]]:
    seen: list[bytes] = []

    async def host_tpm(command: bytes) -> bytes:
        seen.append(command)
        return b"response to " + command

    relay = Relay(on_tpm=host_tpm if on_tpm else None)
    ours, theirs = socket.socketpair()
    r, w = await asyncio.open_connection(sock=theirs)
    name = "e1" if kind == "enclave" else None
    task = asyncio.create_task(relay.serve(r, w, kind=kind, name=name))
    reader, writer = await asyncio.open_connection(sock=ours)
    writer.write(encode(Frame(FrameType.TPM, 0, b"cmd")))
    frame = await asyncio.wait_for(_frame(reader), 10)
    writer.close()
    await relay.aclose()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return frame, seen


def test_switch_relays_an_enclaves_tpm_command_unread() -> None:
    frame, seen = asyncio.run(_switch_exchange("enclave", on_tpm=True))
    assert frame == Frame(FrameType.TPM, 0, b"response to cmd") and seen == [b"cmd"]


def test_switch_without_a_host_tpm_answers_empty() -> None:
    frame, seen = asyncio.run(_switch_exchange("enclave", on_tpm=False))
    assert frame == Frame(FrameType.TPM, 0, b"") and seen == []


def test_switch_bounds_an_enclaves_outstanding_tpm_commands() -> None:
    """Commands beyond TPM_PENDING_MAX unanswered end the enclave's connection; those
    still queued then never reach the TPM."""

    async def run() -> tuple[Frame | None, int]:
        release = asyncio.Event()
        seen = 0

        async def slow_tpm(command: bytes) -> bytes:
            nonlocal seen
            seen += 1
            await release.wait()
            return b"r"

        relay = Relay(on_tpm=slow_tpm)
        ours, theirs = socket.socketpair()
        r, w = await asyncio.open_connection(sock=theirs)
        task = asyncio.create_task(relay.serve(r, w, kind="enclave", name="e1"))
        reader, writer = await asyncio.open_connection(sock=ours)
        writer.write(encode(Frame(FrameType.TPM, 0, b"c")) * (TPM_PENDING_MAX + 1))
        await asyncio.wait_for(task, 10)  # the relay dropped the connection
        release.set()
        frame = await asyncio.wait_for(_frame(reader), 10)
        writer.close()
        await relay.aclose()
        return frame, seen

    frame, seen = asyncio.run(run())
    assert frame is None and seen <= 1  # at most the command in flight reached the TPM


def test_switch_drops_a_client_sending_tpm_frames() -> None:
    frame, seen = asyncio.run(_switch_exchange("client", on_tpm=True))
    assert frame is None and seen == []  # the connection ended, the TPM saw nothing
