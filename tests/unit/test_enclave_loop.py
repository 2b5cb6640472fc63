"""The instance enclave's loop (sgxvtpm.enclaves.loop) and its admission of
sessions (sgxvtpm.mux.limits), in one process over real sockets.

The loop runs in the main thread (it installs signal handlers); the test
plays hostd from a second thread on the other end of the loop's stream, and
plays the clients with sans-IO sessions.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.channel import (
    ClientCredential,
    ClientSession,
    ClientTrust,
    EnclaveCredential,
    HandshakeComplete,
    Message,
    ServerSession,
)
from sgxvtpm.enclaves.loop import InstanceLoop, Session
from sgxvtpm.mux.limits import PREAUTH_MAX, SESSION_OUT_MAX, Admission, Verdict
from sgxvtpm.platform.base import EnclaveIdentity, MeasurementPolicy
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.wire.relay import RELAY_ASSIGNED, Frame, FrameType, RelayDecoder, encode

INSTANCE = EnclaveIdentity(mrenclave=b"\x33" * 32, mrsigner=b"\x22" * 32, isv_prod_id=2, isv_svn=1)
POLICY = MeasurementPolicy(mrenclaves=frozenset({INSTANCE.mrenclave}))
SID = RELAY_ASSIGNED  # hostd numbers the sessions it opens towards an enclave from here


# ------------------------------------------------------------------ Admission (pure)


def test_admission_takes_up_to_the_limit_then_refuses_within_the_grace() -> None:
    a = Admission(limit=2, grace=1.0, timeout=10.0)
    assert a.admit(1, 0.0) == Verdict(True)
    assert a.admit(2, 0.1) == Verdict(True)
    assert a.admit(3, 0.5) == Verdict(False)  # the oldest is younger than the grace
    assert a.admit(2, 0.5) == Verdict(False)  # already there
    assert len(a) == 2 and 3 not in a


def test_admission_evicts_the_oldest_past_the_grace() -> None:
    a = Admission(limit=2, grace=1.0, timeout=10.0)
    a.admit(1, 0.0)
    a.admit(2, 0.5)
    assert a.admit(3, 1.2) == Verdict(True, evicted=1)
    assert a.admit(4, 1.3) == Verdict(False)  # 2 is 0.8 s old
    assert a.admit(4, 1.5) == Verdict(True, evicted=2)
    assert 1 not in a and 2 not in a and 3 in a and 4 in a


def test_admission_done_frees_a_slot_and_expiry_is_oldest_first() -> None:
    a = Admission(limit=2, grace=1.0, timeout=10.0)
    a.admit(1, 0.0)
    a.admit(2, 3.0)
    a.done(1)
    a.done(99)  # unknown: nothing happens
    assert a.admit(3, 3.1) == Verdict(True)
    assert a.next_deadline() == 13.0
    assert a.expired(12.9) == []
    assert a.expired(13.05) == [2]
    assert a.next_deadline() == 13.1
    assert a.expired(20.0) == [3]
    assert a.next_deadline() is None and len(a) == 0


# ------------------------------------------------------------------ the loop


@dataclass
class World:
    pd: SimPlatformDir
    server: EnclaveCredential
    vm: ClientCredential

    def server_session(self) -> ServerSession:
        return ServerSession(self.server, ClientTrust([self.vm.cert_pem], frozenset(
            {self.vm.spki_sha256})))

    def client(self) -> ClientSession:
        return ClientSession(POLICY, self.pd.verifier(), self.vm, "instance")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base: Path = tmp_path_factory.mktemp("platform")
    pd = SimPlatformDir.open_or_create(base / "p")
    server = EnclaveCredential.create(pd.enclave_platform(INSTANCE), "instance")
    vm = ClientCredential.self_signed(ec.generate_private_key(ec.SECP256R1()), "vm")
    return World(pd, server, vm)


class Hostd:
    """The test's side of the loop's stream: frames in and out, blocking."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)
        self.decoder = RelayDecoder()
        self.others: list[Frame] = []  # frames for other sessions, met during a handshake

    def send(self, *frames: Frame) -> None:
        self.sock.sendall(b"".join(encode(f) for f in frames))

    def next_frame(self) -> Frame:
        while (frame := self.decoder.next_frame()) is None:
            data = self.sock.recv(65536)
            assert data, "the enclave closed its stream"
            self.decoder.receive_data(data)
        return frame

    def handshake(self, sid: int, client: ClientSession) -> None:
        """OPEN ``sid`` and run ``client``'s handshake through relay frames."""
        self.send(Frame.open(sid, "client"), Frame.data(sid, client.data_to_send()))
        self.complete_handshake(sid, client)

    def complete_handshake(self, sid: int, client: ClientSession) -> None:
        while True:
            frame = self.next_frame()
            if frame.session_id != sid:
                self.others.append(frame)
                continue
            assert frame.type is FrameType.DATA, frame
            client.receive_data(frame.payload)
            done = any(isinstance(e, HandshakeComplete) for e in client.events())
            if out := client.data_to_send():
                self.send(Frame.data(sid, out))
            if done:
                return

    def request(self, sid: int, client: ClientSession, payload: bytes) -> bytes:
        """One request in relay frames."""
        client.send_message(payload)
        self.send(Frame.data(sid, client.data_to_send()))
        while True:
            frame = self.next_frame()
            assert (frame.type, frame.session_id) == (FrameType.DATA, sid), frame
            client.receive_data(frame.payload)
            for event in client.events():
                if isinstance(event, Message):
                    return event.data

    def hand_off(self, sid: int) -> socket.socket:
        """HANDOFF ``sid`` with a new connection's descriptor; the client's end."""
        ours, theirs = socket.socketpair()
        header = encode(Frame(FrameType.HANDOFF, sid))
        socket.send_fds(self.sock, [header], [theirs.fileno()])
        theirs.close()
        ours.settimeout(10)
        return ours


