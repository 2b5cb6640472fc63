"""The asyncio end of one relay connection: many attested sessions, both ways.

:class:`RelayMux` runs on one stream to hostd's switch, for clients (the
VMM) and for enclaves (the manager, through :mod:`sgxvtpm.enclaves.runtime`):
it opens client sessions (:meth:`RelayMux.open`), serves incoming ones
(``session_factory`` + ``handler``), and exchanges CONTROL messages with
hostd. :class:`AsyncSession` wraps one sans-IO session
(:mod:`sgxvtpm.channel`) on it. hostd sees only the TLS records in DATA.

It never waits for hostd: frames are queued on the stream, and a session
whose output would take the queue past ``STREAM_OUT_MAX`` fails instead;
input a session has not consumed is bounded by ``SESSION_INBOX_MAX``;
incoming sessions are admitted by :class:`sgxvtpm.mux.limits.Admission` and
must authenticate within ``HANDSHAKE_TIMEOUT`` (all in
:mod:`sgxvtpm.mux.limits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
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
from sgxvtpm.mux.limits import SESSION_INBOX_MAX, STREAM_OUT_MAX, Admission
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

log = logging.getLogger("sgxvtpm.mux")

Observer = Callable[[bytes], None]


async def read_frame(
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


def write_frame(
    writer: asyncio.StreamWriter, ftype: FrameType, session_id: int, payload: bytes
) -> None:
    # Two writes, no concatenation: the transport buffers them together.
    writer.write(encode_header(ftype, session_id, len(payload)))
    if payload:
        writer.write(payload)



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
        self._inbox_bytes = 0
        self._eof_fed = False
        self._finished = False
        self._undelivered = False  # the relay stream is too far behind for our output
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
        if self._undelivered:
            raise await self._fail("hostd does not take our output")

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
            else:
                self._inbox_bytes -= len(data)
            try:
                self._session.receive_data(data or b"")
            except ChannelError:
                raise await self._fail("channel error") from None
            self._flush()
            if self._undelivered:
                raise await self._fail("hostd does not take our output")

    def _flush(self) -> None:
        if self._finished:
            return
        out = self._session.data_to_send()
        if out and self._mux.backlog + len(out) > STREAM_OUT_MAX:
            # Never wait for hostd: this session's output is lost, so is the session.
            self._undelivered = True
            self._finish(b"not delivered")
            return
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
        if data is not None and self._inbox_bytes + len(data) > SESSION_INBOX_MAX:
            # The peer sends more than this session takes in: drop what is
            # queued and end the session (its reader sees the stream end).
            log.debug("session %d: input limit", self._sid)
            while not self._inbox.empty():
                self._inbox.get_nowait()
            self._inbox_bytes = 0
            self._finish(b"input limit")
            data = None
        elif data is not None:
            self._inbox_bytes += len(data)
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
        admission: Admission | None = None,
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
        # Incoming sessions still authenticating, and the task serving each.
        self._admission = admission if admission is not None else Admission()
        self._serving: dict[int, asyncio.Task[None]] = {}

    def start(self) -> None:
        """Run :meth:`run` in the background."""
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        """Dispatch incoming frames until the stream ends."""
        try:
            while (frame := await read_frame(self._reader)) is not None:
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
        if not (self._factory and self._handler) or sid in self._sessions:
            self.send_frame(FrameType.CLOSE, sid, b"not accepted")
            return
        loop = asyncio.get_running_loop()
        verdict = self._admission.admit(sid, loop.time())
        if not verdict.accepted:
            self.send_frame(FrameType.CLOSE, sid, b"busy")
            return
        if verdict.evicted is not None:
            evicted = self._serving.get(verdict.evicted)
            if evicted is not None:
                evicted.cancel()  # its finally closes the session (CLOSE to hostd)
        server = self._factory(source)
        if server is None:
            self._admission.done(sid)
            self.send_frame(FrameType.CLOSE, sid, b"not accepted")
            return
        session = AsyncSession(self, sid, server)
        self._sessions[sid] = session
        task = loop.create_task(self._serve_one(session))
        self._tasks.add(task)
        self._serving[sid] = task
        task.add_done_callback(self._tasks.discard)

    async def _serve_one(self, session: AsyncSession) -> None:
        assert self._handler is not None
        sid = session.session_id
        try:
            await asyncio.wait_for(session.handshake(), self._admission.timeout)
            self._admission.done(sid)
            await self._handler(session)
        except ChannelError:
            log.info("mux: session %d rejected or broken", sid)
        except TimeoutError:
            log.info("mux: session %d: no handshake in time", sid)
        except EOFError:
            pass
        finally:
            self._admission.done(sid)
            if self._serving.get(sid) is asyncio.current_task():
                del self._serving[sid]
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
        return await fut

    def send_frame(self, ftype: FrameType, sid: int, payload: bytes) -> None:
        """Queue a frame; never waits (sessions check :attr:`backlog` first)."""
        if not self._writer.is_closing():
            write_frame(self._writer, ftype, sid, payload)

    @property
    def backlog(self) -> int:
        """Bytes queued for hostd that the stream has not taken yet."""
        return self._writer.transport.get_write_buffer_size()

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
        if self.backlog:
            # A graceful close waits for hostd to take the rest; it is not reading.
            self._writer.transport.abort()
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

