"""The relay: hostd's untrusted message switch, and thin asyncio ends for it.

:class:`Relay` joins connections (asyncio stream pairs: client sockets,
enclave streams) and moves relay frames (:mod:`sgxvtpm.wire.relay`) between
them. It never holds a key and never looks into DATA: what it carries are
TLS records of attested sessions (DESIGN.md S1). A connection registered
under a name ("manager", an instance id) is a *target*; OPEN(target) from
another connection creates a session between the two:

- the opener's session id maps to a fresh id on the target's connection
  (>= RELAY_ASSIGNED), and the target receives OPEN(label of the opener:
  its registered name, else its kind, e.g. "client");
- DATA is forwarded both ways, CLOSE tears down both halves, a connection
  that dies closes all its sessions ("peer gone"), OPEN to an unknown
  target is answered CLOSE("no such target");
- CONTROL frames (session 0) go to ``on_control(conn, obj)`` whose reply is
  sent back as CONTROL; a request's ``"id"`` is echoed in the reply.
A malformed frame ends the offending connection only (S8).

:class:`RelayMux` is the other end of one relay connection, for clients
and for enclaves: it opens client sessions (:meth:`RelayMux.open`), serves
incoming ones (``session_factory`` + ``handler``), and exchanges CONTROL
messages. :class:`AsyncSession` wraps one sans-IO session on it.

``python -m sgxvtpm.host.relay --listen PATH`` runs a standalone relay on a
unix socket (used by the integration tests): any connection may register
itself as a target with CONTROL {"op": "register", "name": ...}. That is
safe because the relay is untrusted anyway: a fake "manager" fails the
client's quote check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from sgxvtpm.channel import (
    ChannelError,
    ChannelUsageError,
    ClientSession,
    Closed,
    HandshakeComplete,
    Message,
    PeerCertificate,
    ServerSession,
)
from sgxvtpm.platform.base import VerifiedQuote
from sgxvtpm.wire.relay import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    RELAY_ASSIGNED,
    Frame,
    FrameType,
    RelayProtocolError,
    check_payload,
    encode_header,
    parse_header,
)

log = logging.getLogger("sgxvtpm.relay")

ControlHandler = Callable[["Connection", dict[str, Any]], Awaitable[dict[str, Any]]]
Observer = Callable[[bytes], None]

_NO_TARGET = b"no such target"
_PEER_GONE = b"peer gone"


async def _read_frame(
    reader: asyncio.StreamReader, observe: Observer | None = None
) -> tuple[FrameType, int, bytes] | None:
    """One frame from ``reader``: None at a clean end of stream."""
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise RelayProtocolError("stream ended inside a frame header") from None
        return None
    if observe is not None:
        observe(header)
    ftype, session_id, length = parse_header(header)
    try:
        payload = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        raise RelayProtocolError("stream ended inside a frame payload") from None
    if observe is not None and payload:
        observe(payload)
    if ftype is not FrameType.DATA:
        check_payload(ftype, payload)
    return ftype, session_id, payload


def _write_frame(
    writer: asyncio.StreamWriter, ftype: FrameType, session_id: int, payload: bytes
) -> None:
    # Two writes, no concatenation: the transport buffers them together.
    writer.write(encode_header(ftype, session_id, len(payload)))
    if payload:
        writer.write(payload)


class Connection:
    """One stream attached to the relay."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.kind = kind
        self.name: str | None = None
        self.closed = False
        self.accepts_handoff = False  # an enclave that takes sessions' connections
        # local session id -> (other connection, its session id)
        self.sessions: dict[int, tuple[Connection, int]] = {}
        self._ids = itertools.count(RELAY_ASSIGNED)

    @property
    def label(self) -> str:
        """How this connection is named to the targets it opens sessions with."""
        return self.name or self.kind

    def allocate_session_id(self) -> int:
        while True:
            sid = next(self._ids)
            if sid > 0xFFFF_FFFF:
                self._ids = itertools.count(RELAY_ASSIGNED)
                continue
            if sid not in self.sessions:
                return sid

    def send(self, ftype: FrameType, session_id: int, payload: bytes) -> None:
        if self.closed or self.writer.is_closing():
            return
        _write_frame(self.writer, ftype, session_id, payload)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionError:
            self.closed = True

    def __repr__(self) -> str:
        return f"Connection({self.label!r}, sessions={len(self.sessions)})"


