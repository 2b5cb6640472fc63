"""hostd's switch (sgxvtpm.host.switch) and the asyncio mux (sgxvtpm.mux.aio) in one
process, over real socketpairs."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.helpers.relay_process import serve_sessions

from sgxvtpm.channel import (
    ChannelError,
    ClientCredential,
    ClientSession,
    ClientTrust,
    EnclaveCredential,
    HandshakeComplete,
    PeerCertificate,
    ServerSession,
)
from sgxvtpm.channel.session import MAX_MESSAGE
from sgxvtpm.host.switch import Connection, Relay
from sgxvtpm.mux.aio import AsyncSession, RelayMux, open_client_session
from sgxvtpm.mux.limits import (
    CLIENT_SESSIONS_MAX,
    CONTROL_QUEUE_MAX,
    PENDING_OPENS_MAX,
    PREAUTH_MAX,
    SESSION_INBOX_MAX,
    STREAM_OUT_MAX,
    SWITCH_OUT_MAX,
    Admission,
)
from sgxvtpm.platform.base import EnclaveIdentity, MeasurementPolicy, VerifiedQuote
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.wire.relay import (
    MAX_PAYLOAD,
    RELAY_ASSIGNED,
    Frame,
    FrameType,
    RelayDecoder,
    encode,
)

T = TypeVar("T")
MANAGER = EnclaveIdentity(mrenclave=b"\x11" * 32, mrsigner=b"\x22" * 32, isv_prod_id=1, isv_svn=1)
POLICY = MeasurementPolicy(mrenclaves=frozenset({MANAGER.mrenclave}))


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(bounded())


@dataclass
class Setup:
    pd: SimPlatformDir
    manager: EnclaveCredential
    operator: ClientCredential
    stranger: ClientCredential

    def trust(self) -> ClientTrust:
        return ClientTrust([self.operator.cert_pem], frozenset({self.operator.spki_sha256}))

    def client(self, cred: ClientCredential | None = None) -> ClientSession:
        return ClientSession(POLICY, self.pd.verifier(), cred or self.operator, "manager")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    base: Path = tmp_path_factory.mktemp("platform")
    pd = SimPlatformDir.open_or_create(base / "p")
    manager = EnclaveCredential.create(pd.enclave_platform(MANAGER), "manager", is_ca=True)
    op = ClientCredential.self_signed(ec.generate_private_key(ec.SECP256R1()), "operator")
    stranger = ClientCredential.self_signed(ec.generate_private_key(ec.SECP256R1()), "x")
    return Setup(pd, manager, op, stranger)


@dataclass
class Hub:
    """A relay with helpers to attach socketpair connections to it."""

    relay: Relay
    seen: bytearray = field(default_factory=bytearray)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    raw: list[socket.socket] = field(default_factory=list)

    async def attach(
        self, *, kind: str = "client", name: str | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ours, theirs = socket.socketpair()
        r, w = await asyncio.open_connection(sock=theirs)
        self.tasks.append(asyncio.create_task(self.relay.serve(r, w, kind=kind, name=name)))
        pair = await asyncio.open_connection(sock=ours)
        self.writers.append(pair[1])  # keep our end alive (and close it at the end)
        return pair

    async def attach_raw(self) -> socket.socket:
        """A client connection as a plain blocking socket (one a test can leave unread)."""
        ours, theirs = socket.socketpair()
        r, w = await asyncio.open_connection(sock=theirs)
        self.tasks.append(asyncio.create_task(self.relay.serve(r, w, kind="client")))
        self.raw.append(ours)
        return ours

    async def close(self) -> None:
        for s in self.raw:
            s.close()
        await self.relay.aclose()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()


ControlFn = Callable[[Connection, dict[str, Any]], Awaitable[dict[str, Any]]]


def make_hub(on_control: ControlFn | None = None) -> Hub:
    hub = Hub(Relay(on_control))
    hub.relay._observer = hub.seen.extend
    return hub


async def echo(session: AsyncSession) -> None:
    while True:
        msg = await session.recv()
        await session.send(b"echo:" + msg)


async def start_enclave(hub: Hub, setup: Setup, name: str = "manager") -> asyncio.Task[None]:
    r, w = await hub.attach(kind="enclave", name=name)

    def factory(source: str) -> ServerSession:
        return ServerSession(setup.manager, setup.trust())

    return asyncio.create_task(serve_sessions(r, w, factory, echo))


def test_round_trip_through_the_relay_carries_no_plaintext(setup: Setup) -> None:
    async def main() -> None:
        hub = make_hub()
        enclave = await start_enclave(hub, setup)
        r, w = await hub.attach()
        session = await open_client_session(r, w, setup.client(), "manager")
        assert isinstance(session.peer, VerifiedQuote)
        marker = secrets.token_bytes(32)
        await session.send(marker)
        assert await session.recv() == b"echo:" + marker
        big = secrets.token_bytes(600_000)  # several DATA frames, many records
        await session.send(big)
        assert await session.recv() == b"echo:" + big
        await session.close()
        assert len(hub.seen) > 600_000
        assert marker not in hub.seen and big[1000:1032] not in hub.seen
        enclave.cancel()
        await hub.close()

    run(main())


def test_many_sessions_on_one_target_and_one_connection(setup: Setup) -> None:
    async def main() -> None:
        hub = make_hub()
        await start_enclave(hub, setup, "manager")
        await start_enclave(hub, setup, "instance-1")
        r, w = await hub.attach()
        mux = RelayMux(r, w)
        mux.start()
        sessions = [await mux.open(t, setup.client()) for t in ["manager", "instance-1"] * 3]
        assert len({s.session_id for s in sessions}) == 6
        for i, s in enumerate(sessions):
            await s.send(b"%d" % i)
        for i, s in enumerate(sessions):
            assert await s.recv() == b"echo:%d" % i
        for s in sessions:
            await s.close()
        await mux.aclose()
        await hub.close()

    run(main())


def test_unpinned_client_is_refused_and_the_handler_never_runs(setup: Setup) -> None:
    async def main() -> None:
        hub = make_hub()
        handled: list[PeerCertificate | VerifiedQuote | None] = []

        async def handler(session: AsyncSession) -> None:
            handled.append(session.peer)

        r, w = await hub.attach(kind="enclave", name="manager")
        factory = lambda source: ServerSession(setup.manager, setup.trust())  # noqa: E731
        task = asyncio.create_task(serve_sessions(r, w, factory, handler))
        r2, w2 = await hub.attach()
        marker = secrets.token_bytes(32)
        with pytest.raises(ChannelError):
            session = await open_client_session(r2, w2, setup.client(setup.stranger), "manager")
            await session.send(marker)
            await session.recv()
        assert handled == []
        assert marker not in hub.seen
        task.cancel()
        await hub.close()

    run(main())


async def raw_peer(hub: Hub, **kw: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await hub.attach(**kw)


_decoders: weakref.WeakKeyDictionary[asyncio.StreamReader, RelayDecoder] = (
    weakref.WeakKeyDictionary()
)


async def read_frame(r: asyncio.StreamReader) -> tuple[FrameType, int, bytes] | None:
    """One frame from a raw peer's stream; None at a clean end."""
    decoder = _decoders.setdefault(r, RelayDecoder())
    while (frame := decoder.next_frame()) is None:
        if decoder.at_clean_end:
            return None
        decoder.receive_data(await r.read(65536))
    return frame.type, frame.session_id, frame.payload