def request(conn: socket.socket, client: ClientSession, payload: bytes) -> bytes:
    client.send_message(payload)
    conn.sendall(client.data_to_send())
    while True:
        for event in client.events():
            if isinstance(event, Message):
                return event.data
        data = conn.recv(65536)
        assert data, "the enclave closed the connection"
        client.receive_data(data)


def send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def echo(session: Session, data: bytes) -> bytes:
    return data


def run_loop(
    world: World,
    scenario: Callable[[Hostd], None],
    handler: Callable[[Session, bytes], bytes] = echo,
    admission: Admission | None = None,
    on_close: Callable[[Session], None] | None = None,
) -> None:
    """Run the loop here and ``scenario`` in a thread; re-raise what the scenario raised."""
    ours, theirs = socket.socketpair()
    given = {"admission": admission} if admission is not None else {}
    loop = InstanceLoop(theirs, world.server_session, handler, on_close=on_close, **given)
    failed: list[BaseException] = []

    def play() -> None:
        try:
            scenario(Hostd(ours))
        except BaseException as exc:
            failed.append(exc)
        finally:
            ours.close()  # ends the loop, even one stuck in a send

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGPIPE)}
    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    try:
        loop.run()
    finally:
        for s, handler_ in saved.items():
            signal.signal(s, handler_)
        theirs.close()
    thread.join(30)
    assert not thread.is_alive()
    if failed:
        raise failed[0]


def test_unauthenticated_sessions_are_capped(world: World) -> None:
    def scenario(hostd: Hostd) -> None:
        hostd.send(*(Frame.open(SID + i, "client") for i in range(PREAUTH_MAX + 8)))
        refused = [hostd.next_frame() for _ in range(8)]
        assert {(f.type, f.payload) for f in refused} == {(FrameType.CLOSE, b"busy")}
        assert {f.session_id for f in refused} == {SID + PREAUTH_MAX + i for i in range(8)}
        # A session that ends frees its slot: a newcomer gets in.
        hostd.send(Frame.close(SID))
        hostd.handshake(SID + 100, world.client())
        assert hostd.others[-1] == Frame.close(SID, "closed")  # after a TLS alert

    run_loop(world, scenario)


def test_a_newcomer_takes_the_slot_of_a_stale_handshake(world: World) -> None:
    def scenario(hostd: Hostd) -> None:
        hostd.send(Frame.open(SID, "client"), Frame.open(SID + 1, "client"))
        hostd.send(Frame.open(SID + 2, "client"))  # within the grace: refused
        assert hostd.next_frame() == Frame.close(SID + 2, "busy")
        time.sleep(0.3)
        hostd.handshake(SID + 3, world.client())  # past the grace: the oldest gives way
        assert hostd.others == [Frame.close(SID, "busy")]

    run_loop(world, scenario, admission=Admission(limit=2, grace=0.2, timeout=10))


