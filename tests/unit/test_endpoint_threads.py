"""The blocking endpoint plumbing: kernel receive timeouts, message reading,
listener threads, the stop flag and VmTpm's failure mapping (no processes)."""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sgxvtpm.endpoint.backend import BACKEND_FAILURE_RESPONSE, VmTpm
from sgxvtpm.endpoint.lifecycle import StopFlag
from sgxvtpm.endpoint.listeners import Listeners, SocketAccess, loopback_host
from sgxvtpm.endpoint.streams import FrameTimeout, Stream, next_message, timeval
from sgxvtpm.tpm import wire
from sgxvtpm.wire.swtpm_ctrl import CommandFramer, CtrlProtocolError
from sgxvtpm.wire.vtpm import TpmResult, VtpmOp, VtpmRequest, VtpmResponse


def _tv(seconds: float | None) -> tuple[int, int]:
    sec, usec = struct.unpack("@ll", timeval(seconds))
    return sec, usec


def test_timeval() -> None:
    assert _tv(None) == (0, 0)  # the kernel's "wait forever"
    assert _tv(0.5) == (0, 500_000)
    assert _tv(2.25) == (2, 250_000)
    assert _tv(60.0) == (60, 0)
    assert _tv(1e-9) == (0, 1)  # never 0, which would mean forever
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            timeval(bad)


class FakeReads:
    """``read(timeout)`` from a script: bytes, or None for a timeout; records the waits."""

    def __init__(self, script: list[bytes | None]) -> None:
        self.script = list(script)
        self.waits: list[float | None] = []

    def __call__(self, timeout: float | None) -> bytes:
        self.waits.append(timeout)
        item = self.script.pop(0)
        if item is None:
            raise TimeoutError
        return item


def _read(reads: FakeReads, framer: CommandFramer) -> bytes | None:
    return next_message(reads, framer, framer.next_command, frame_timeout=0.5, idle_timeout=60.0)


def test_next_message_whole_and_byte_by_byte() -> None:
    command = wire.get_random(8)
    framer = CommandFramer()
    reads = FakeReads([command + command[:3], command[3:]])
    assert _read(reads, framer) == command
    assert _read(reads, framer) == command
    # idle wait before the first byte, frame wait once a message started
    assert reads.waits == [60.0, 0.5]
    framer = CommandFramer()
    reads = FakeReads([bytes([b]) for b in command])
    assert _read(reads, framer) == command
    assert reads.waits == [60.0] + [0.5] * (len(command) - 1)


def test_next_message_timeouts_and_end() -> None:
    assert _read(FakeReads([None]), CommandFramer()) is None  # idle: a quiet end
    with pytest.raises(FrameTimeout):
        _read(FakeReads([b"\x80\x01\x00", None]), CommandFramer())
    assert _read(FakeReads([b""]), CommandFramer()) is None  # clean end of stream
    with pytest.raises(CtrlProtocolError):  # the stream ended inside a message
        _read(FakeReads([b"\x80\x01\x00", b""]), CommandFramer())


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_stream_kernel_timeout_and_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    stream = Stream(a)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        stream.read(0.05)
    assert 0.04 < time.monotonic() - t0 < 2.0
    b.sendall(b"abc")
    assert stream.read(0.05) == b"abc"
    assert not stream.eof
    b.close()
    assert stream.read(None) == b""
    assert stream.eof


def _echo(sock: socket.socket) -> None:
    while data := sock.recv(1024):
        sock.sendall(data)


def _connect(path: Path) -> socket.socket:
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(5)
    try:
        c.connect(str(path))
    except OSError:
        c.close()
        raise
    return c


def test_listeners_serve_and_close(tmp_path: Path) -> None:
    listeners = Listeners()
    path = tmp_path / "echo.sock"
    listeners.unix(path, _echo)
    port = listeners.tcp("127.0.0.1", 0, _echo)
    clients = [_connect(path), socket.create_connection(("127.0.0.1", port), timeout=5)]
    for c in clients:
        c.sendall(b"ping")
        assert c.recv(16) == b"ping"
    t0 = time.monotonic()
    listeners.close()  # the echo threads are blocked in recv: close wakes and joins them
    assert time.monotonic() - t0 < 1.5
    assert not path.exists()
    for c in clients:
        assert c.recv(16) == b""
        c.close()
    with pytest.raises(OSError):
        _connect(path)


def test_unix_socket_gets_its_mode_and_group_whatever_the_umask(tmp_path: Path) -> None:
    group = 65534 if os.geteuid() == 0 else os.getgid()  # only root gives a socket away
    listeners = Listeners()
    old = os.umask(0)  # bind(2) alone would make the socket 0777
    try:
        listeners.unix(tmp_path / "default.sock", _echo)
        listeners.unix(tmp_path / "group.sock", _echo, access=SocketAccess(0o660, gid=group))
        assert os.umask(old) == 0  # the process's umask is back
        assert stat.S_IMODE(os.stat(tmp_path / "default.sock").st_mode) == 0o600
        made = os.stat(tmp_path / "group.sock")
        assert (stat.S_IMODE(made.st_mode), made.st_gid) == (0o660, group)
    finally:
        os.umask(old)
        listeners.close()