async def next_frame(r: asyncio.StreamReader) -> tuple[FrameType, int, bytes] | None:
    return await asyncio.wait_for(read_frame(r), 5)


def test_open_to_unknown_target_is_closed(setup: Setup) -> None:
    async def main() -> None:
        hub = make_hub()
        r, w = await raw_peer(hub)
        w.write(encode(Frame.open(7, "nobody")))
        assert await next_frame(r) == (FrameType.CLOSE, 7, b"no such target")
        # And through the client helper: no handshake, ChannelError.
        r2, w2 = await raw_peer(hub)
        with pytest.raises(ChannelError):
            await open_client_session(r2, w2, setup.client(), "nobody")
        await hub.close()

    run(main())


def test_frames_are_mapped_and_forwarded_both_ways() -> None:
    async def main() -> None:
        hub = make_hub()
        tr, tw = await raw_peer(hub, kind="enclave", name="manager")
        cr, cw = await raw_peer(hub)
        cw.write(encode(Frame.open(5, "manager")))
        ftype, tsid, label = await next_frame(tr) or (None, 0, b"")
        assert (ftype, label) == (FrameType.OPEN, b"client")
        assert tsid >= RELAY_ASSIGNED
        cw.write(encode(Frame.data(5, b"to target")))
        assert await next_frame(tr) == (FrameType.DATA, tsid, b"to target")
        tw.write(encode(Frame.data(tsid, b"to client")))
        assert await next_frame(cr) == (FrameType.DATA, 5, b"to client")
        tw.write(encode(Frame.close(tsid, "bye")))
        assert await next_frame(cr) == (FrameType.CLOSE, 5, b"bye")
        # The session is gone: further DATA is dropped, not forwarded.
        cw.write(encode(Frame.data(5, b"late")))
        cw.write(encode(Frame.open(6, "manager")))
        ftype, tsid2, _ = await next_frame(tr) or (None, 0, b"")
        assert ftype is FrameType.OPEN and tsid2 != tsid
        await hub.close()

    run(main())