def test_a_session_that_does_not_authenticate_in_time_is_closed(world: World) -> None:
    def scenario(hostd: Hostd) -> None:
        start = time.monotonic()
        hostd.send(Frame.open(SID, "client"))
        frame = hostd.next_frame()
        assert (frame.type, frame.session_id) == (FrameType.CLOSE, SID)
        assert frame.payload == b"handshake timeout"
        assert 0.25 <= time.monotonic() - start < 3

    run_loop(world, scenario, admission=Admission(timeout=0.3))


def test_the_loop_serves_handed_off_sessions_while_hostd_does_not_read(world: World) -> None:
    """hostd stops reading the stream: the loop must not block writing to it."""

    def scenario(hostd: Hostd) -> None:
        client = world.client()
        hostd.handshake(SID, client)
        with hostd.hand_off(SID) as conn:
            assert request(conn, client, b"before") == b"before"
            # Each OPEN past the cap costs the enclave a CLOSE frame to hostd,
            # which does not read them: far more than the socket holds.
            flood = b"".join(
                encode(Frame.open(SID + 1 + i, "client")) for i in range(PREAUTH_MAX + 60_000)
            )
            flooder = threading.Thread(target=send_quietly, args=(hostd.sock, flood))
            flooder.start()
            flooder.join(3)
            assert not flooder.is_alive(), "the enclave stopped reading its stream"
            conn.settimeout(3)
            start = time.monotonic()
            assert request(conn, client, b"after") == b"after"
            assert time.monotonic() - start < 2

    run_loop(world, scenario)


def test_a_client_that_does_not_read_its_replies_is_dropped(world: World) -> None:
    """Replies pile up on a handed-off connection nobody reads: that session goes,
    the loop goes on serving the others."""
    big = b"x" * (512 * 1024)

    def handler(session: Session, data: bytes) -> bytes:
        return big if data == b"big" else data

    def scenario(hostd: Hostd) -> None:
        reader, mute = world.client(), world.client()
        hostd.handshake(SID, reader)
        hostd.handshake(SID + 1, mute)
        with hostd.hand_off(SID) as reader_conn, hostd.hand_off(SID + 1) as mute_conn:
            # Requests whose replies are never read, until the enclave hangs up.
            sent = 0
            try:
                while sent < 4 * SESSION_OUT_MAX // len(big) + 64:
                    mute.send_message(b"big")
                    mute_conn.sendall(mute.data_to_send())
                    sent += 1
                    start = time.monotonic()
                    assert request(reader_conn, reader, b"ping") == b"ping"
                    assert time.monotonic() - start < 2
            except (BrokenPipeError, ConnectionResetError):
                pass
            else:
                pytest.fail("the enclave kept a client that does not read")
            assert sent * len(big) > SESSION_OUT_MAX  # not dropped for anything else
            assert request(reader_conn, reader, b"still") == b"still"

    run_loop(world, scenario, handler)



def test_a_handoff_before_authentication_is_refused(world: World) -> None:
    """hostd (untrusted) hands off a session whose client has not authenticated:
    the enclave closes that descriptor, and the session goes on in frames."""

    def scenario(hostd: Hostd) -> None:
        client = world.client()
        hostd.send(Frame.open(SID, "client"), Frame.data(SID, client.data_to_send()))
        with hostd.hand_off(SID) as conn:
            assert conn.recv(1) == b""  # closed by the enclave, unused
        hostd.complete_handshake(SID, client)
        assert hostd.request(SID, client, b"framed") == b"framed"

    run_loop(world, scenario)


def test_a_handed_off_session_whose_descriptor_is_not_a_unix_socket_ends(world: World) -> None:
    closed: list[int] = []

    def scenario(hostd: Hostd) -> None:
        client = world.client()
        hostd.handshake(SID, client)
        assert hostd.request(SID, client, b"framed") == b"framed"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            header = encode(Frame(FrameType.HANDOFF, SID))
            socket.send_fds(hostd.sock, [header], [tcp.fileno()])
        deadline = time.monotonic() + 5
        while not closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert closed == [SID]

    run_loop(world, scenario, on_close=lambda session: closed.append(session.sid))
    assert closed == [SID]