def test_unix_listener_replaces_only_a_stale_socket(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.write_text("not a socket")
    listeners = Listeners()
    try:
        with pytest.raises(FileExistsError, match="not a socket"):
            listeners.unix(keep, _echo)
        assert keep.read_text() == "not a socket"
        stale = tmp_path / "stale.sock"
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(stale))  # a socket nobody listens on any more
        listeners.unix(stale, _echo)
        with _connect(stale) as c:
            c.sendall(b"ping")
            assert c.recv(16) == b"ping"
    finally:
        listeners.close()


def test_close_leaves_a_socket_that_replaced_ours(tmp_path: Path) -> None:
    path = tmp_path / "tpm.sock"
    first, second = Listeners(), Listeners()
    first.unix(path, _echo)
    second.unix(path, _echo)  # a takeover on the same path
    first.close()
    try:
        with _connect(path) as c:  # still the second one's
            c.sendall(b"ping")
            assert c.recv(16) == b"ping"
    finally:
        second.close()
    assert not path.exists()


def test_tcp_listens_on_loopback_only() -> None:
    assert loopback_host("127.0.0.1") == "127.0.0.1"
    assert loopback_host("localhost") == "127.0.0.1"
    assert loopback_host("[::1]") == "::1"
    listeners = Listeners()
    try:
        for host in ("0.0.0.0", "::", "192.0.2.1", "example.org", ""):
            with pytest.raises(ValueError, match="loopback only"):
                listeners.tcp(host, 0, _echo)
        port = listeners.tcp("::1", 0, _echo)
        with socket.create_connection(("::1", port), timeout=5) as c:
            c.sendall(b"ping")
            assert c.recv(16) == b"ping"
    finally:
        listeners.close()


def test_socket_access_from_the_command_line() -> None:
    assert SocketAccess.parse() == SocketAccess(0o600, -1, -1)
    assert SocketAccess.parse("0660", "0", "root") == SocketAccess(0o660, 0, 0)
    assert SocketAccess.parse(owner="nobody").uid == 65534
    for kwargs, message in (({"mode": "rw"}, "--mode"), ({"mode": "1777"}, "0..0777"),
                            ({"owner": "no-such-user"}, "--owner"),
                            ({"group": "no-such-group"}, "--group")):
        with pytest.raises(ValueError, match=message):
            SocketAccess.parse(**kwargs)


def test_listeners_shutdown_one_connection(tmp_path: Path) -> None:
    listeners = Listeners()
    a, b = socket.socketpair()
    ended = threading.Event()

    def serve(sock: socket.socket) -> None:
        _echo(sock)
        ended.set()

    assert listeners.serve(a, serve) is not None
    listeners.shutdown(a)
    assert ended.wait(2)
    assert b.recv(16) == b""
    b.close()
    listeners.close()
    c, d = socket.socketpair()
    assert listeners.serve(c, serve) is None  # closed: refused, and closed
    assert d.recv(16) == b""
    d.close()


def test_stop_flag() -> None:
    flag = StopFlag()
    assert not flag.wait(0.02)
    timer = threading.Timer(0.05, flag.set)
    timer.start()
    assert flag.wait(5)
    assert flag.is_set()
    timer.join()


class Backend:
    def __init__(self, answer: Callable[[VtpmRequest], VtpmResponse]) -> None:
        self.answer = answer
        self.closed = False

    def call(self, request: VtpmRequest) -> VtpmResponse:
        return self.answer(request)

    def transact(self, command: bytes, locality: int) -> bytes:
        response = self.answer(VtpmRequest.tpm_command(command, locality))
        if not response.success:
            raise RuntimeError(f"refused: {response.result:#x}")
        return response.payload

    def close(self) -> None:
        self.closed = True


def _broken(request: VtpmRequest) -> VtpmResponse:
    raise ConnectionError("instance gone")


def test_vmtpm_failures_become_tpm_errors() -> None:
    tpm = VmTpm(Backend(_broken))
    assert tpm.call(VtpmRequest(VtpmOp.STOP)).result == TpmResult.FAIL
    assert tpm.transact(wire.get_random(8)) == BACKEND_FAILURE_RESPONSE
    ok = Backend(lambda r: VtpmResponse.ok(bytes([r.locality]) + r.data))
    tpm = VmTpm(ok)
    tpm.locality = 3
    assert tpm.transact(b"cmd") == b"\x03cmd"
    assert tpm.transact(b"cmd", 1) == b"\x01cmd"
    tpm.close()
    assert ok.closed
    for answer in (VtpmResponse.error(TpmResult.BAD_ORDINAL), VtpmResponse.ok(b"")):

        def fixed(request: VtpmRequest, answer: VtpmResponse = answer) -> VtpmResponse:
            return answer

        tpm = VmTpm(Backend(fixed))
        assert tpm.transact(b"cmd") == BACKEND_FAILURE_RESPONSE  # refused, or no answer