def test_dead_connection_closes_all_its_sessions() -> None:
    async def main() -> None:
        hub = make_hub()
        tr, tw = await raw_peer(hub, kind="enclave", name="manager")
        clients = [await raw_peer(hub) for _ in range(3)]
        for _, w in clients:
            w.write(encode(Frame.open(1, "manager")))
        for _ in clients:
            assert (await next_frame(tr) or (None,))[0] is FrameType.OPEN
        tw.close()
        for r, _ in clients:
            assert await next_frame(r) == (FrameType.CLOSE, 1, b"peer gone")
        # The name is free again; a new open finds no target.
        r, w = clients[0]
        w.write(encode(Frame.open(2, "manager")))
        assert await next_frame(r) == (FrameType.CLOSE, 2, b"no such target")
        await hub.close()

    run(main())


def test_malformed_frame_drops_only_that_connection() -> None:
    async def main() -> None:
        hub = make_hub()
        tr, _tw = await raw_peer(hub, kind="enclave", name="manager")
        _good_r, good_w = await raw_peer(hub)
        bad_r, bad_w = await raw_peer(hub)
        good_w.write(encode(Frame.open(1, "manager")))
        bad_w.write(encode(Frame.open(1, "manager")))
        _, sid_good, _ = await next_frame(tr) or (None, 0, b"")
        _, sid_bad, _ = await next_frame(tr) or (None, 0, b"")
        bad_w.write(b"\x09" + bytes(8))  # unknown frame type
        assert await next_frame(bad_r) is None  # the relay hung up on it
        assert await next_frame(tr) == (FrameType.CLOSE, sid_bad, b"peer gone")
        good_w.write(encode(Frame.data(1, b"still here")))
        assert await next_frame(tr) == (FrameType.DATA, sid_good, b"still here")
        await hub.close()

    run(main())


@pytest.mark.parametrize(
    "frame",
    [
        Frame.open(RELAY_ASSIGNED, "manager"),  # an id from the relay's half
        Frame.open(3, "manager"),  # sent twice, see below
    ],
)
def test_session_id_misuse_drops_the_connection(frame: Frame) -> None:
    async def main() -> None:
        hub = make_hub()
        await raw_peer(hub, kind="enclave", name="manager")
        r, w = await raw_peer(hub)
        w.write(encode(frame) * 2)
        while (got := await next_frame(r)) is not None:
            assert got[0] is FrameType.CLOSE
        await hub.close()

    run(main())


def test_control_requests_reach_the_callback() -> None:
    async def main() -> None:
        calls: list[tuple[str, dict[str, Any]]] = []

        async def on_control(conn: Connection, obj: dict[str, Any]) -> dict[str, Any]:
            calls.append((conn.label, obj))
            if obj.get("op") == "fail":
                raise RuntimeError("boom")
            return {"ok": True, "op": obj.get("op")}

        hub = make_hub(on_control)
        r, w = await raw_peer(hub)
        mux = RelayMux(r, w)
        mux.start()
        assert await mux.control({"op": "launch", "name": "i-1"}) == {
            "ok": True,
            "op": "launch",
            "id": 1,
        }
        assert (await mux.control({"op": "fail"}))["error"] == "internal error"
        assert calls[0] == ("client", {"op": "launch", "name": "i-1", "id": 1})
        await mux.aclose()
        await hub.close()

    run(main())


