"""The asyncio driver of a relay connection: many attested sessions, both ways.

:class:`RelayMux` runs :class:`sgxvtpm.mux.connection.RelayConnection` (the
sans-IO core: frames, sessions, admission, bounds) on one stream to hostd's
switch, for clients (the VMM) and for enclaves (the manager, through
:mod:`sgxvtpm.enclaves.runtime`): it opens client sessions
(:meth:`RelayMux.open`), serves incoming ones (``session_factory`` +
``handler``), and exchanges CONTROL messages with hostd.
:class:`AsyncSession` wraps one sans-IO TLS session (:mod:`sgxvtpm.channel`)
on it. hostd sees only the TLS records in DATA.

It never waits for hostd: frames go to the transport's buffer, and a
session whose output would take it past ``STREAM_OUT_MAX`` fails instead;
input a session has not consumed is bounded by ``SESSION_INBOX_MAX``;
incoming sessions are admitted by :class:`sgxvtpm.mux.limits.Admission` and
dropped at their handshake deadline (all in :mod:`sgxvtpm.mux.limits`,
enforced by the core).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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
from sgxvtpm.mux.connection import (
    CLOSED,
    NOT_ACCEPTED,
    ConnectionEnded,
    ControlReply,
    DataReceived,
    Handoff,
    RelayConnection,
    Role,
    SessionClosed,
    SessionDropped,
    SessionOpened,
)
from sgxvtpm.mux.limits import SESSION_INBOX_MAX, STREAM_OUT_MAX, Admission
from sgxvtpm.platform.base import VerifiedQuote
from sgxvtpm.wire.relay import RelayProtocolError, RelayUsageError

log = logging.getLogger("sgxvtpm.mux")

_READ = 64 * 1024

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
        event = await self._next_event()
        if not isinstance(event, HandshakeComplete):  # impossible before authentication
            raise await self._fail("event before handshake")
        self._mux._conn.authenticated(self._sid)

    async def send(self, payload: bytes) -> None:
        await self._step(self._session.send_message, payload, "send on a broken session")

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
            self._finish(CLOSED)
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
                data = b""
            else:
                self._mux._conn.consumed(self._sid, len(data))
            await self._step(self._session.receive_data, data, "channel error")

    async def _step(self, call: Callable[[bytes], object], data: bytes, reason: str) -> None:
        """``call(data)`` on the sans-IO session, then send what it made; a
        ChannelError fails the session with ``reason``."""
        try:
            call(data)
        except ChannelError:
            raise await self._fail(reason) from None
        await self._flush_or_fail()

    async def _flush_or_fail(self) -> None:
        self._flush()
        if self._undelivered:
            raise await self._fail("hostd does not take our output")

    def _flush(self) -> None:
        if self._finished:
            return
        out = self._session.data_to_send()
        if out and not self._mux._conn.send(self._sid, out):
            # Never wait for hostd: this session's output is lost, so is the
            # session (the core dropped it).
            self._undelivered = True
            self._finished = True
            self._mux._sessions.pop(self._sid, None)
        self._mux._flush()

    async def _fail(self, why: str) -> ChannelError:
        self._flush()  # a pending TLS alert tells the peer
        self._finish("channel error")
        log.debug("session %d: %s", self._sid, why)
        if self.owns_mux:
            await self._mux.aclose()
        return ChannelError()

    def _finish(self, reason: str) -> None:
        if self._finished:
            return
        self._finished = True
        self._mux._sessions.pop(self._sid, None)
        self._mux._conn.close(self._sid, reason)
        self._mux._flush()

    def _feed(self, data: bytes | None) -> None:
        self._inbox.put_nowait(data)

    def _dropped(self) -> None:
        """The core ended this session: what is queued goes, its reader sees the end."""
        self._finished = True
        while not self._inbox.empty():
            self._inbox.get_nowait()
        self._inbox.put_nowait(None)


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
        #: Given both, this end serves incoming sessions (an enclave's end).
        self._serving: tuple[SessionFactory, SessionHandler] | None = None
        if session_factory is not None and handler is not None:
            self._serving = (session_factory, handler)
        self._conn = RelayConnection(
            Role.ENCLAVE if self._serving is not None else Role.CLIENT,
            admission=admission,
            out_limit=STREAM_OUT_MAX,
            inbox_limit=SESSION_INBOX_MAX,
            backlog=writer.transport.get_write_buffer_size,
        )
        self._sessions: dict[int, AsyncSession] = {}
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self._ended = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None

    def start(self) -> None:
        """Run :meth:`run` in the background."""
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        """Dispatch incoming frames until the stream ends."""
        try:
            while not self._ended:
                data = await self._reader.read(_READ)
                self._conn.receive_data(data)
                self._dispatch()
        except RelayProtocolError as exc:
            log.warning("mux: relay sent a malformed frame: %s", exc)
        except ConnectionError as exc:
            log.debug("mux: connection lost: %s", exc)
        finally:
            self._closed = True
            self._disarm()
            for session in list(self._sessions.values()):
                session._feed(None)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("relay connection ended"))

    def _dispatch(self) -> None:
        conn = self._conn
        sessions = self._sessions
        while (event := conn.next_event()) is not None:
            # The core and this table know the same sessions; .get() all the same:
            # nothing a peer sends may end this loop with a KeyError.
            if isinstance(event, DataReceived):
                if (session := sessions.get(event.sid)) is not None:
                    session._feed(event.data)
            elif isinstance(event, SessionOpened):
                self._incoming(event.sid, event.source)
            elif isinstance(event, SessionClosed):
                if (session := sessions.get(event.sid)) is not None:
                    session._feed(None)
            elif isinstance(event, SessionDropped):
                log.info("mux: session %d dropped: %s", event.sid, event.reason)
                if (session := sessions.pop(event.sid, None)) is not None:
                    session._dropped()
            elif isinstance(event, ControlReply):
                fut = self._pending.pop(event.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(event.reply)
            elif isinstance(event, Handoff):
                # This end cannot take connections (no SCM_RIGHTS on asyncio streams);
                # hostd hands off only to enclaves that can.
                log.warning("mux: unexpected HANDOFF for session %d", event.sid)
            elif isinstance(event, ConnectionEnded):
                self._ended = True
        self._flush()
        self._arm()

    def _incoming(self, sid: int, source: str) -> None:
        assert self._serving is not None  # the core takes OPENs on an enclave's end only
        factory, handler = self._serving
        server = factory(source)
        if server is None:
            self._conn.close(sid, NOT_ACCEPTED)
            return
        session = AsyncSession(self, sid, server)
        self._sessions[sid] = session
        task = asyncio.get_running_loop().create_task(self._serve_one(session, handler))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _serve_one(session: AsyncSession, handler: SessionHandler) -> None:
        try:
            await session.handshake()
            await handler(session)
        except ChannelError:
            log.info("mux: session %d rejected or broken", session.session_id)
        except EOFError:
            pass
        finally:
            await session.close()

    # -- handshake deadlines (the core decides; this schedules the check) --

    def _arm(self) -> None:
        deadline = self._conn.next_deadline()
        if deadline == self._deadline:
            return
        self._disarm()
        if deadline is not None:
            self._deadline = deadline
            delay = max(0.0, deadline - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_deadline)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._deadline = None

    def _on_deadline(self) -> None:
        self._timer = None
        self._deadline = None
        self._conn.expire()
        self._dispatch()

    # -- commands --

    async def open(self, target: str, session: ClientSession) -> AsyncSession:
        """Open a session to ``target`` and complete the attested handshake."""
        if self._closed:
            raise ChannelUsageError("relay connection is closed")
        try:
            sid = self._conn.open(target)
        except RelayUsageError as exc:
            raise ChannelUsageError(str(exc)) from None
        wrapped = AsyncSession(self, sid, session)
        self._sessions[sid] = wrapped
        try:
            await wrapped.handshake()
        except BaseException:
            wrapped._finish(CLOSED)  # given up (timeout, cancelled): hostd forgets it too
            raise
        return wrapped

    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send a CONTROL request to hostd and wait for its reply."""
        if self._closed:
            raise ConnectionError("relay connection ended")
        cid = self._conn.control(request)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        self._flush()
        return await fut

    def _flush(self) -> None:
        out = self._conn.data_to_send()
        if out and not self._writer.is_closing():
            self._writer.write(out)

    @property
    def backlog(self) -> int:
        """Bytes queued for hostd that the stream has not taken yet."""
        return self._conn.backlog

    async def aclose(self) -> None:
        """Close the connection; sessions still open see the stream end."""
        self._closed = True
        self._disarm()
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