class Relay:
    """Moves frames between attached connections; see the module docstring."""

    def __init__(
        self, on_control: ControlHandler | None = None, *, observer: Observer | None = None
    ) -> None:
        self._on_control = on_control
        self._observer = observer
        self._targets: dict[str, Connection] = {}
        self._connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def targets(self) -> dict[str, Connection]:
        return dict(self._targets)

    def register(self, conn: Connection, name: str) -> None:
        """Make ``conn`` reachable as OPEN(``name``). ValueError if taken."""
        current = self._targets.get(name)
        if current is not None and current is not conn and not current.closed:
            raise ValueError(f"target {name!r} is already registered")
        if conn.name is not None and self._targets.get(conn.name) is conn:
            del self._targets[conn.name]
        conn.name = name
        self._targets[name] = conn

    async def serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        kind: str = "client",
        name: str | None = None,
        accepts_handoff: bool = False,
    ) -> None:
        """Run one connection until it ends; then close all its sessions."""
        conn = Connection(reader, writer, kind)
        conn.accepts_handoff = accepts_handoff
        self._connections.add(conn)
        try:
            if name is not None:
                self.register(conn, name)
            await self._loop(conn)
        except RelayProtocolError as exc:
            log.warning("relay: dropping %r: %s", conn, exc)
        except ConnectionError as exc:
            log.debug("relay: %r lost: %s", conn, exc)
        finally:
            self._drop(conn)

    async def _loop(self, conn: Connection) -> None:
        while (frame := await _read_frame(conn.reader, self._observer)) is not None:
            ftype, sid, payload = frame
            if ftype is FrameType.DATA:
                entry = conn.sessions.get(sid)
                if entry is None:
                    continue  # crossed a CLOSE in flight
                peer, peer_sid = entry
                peer.send(FrameType.DATA, peer_sid, payload)
                await peer.drain()  # back-pressure from a slow reader
            elif ftype is FrameType.OPEN:
                self._open(conn, sid, payload.decode("utf-8"))
            elif ftype is FrameType.CLOSE:
                self._close(conn, sid, payload)
            elif ftype is FrameType.HANDOFF:
                raise RelayProtocolError("HANDOFF is the relay's to send")
            else:
                request = Frame(ftype, sid, payload).control_object()
                if request.get("op") == "handoff":
                    if await self._handoff(conn, request):
                        return  # the connection now belongs to the enclave
                else:
                    self._control(conn, request)

    async def _handoff(self, conn: Connection, request: dict[str, Any]) -> bool:
        """Pass ``conn`` to the enclave at the other end of its only session.

        Done inline, before another frame of ``conn`` is read: the client sends
        nothing after asking until it has the answer, so every byte it sent
        before was forwarded, and every byte after goes to the enclave.
        """
        sid = request.get("session")
        entry = conn.sessions.get(sid) if isinstance(sid, int) else None
        ok = entry is not None and len(conn.sessions) == 1 and entry[0].accepts_handoff
        if entry is not None and ok:
            target, target_sid = entry
            ok = await self._pass_connection(conn, target, target_sid)
            if ok:
                conn.sessions.clear()
                target.sessions.pop(target_sid, None)
        reply = Frame.control({"ok": ok, **({"id": request["id"]} if "id" in request else {})})
        conn.send(reply.type, reply.session_id, reply.payload)
        await conn.drain()
        return ok

    async def _pass_connection(self, conn: Connection, target: Connection, sid: int) -> bool:
        client = conn.writer.get_extra_info("socket")
        stream = target.writer.get_extra_info("socket")
        if client is None or stream is None or target.closed:
            return False
        # Everything already queued for the enclave must precede HANDOFF.
        await target.drain()
        while target.writer.transport.get_write_buffer_size():
            await asyncio.sleep(0.001)
        header = encode_header(FrameType.HANDOFF, sid, 0)
        with socket.socket(fileno=os.dup(stream.fileno())) as raw:
            while True:
                try:
                    socket.send_fds(raw, [header], [client.fileno()])
                    return True
                except BlockingIOError:
                    await asyncio.sleep(0.001)
                except OSError as exc:
                    log.warning("relay: handoff to %r failed: %s", target, exc)
                    return False

    def _open(self, conn: Connection, sid: int, target_name: str) -> None:
        if sid >= RELAY_ASSIGNED:
            raise RelayProtocolError(f"OPEN with relay-assigned session id {sid:#x}")
        if sid in conn.sessions:
            raise RelayProtocolError(f"OPEN of session {sid} which is open")
        target = self._targets.get(target_name)
        if target is None or target.closed or target is conn:
            conn.send(FrameType.CLOSE, sid, _NO_TARGET)
            return
        peer_sid = target.allocate_session_id()
        conn.sessions[sid] = (target, peer_sid)
        target.sessions[peer_sid] = (conn, sid)
        target.send(FrameType.OPEN, peer_sid, conn.label.encode("utf-8"))
        log.debug("relay: session %s/%d -> %s/%d", conn.label, sid, target.label, peer_sid)

    def _close(self, conn: Connection, sid: int, reason: bytes) -> None:
        entry = conn.sessions.pop(sid, None)
        if entry is None:
            return
        peer, peer_sid = entry
        peer.sessions.pop(peer_sid, None)
        peer.send(FrameType.CLOSE, peer_sid, reason)

    def _control(self, conn: Connection, request: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(conn, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, conn: Connection, request: dict[str, Any]) -> None:
        if self._on_control is None:
            reply: dict[str, Any] = {"error": "no control handler"}
        else:
            try:
                reply = dict(await self._on_control(conn, request))
            except Exception:
                log.exception("relay: control handler failed")
                reply = {"error": "internal error"}
        if "id" in request:
            reply["id"] = request["id"]
        frame = Frame.control(reply)
        conn.send(frame.type, frame.session_id, frame.payload)

    def _drop(self, conn: Connection) -> None:
        conn.closed = True
        self._connections.discard(conn)
        if conn.name is not None and self._targets.get(conn.name) is conn:
            del self._targets[conn.name]
        sessions, conn.sessions = conn.sessions, {}
        for peer, peer_sid in sessions.values():
            peer.sessions.pop(peer_sid, None)
            peer.send(FrameType.CLOSE, peer_sid, _PEER_GONE)
        conn.writer.close()

    async def aclose(self) -> None:
        """Close every connection and cancel pending control requests."""
        for conn in list(self._connections):
            self._drop(conn)
        for task in list(self._tasks):
            task.cancel()


# --------------------------------------------------------------------------
# The endpoint side: sessions over one relay connection.

SessionFactory = Callable[[str], ServerSession | None]
SessionHandler = Callable[["AsyncSession"], Awaitable[None]]


class AsyncSession:
    """One attested session on a :class:`RelayMux` (asyncio face of the
    sans-IO session). Errors: :class:`ChannelError` (the peer or the relay
    misbehaved; the session is over), :class:`EOFError` from :meth:`recv`
    when the peer closed cleanly."""

    def __init__(self, mux: RelayMux, session_id: int, session: ClientSession | ServerSession):
        self._mux = mux
        self._sid = session_id
        self._session = session
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._eof_fed = False
        self._finished = False
        self._peer_closed = False
        self.owns_mux = False

    @property
    def peer(self) -> PeerCertificate | VerifiedQuote | None:
        return self._session.peer

    @property
    def session_id(self) -> int:
        return self._sid

    async def handshake(self) -> None:
        """Run the handshake until the peer is authenticated."""
        self._flush()
        while True:
            event = await self._next_event()
            if isinstance(event, HandshakeComplete):
                return
            if isinstance(event, Closed | Message):  # impossible before authentication
                raise await self._fail("event before handshake")

    async def send(self, payload: bytes) -> None:
        try:
            self._session.send_message(payload)
        except ChannelError:
            raise await self._fail("send on a broken session") from None
        self._flush()
        await self._mux.drain()

    async def recv(self) -> bytes:
        """The next message; EOFError once the peer closed cleanly."""
        while not self._peer_closed:
            event = await self._next_event()
            if isinstance(event, Message):
                return event.data
            if isinstance(event, Closed):
                self._peer_closed = True
        raise EOFError("session closed by peer")

    async def close(self) -> None:
        """Send close_notify, then CLOSE the relay session; idempotent."""
        if not self._finished:
            self._session.close()
            self._flush()
            self._finish(b"closed")
        if self.owns_mux:
            await self._mux.aclose()

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals --

    async def _next_event(self) -> HandshakeComplete | Message | Closed:
        while True:
            try:
                event = self._session.next_event()
            except ChannelError:
                raise await self._fail("channel error") from None
            if event is not None:
                return event
            if self._eof_fed:
                raise await self._fail("stream ended")
            data = await self._inbox.get()
            if data is None:
                self._eof_fed = True
            try:
                self._session.receive_data(data or b"")
            except ChannelError:
                raise await self._fail("channel error") from None
            self._flush()

    def _flush(self) -> None:
        if self._finished:
            return
        out = self._session.data_to_send()
        for start in range(0, len(out), MAX_PAYLOAD):
            self._mux.send_frame(FrameType.DATA, self._sid, out[start : start + MAX_PAYLOAD])

    async def _fail(self, why: str) -> ChannelError:
        self._flush()  # a pending TLS alert tells the peer
        self._finish(b"channel error")
        log.debug("session %d: %s", self._sid, why)
        if self.owns_mux:
            await self._mux.aclose()
        return ChannelError()

    def _finish(self, reason: bytes) -> None:
        if self._finished:
            return
        self._finished = True
        self._mux.forget(self._sid, reason)

    def _feed(self, data: bytes | None) -> None:
        self._inbox.put_nowait(data)


class RelayMux:
    """The endpoint side of one relay connection: many sessions, both ways."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        session_factory: SessionFactory | None = None,
        handler: SessionHandler | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._factory = session_factory
        self._handler = handler
        self._sessions: dict[int, AsyncSession] = {}
        self._ids = itertools.count(1)
        self._control_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Run :meth:`run` in the background."""
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        """Dispatch incoming frames until the stream ends."""
        try:
            while (frame := await _read_frame(self._reader)) is not None:
                self._dispatch(*frame)
        except RelayProtocolError as exc:
            log.warning("mux: relay sent a malformed frame: %s", exc)
        except ConnectionError as exc:
            log.debug("mux: connection lost: %s", exc)
        finally:
            self._closed = True
            for session in self._sessions.values():
                session._feed(None)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("relay connection ended"))

    def _dispatch(self, ftype: FrameType, sid: int, payload: bytes) -> None:
        if ftype is FrameType.DATA:
            session = self._sessions.get(sid)
            if session is not None:
                session._feed(payload)
        elif ftype is FrameType.CLOSE:
            session = self._sessions.pop(sid, None)
            if session is not None:
                session._feed(None)
        elif ftype is FrameType.OPEN:
            self._incoming(sid, payload.decode("utf-8"))
        elif ftype is FrameType.HANDOFF:
            # This end cannot take connections (no SCM_RIGHTS on asyncio streams);
            # hostd hands off only to enclaves that can.
            log.warning("mux: unexpected HANDOFF for session %d", sid)
        else:
            reply = Frame(ftype, sid, payload).control_object()
            fut = self._pending.pop(reply.get("id", -1), None) if "id" in reply else None
            if fut is not None and not fut.done():
                fut.set_result(reply)

    def _incoming(self, sid: int, source: str) -> None:
        server = self._factory(source) if self._factory and self._handler else None
        if server is None or sid in self._sessions:
            self.send_frame(FrameType.CLOSE, sid, b"not accepted")
            return
        session = AsyncSession(self, sid, server)
        self._sessions[sid] = session
        task = asyncio.get_running_loop().create_task(self._serve_one(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_one(self, session: AsyncSession) -> None:
        assert self._handler is not None
        try:
            await session.handshake()
            await self._handler(session)
        except ChannelError:
            log.info("mux: session %d rejected or broken", session.session_id)
        except EOFError:
            pass
        finally:
            await session.close()

    async def open(self, target: str, session: ClientSession) -> AsyncSession:
        """Open a session to ``target`` and complete the attested handshake."""
        if self._closed:
            raise ChannelUsageError("relay connection is closed")
        sid = next(self._ids)
        if sid >= RELAY_ASSIGNED:
            raise ChannelUsageError("session ids exhausted on this connection")
        wrapped = AsyncSession(self, sid, session)
        self._sessions[sid] = wrapped
        frame = Frame.open(sid, target)
        self.send_frame(frame.type, sid, frame.payload)
        await wrapped.handshake()
        return wrapped

    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send a CONTROL request to hostd and wait for its reply."""
        cid = next(self._control_ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        frame = Frame.control({**request, "id": cid})
        self.send_frame(frame.type, 0, frame.payload)
        await self.drain()
        return await fut

    def send_frame(self, ftype: FrameType, sid: int, payload: bytes) -> None:
        if not self._writer.is_closing():
            _write_frame(self._writer, ftype, sid, payload)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    def forget(self, sid: int, reason: bytes) -> None:
        """Tell the relay a session is over (CLOSE) and stop routing to it."""
        if self._sessions.pop(sid, None) is not None:
            self.send_frame(FrameType.CLOSE, sid, reason)

    async def aclose(self) -> None:
        """Close the connection; sessions still open see the stream end."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner


async def open_client_session(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    session: ClientSession,
    target: str,
) -> AsyncSession:
    """Open one attested session over a fresh relay connection; closing the
    session closes the connection."""
    mux = RelayMux(reader, writer)
    mux.start()
    try:
        wrapped = await mux.open(target, session)
    except BaseException:
        await mux.aclose()
        raise
    wrapped.owns_mux = True
    return wrapped


async def serve_sessions(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    session_factory: SessionFactory,
    handler: SessionHandler,
) -> None:
    """Inside an enclave: serve every session the relay opens on this stream.

    ``session_factory(source_label)`` returns a fresh :class:`ServerSession`
    (or None to refuse); ``handler`` runs per session after the client is
    authenticated, and the session is closed when it returns.
    """
    mux = RelayMux(reader, writer, session_factory=session_factory, handler=handler)
    try:
        await mux.run()
    finally:
        await mux.aclose()


# --------------------------------------------------------------------------
# Standalone relay process (integration tests, demos).


async def _standalone(path: str, capture: str | None) -> None:
    sink = open(capture, "ab", buffering=0) if capture else None  # noqa: SIM115

    def observe(data: bytes) -> None:
        assert sink is not None
        sink.write(data)

    relay: Relay

    async def on_control(conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("op") == "register" and isinstance(request.get("name"), str):
            try:
                relay.register(conn, request["name"])
            except ValueError as exc:
                return {"ok": False, "error": str(exc)}
            return {"ok": True}
        if request.get("op") == "ping":
            return {"ok": True}
        return {"ok": False, "error": "unknown op"}

    relay = Relay(on_control, observer=observe if sink else None)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await relay.serve(reader, writer, kind="client")

    server = await asyncio.start_unix_server(on_connect, path=path)
    os.chmod(path, 0o600)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()
    await relay.aclose()
    if sink is not None:
        sink.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgxvtpm.host.relay", description=__doc__)
    parser.add_argument("--listen", required=True, help="unix socket path to listen on")
    parser.add_argument("--capture", help="append every byte the relay reads to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_standalone(args.listen, args.capture))
    return 0


if __name__ == "__main__":
    sys.exit(main())