def test_a_relay_without_a_control_handler_refuses_every_request() -> None:
    async def main() -> None:
        hub = make_hub()
        r, w = await raw_peer(hub)
        mux = RelayMux(r, w)
        mux.start()
        assert await mux.control({"op": "launch"}) == {"error": "no control handler", "id": 1}
        assert await mux.control({"op": "ping"}) == {"error": "no control handler", "id": 2}
        await mux.aclose()
        await hub.close()

    run(main())


def test_register_refuses_a_live_name() -> None:
    async def main() -> None:
        hub = make_hub()
        await raw_peer(hub, kind="enclave", name="manager")
        await asyncio.sleep(0.01)
        conn = Connection(asyncio.StreamReader(), None, "client")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="already registered"):
            hub.relay.register(conn, "manager")
        await hub.close()

    run(main())


def test_clean_close_is_eof_not_an_error(setup: Setup) -> None:
    async def main() -> None:
        hub = make_hub()

        async def say_bye(session: AsyncSession) -> None:
            await session.send(b"bye")  # then the mux closes the session cleanly

        r, w = await hub.attach(kind="enclave", name="manager")
        factory = lambda source: ServerSession(setup.manager, setup.trust())  # noqa: E731
        task = asyncio.create_task(serve_sessions(r, w, factory, say_bye))
        r2, w2 = await hub.attach()
        session = await open_client_session(r2, w2, setup.client(), "manager")
        assert await session.recv() == b"bye"
        for _ in range(2):
            with pytest.raises(EOFError):
                await session.recv()
        await session.close()
        task.cancel()
        await hub.close()

    run(main())


# ------------------------------------------------------------------ limits (sgxvtpm.mux.limits)


async def frames_until(
    r: asyncio.StreamReader, done: Callable[[list[tuple[FrameType, int, bytes]]], bool]
) -> list[tuple[FrameType, int, bytes]]:
    got: list[tuple[FrameType, int, bytes]] = []
    while not done(got):
        frame = await next_frame(r)
        assert frame is not None, got
        got.append(frame)
    return got


def opens(target: str, n: int) -> bytes:
    """OPEN frames for sessions 1..n."""
    return b"".join(encode(Frame.open(i, target)) for i in range(1, n + 1))


def test_a_client_that_does_not_read_is_dropped_and_the_enclave_stream_keeps_flowing() -> None:
    async def main() -> None:
        hub = make_hub()
        tr, tw = await raw_peer(hub, kind="enclave", name="manager")
        mute = await hub.attach_raw()
        mute.sendall(encode(Frame.open(1, "manager")))
        _, mute_sid, _ = await next_frame(tr) or (None, 0, b"")
        cr, cw = await raw_peer(hub)
        cw.write(encode(Frame.open(1, "manager")))
        _, good_sid, _ = await next_frame(tr) or (None, 0, b"")
        # More for the mute client than its socket and SWITCH_OUT_MAX hold together,
        # then a few bytes for the other client, on the same enclave stream.
        chunk = bytes(MAX_PAYLOAD)
        for _ in range(2 * SWITCH_OUT_MAX // MAX_PAYLOAD + 4):
            tw.write(encode(Frame.data(mute_sid, chunk)))
        tw.write(encode(Frame.data(good_sid, b"not held up")))
        assert await next_frame(cr) == (FrameType.DATA, 1, b"not held up")
        assert await next_frame(tr) == (FrameType.CLOSE, mute_sid, b"peer gone")
        # The mute client's connection is gone; what it was owed is not kept.
        mute.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while mute.recv(1 << 20):
                pass
        await hub.close()

    run(main())


def test_control_requests_are_answered_one_at_a_time_in_order() -> None:
    async def main() -> None:
        running: list[int] = []
        most = 0

        async def on_control(conn: Connection, obj: dict[str, Any]) -> dict[str, Any]:
            nonlocal most
            running.append(obj["id"])
            most = max(most, len(running))
            await asyncio.sleep(0.1 if obj["op"] == "slow" else 0)
            running.remove(obj["id"])
            return {"ok": True}

        hub = make_hub(on_control)
        r, w = await raw_peer(hub)
        ops = ["slow", "fast", "fast"]
        w.write(b"".join(encode(Frame.control({"op": op, "id": i})) for i, op in enumerate(ops)))
        got = await frames_until(r, lambda got: len(got) == len(ops))
        ids = [Frame(t, sid, p).control_object()["id"] for t, sid, p in got]
        assert ids == [0, 1, 2] and most == 1
        await hub.close()

    run(main())


def test_a_connection_that_floods_control_requests_is_dropped() -> None:
    async def main() -> None:
        async def on_control(conn: Connection, obj: dict[str, Any]) -> dict[str, Any]:
            return {"ok": True}

        hub = make_hub(on_control)
        r, w = await raw_peer(hub)
        w.write(encode(Frame.control({"op": "ping"})) * 1000)
        replies = 0
        while await next_frame(r) is not None:  # until the relay hangs up
            replies += 1
        assert replies <= CONTROL_QUEUE_MAX
        await hub.close()

    run(main())


def test_a_client_holds_at_most_client_sessions_max_sessions() -> None:
    async def main() -> None:
        hub = make_hub()
        tr, _tw = await raw_peer(hub, kind="enclave", name="manager")
        r, w = await raw_peer(hub)
        w.write(opens("manager", CLIENT_SESSIONS_MAX + 1))
        assert await next_frame(r) is None  # one too many: the connection is dropped
        got = await frames_until(tr, lambda got: len(got) == 2 * CLIENT_SESSIONS_MAX)
        assert [t for t, _, _ in got] == [FrameType.OPEN] * CLIENT_SESSIONS_MAX + [
            FrameType.CLOSE
        ] * CLIENT_SESSIONS_MAX
        await hub.close()

    run(main())


def test_opens_a_target_has_not_answered_are_bounded() -> None:
    async def main() -> None:
        hub = make_hub()
        tr, tw = await raw_peer(hub, kind="enclave", name="manager")
        clients = [await raw_peer(hub) for _ in range(PENDING_OPENS_MAX // CLIENT_SESSIONS_MAX + 1)]
        for _, w in clients:
            w.write(opens("manager", CLIENT_SESSIONS_MAX))
        opened = await frames_until(tr, lambda got: len(got) == PENDING_OPENS_MAX)
        assert {t for t, _, _ in opened} == {FrameType.OPEN}
        last_r, last_w = clients[-1]
        refused = await frames_until(last_r, lambda got: len(got) == CLIENT_SESSIONS_MAX)
        assert {(t, p) for t, _, p in refused} == {(FrameType.CLOSE, b"busy")}
        # The target answers one: there is room for one more OPEN.
        tw.write(encode(Frame.data(opened[0][1], b"hello")))
        last_w.write(encode(Frame.open(1, "manager")))
        assert (await next_frame(tr) or (None,))[0] is FrameType.OPEN
        await hub.close()

    run(main())


async def mux_on_a_stream(
    setup: Setup, handler: Callable[[AsyncSession], Awaitable[None]], **kw: Any
) -> tuple[RelayMux, asyncio.StreamReader, asyncio.StreamWriter]:
    """An enclave's mux on a socketpair whose other end the test holds, as hostd."""
    ours, theirs = socket.socketpair()
    mr, mw = await asyncio.open_connection(sock=theirs)
    mux = RelayMux(
        mr, mw, session_factory=lambda source: ServerSession(setup.manager, setup.trust()),
        handler=handler, **kw,
    )
    mux.start()
    r, w = await asyncio.open_connection(sock=ours)
    return mux, r, w


async def handshake_as_hostd(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, sid: int, client: ClientSession
) -> None:
    w.write(encode(Frame.open(sid, "client")) + encode(Frame.data(sid, client.data_to_send())))
    while True:
        ftype, fsid, payload = await next_frame(r) or (None, 0, b"")
        assert (ftype, fsid) == (FrameType.DATA, sid)
        client.receive_data(payload)
        done = any(isinstance(e, HandshakeComplete) for e in client.events())
        if out := client.data_to_send():
            w.write(encode(Frame.data(sid, out)))
        if done:
            return


async def close_mux(mux: RelayMux, w: asyncio.StreamWriter) -> None:
    await mux.aclose()
    w.close()
    with contextlib.suppress(ConnectionError):
        await w.wait_closed()


def test_the_mux_caps_unauthenticated_sessions(setup: Setup) -> None:
    async def main() -> None:
        mux, r, w = await mux_on_a_stream(setup, echo)
        extra = 5
        w.write(b"".join(
            encode(Frame.open(RELAY_ASSIGNED + i, "client")) for i in range(PREAUTH_MAX + extra)
        ))
        got = await frames_until(r, lambda got: len(got) == extra)
        assert {(t, p) for t, _, p in got} == {(FrameType.CLOSE, b"busy")}
        refused = {RELAY_ASSIGNED + PREAUTH_MAX + i for i in range(extra)}
        assert {sid for _, sid, _ in got} == refused
        await close_mux(mux, w)

    run(main())


def test_the_mux_evicts_a_stale_handshake_and_closes_late_ones(setup: Setup) -> None:
    async def main() -> None:
        admission = Admission(limit=1, grace=0.1, timeout=0.5)
        mux, r, w = await mux_on_a_stream(setup, echo, admission=admission)
        a, b, c = RELAY_ASSIGNED, RELAY_ASSIGNED + 1, RELAY_ASSIGNED + 2
        w.write(encode(Frame.open(a, "client")) + encode(Frame.open(b, "client")))
        assert await next_frame(r) == (FrameType.CLOSE, b, b"busy")  # within the grace
        await asyncio.sleep(0.2)
        w.write(encode(Frame.open(c, "client")))
        assert await next_frame(r) == (FrameType.CLOSE, a, b"busy")  # a gave way to c
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await next_frame(r) == (FrameType.CLOSE, c, b"handshake timeout")
        assert 0.2 < loop.time() - start < 2
        await close_mux(mux, w)

    run(main())


def test_a_session_sent_more_than_it_reads_is_closed(setup: Setup) -> None:
    async def main() -> None:
        async def never_reads(session: AsyncSession) -> None:
            await asyncio.Event().wait()

        hub = make_hub()
        r, w = await hub.attach(kind="enclave", name="manager")
        factory = lambda source: ServerSession(setup.manager, setup.trust())  # noqa: E731
        task = asyncio.create_task(serve_sessions(r, w, factory, never_reads))
        r2, w2 = await hub.attach()
        session = await open_client_session(r2, w2, setup.client(), "manager")
        for _ in range(SESSION_INBOX_MAX // MAX_MESSAGE + 1):
            await session.send(bytes(MAX_MESSAGE))
        with pytest.raises(ChannelError):  # the enclave hung up
            await asyncio.wait_for(session.recv(), 5)
        await session.close()
        task.cancel()
        await hub.close()

    run(main())


def test_the_mux_never_waits_for_hostd(setup: Setup) -> None:
    """hostd stops reading: a session's replies fail instead of blocking its handler."""

    async def main() -> None:
        failed = asyncio.Event()

        async def big_replies(session: AsyncSession) -> None:
            try:
                while True:
                    await session.recv()
                    await session.send(bytes(MAX_MESSAGE))
            except ChannelError:
                failed.set()

        mux, r, w = await mux_on_a_stream(setup, big_replies)
        client = setup.client()
        await handshake_as_hostd(r, w, RELAY_ASSIGNED, client)
        for _ in range(STREAM_OUT_MAX // MAX_MESSAGE + 4):  # never reading the replies
            client.send_message(b"again")
            w.write(encode(Frame.data(RELAY_ASSIGNED, client.data_to_send())))
        await asyncio.wait_for(failed.wait(), 5)
        assert mux.backlog <= STREAM_OUT_MAX
        await close_mux(mux, w)

    run(main())
