"""The instance enclave's I/O loop: one thread, one selector, sans-IO sessions.

Sessions arrive as relay frames on the enclave's stream (OPEN, DATA, CLOSE).
Once a client's session is authenticated, hostd may hand the client's
connection itself to the enclave (a HANDOFF frame carrying the descriptor by
SCM_RIGHTS, see sgxvtpm.wire.relay): from then on that session's TLS records
are read and written here directly, and hostd is off the command path.

Requests are answered one at a time, in arrival order (libtpms is
single-threaded). A misbehaving session is dropped; the loop never dies of
one client's bytes, and never waits for anyone: every socket is non-blocking,
what a peer does not take yet is kept up to a bound (sgxvtpm.mux.limits) and
a session whose replies do not fit is dropped. Sessions still authenticating
are admitted by :class:`sgxvtpm.mux.limits.Admission` and closed at their
deadline. It ends when the host closes the stream or on SIGTERM.

The handler sees which :class:`Session` a request came from, is told when a
session ends (``on_close``: the client closed it, its connection broke, it
was dropped) and may end another session with :meth:`InstanceLoop.end`;
the instance enclave builds its one-endpoint-per-VM rule on these.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import logging
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sgxvtpm.channel import (
    ChannelError,
    Closed,
    HandshakeComplete,
    Message,
    PeerCertificate,
    ServerSession,
)
from sgxvtpm.mux.limits import SESSION_OUT_MAX, STREAM_OUT_MAX, Admission
from sgxvtpm.wire import relay as frames

log = logging.getLogger("sgxvtpm.enclave")


_MAX_FDS = 8
_READ = 17 * 1024  # a TLS record (16 KiB + overhead); larger reads only cost allocations
_IDLE_TICK = 0.5  # seconds; two idle ticks and free heap goes back to the host
_READ_ONLY = selectors.EVENT_READ
_READ_WRITE = selectors.EVENT_READ | selectors.EVENT_WRITE


def _release_free_memory() -> None:
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)


@dataclass(eq=False)  # compared by identity: a session id can come back after a CLOSE
class Session:
    """One client session: its relay id, TLS state, authenticated peer and connection."""

    sid: int
    tls: ServerSession
    peer: PeerCertificate | None = None
    direct: socket.socket | None = None
    backlog: bytearray = field(default_factory=bytearray)  # unsent, on ``direct``


Handler = Callable[[Session, bytes], bytes]
"""Answer one request message of an authenticated session (``session.peer`` is
set); raise PermissionError to drop the session."""


class InstanceLoop:
    def __init__(
        self,
        stream: socket.socket,
        session_factory: Callable[[], ServerSession | None],
        handler: Handler,
        on_close: Callable[[Session], None] | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._stream = stream
        self._factory = session_factory
        self._handler = handler
        self._on_close = on_close
        self._decoder = frames.RelayDecoder()
        self._sessions: dict[int, Session] = {}
        self._admission = admission if admission is not None else Admission()
        self._fds: deque[int] = deque()
        self._selector = selectors.DefaultSelector()
        self._backlog = bytearray()  # frames for hostd its socket has not taken yet
        self._running = True
        stream.setblocking(False)

    def stop(self, *_: object) -> None:
        self._running = False

    def end(self, session: Session) -> None:
        """End ``session`` (TLS close_notify, then its connection or relay session)."""
        if self._sessions.get(session.sid) is not session:
            return
        with contextlib.suppress(ChannelError):
            session.tls.close()
        self._flush(session)
        self._drop(session)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        # A peer that went away must cost its session, not the enclave: EPIPE, not SIGPIPE.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self._selector.register(self._stream, _READ_ONLY, None)
        idle_rounds = 0
        try:
            while self._running:
                events = self._selector.select(timeout=self._timeout())
                # After a while without requests, hand freed heap back to the
                # host: hundreds of idle instances share one machine.
                idle_rounds = 0 if events else idle_rounds + 1
                if idle_rounds == 2:
                    _release_free_memory()
                for key, mask in events:
                    if key.data is None:
                        if mask & selectors.EVENT_WRITE:
                            self._write_stream()
                        if mask & selectors.EVENT_READ and not self._read_stream():
                            return
                    else:
                        if mask & selectors.EVENT_WRITE:
                            self._write_direct(key.data)
                        if mask & selectors.EVENT_READ:
                            self._read_direct(key.data)
                if len(self._admission):
                    self._expire()
        finally:
            for session in list(self._sessions.values()):
                self._drop(session, notify=False)
            self._selector.close()
            for fd in self._fds:
                socket.close(fd)

    def _timeout(self) -> float:
        deadline = self._admission.next_deadline()
        if deadline is None:
            return _IDLE_TICK
        return max(0.0, min(_IDLE_TICK, deadline - time.monotonic()))

    def _expire(self) -> None:
        for sid in self._admission.expired(time.monotonic()):
            session = self._sessions.get(sid)
            if session is not None:
                log.info("enclave: session %d: no handshake in time", sid)
                self._drop(session, reason=b"handshake timeout")

    # -- the stream from hostd ---------------------------------------------
    def _read_stream(self) -> bool:
        fds = array.array("i")
        try:
            data, ancdata, _flags, _addr = self._stream.recvmsg(
                _READ, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize)
            )
        except BlockingIOError:
            return True
        except ConnectionError:
            return False
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - (len(payload) % fds.itemsize)
                fds.frombytes(payload[:usable])
        self._fds.extend(fds)
        try:
            self._decoder.receive_data(data)
            while (frame := self._decoder.next_frame()) is not None:
                self._on_frame(frame)
        except frames.RelayProtocolError as exc:
            log.warning("enclave: hostd sent a malformed frame: %s", exc)
            return False
        return bool(data)

    def _on_frame(self, frame: frames.Frame) -> None:
        sid = frame.session_id
        if frame.type is frames.FrameType.OPEN:
            self._open(sid)
        elif frame.type is frames.FrameType.DATA:
            session = self._sessions.get(sid)
            if session is not None:
                self._feed(session, frame.payload)
        elif frame.type is frames.FrameType.CLOSE:
            session = self._sessions.get(sid)
            if session is not None:
                self._feed(session, b"")
        elif frame.type is frames.FrameType.HANDOFF:
            self._take_connection(sid)

    def _open(self, sid: int) -> None:
        if sid in self._sessions:
            self._send_frame(frames.FrameType.CLOSE, sid, b"not accepted")
            return
        verdict = self._admission.admit(sid, time.monotonic())
        if not verdict.accepted:
            self._send_frame(frames.FrameType.CLOSE, sid, b"busy")
            return
        if verdict.evicted is not None:
            evicted = self._sessions.get(verdict.evicted)
            if evicted is not None:
                self._drop(evicted, reason=b"busy")
        tls = self._factory()
        if tls is None:
            self._admission.done(sid)
            self._send_frame(frames.FrameType.CLOSE, sid, b"not accepted")
            return
        self._sessions[sid] = Session(sid, tls)

    def _take_connection(self, sid: int) -> None:
        if not self._fds:
            log.warning("enclave: HANDOFF for session %d without a descriptor", sid)
            return
        conn = socket.socket(fileno=self._fds.popleft())
        session = self._sessions.get(sid)
        if session is None or session.direct is not None or conn.family != socket.AF_UNIX:
            conn.close()
            return
        conn.setblocking(False)
        session.direct = conn
        self._selector.register(conn, _READ_ONLY, session)

    def _send_frame(self, ftype: frames.FrameType, sid: int, payload: bytes) -> bool:
        """Queue a frame for hostd; False (nothing queued) if hostd is that far behind."""
        data = frames.encode_header(ftype, sid, len(payload)) + payload
        if self._backlog:
            if len(self._backlog) + len(data) > STREAM_OUT_MAX:
                return False
            self._backlog += data
            return True
        try:
            sent = self._stream.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._running = False
            return False
        if sent < len(data):
            self._backlog += memoryview(data)[sent:]
            self._selector.modify(self._stream, _READ_WRITE, None)
        return True

    def _write_stream(self) -> None:
        try:
            sent = self._stream.send(self._backlog)
        except BlockingIOError:
            return
        except OSError:
            self._running = False
            return
        del self._backlog[:sent]
        if not self._backlog:
            self._selector.modify(self._stream, _READ_ONLY, None)

    # -- handed-off connections --------------------------------------------
    def _read_direct(self, session: Session) -> None:
        assert session.direct is not None
        try:
            data = session.direct.recv(_READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._feed(session, data)

    def _send_direct(self, session: Session, out: bytes) -> None:
        conn = session.direct
        assert conn is not None
        if session.backlog:
            if len(session.backlog) + len(out) > SESSION_OUT_MAX:
                self._drop_unread(session)
                return
            session.backlog += out
            return
        try:
            sent = conn.send(out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            log.warning("enclave: session %d: send failed: %s", session.sid, exc)
            self._drop(session)
            return
        if sent < len(out):
            if len(out) - sent > SESSION_OUT_MAX:
                self._drop_unread(session)
                return
            session.backlog += memoryview(out)[sent:]
            self._selector.modify(conn, _READ_WRITE, session)

    def _write_direct(self, session: Session) -> None:
        conn = session.direct
        if conn is None or self._sessions.get(session.sid) is not session:
            return
        try:
            sent = conn.send(session.backlog)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("enclave: session %d: send failed: %s", session.sid, exc)
            self._drop(session)
            return
        del session.backlog[:sent]
        if not session.backlog:
            self._selector.modify(conn, _READ_ONLY, session)

    def _drop_unread(self, session: Session) -> None:
        log.info("enclave: session %d dropped: its client does not read", session.sid)
        self._drop(session)

    # -- one session ---------------------------------------------------------
    def _feed(self, session: Session, data: bytes) -> None:
        if self._sessions.get(session.sid) is not session:
            return  # dropped earlier in this round of events
        try:
            session.tls.receive_data(data)
            while (event := session.tls.next_event()) is not None:
                if isinstance(event, HandshakeComplete):
                    assert isinstance(event.peer, PeerCertificate)
                    session.peer = event.peer
                    self._admission.done(session.sid)
                elif isinstance(event, Message):
                    assert session.peer is not None
                    session.tls.send_message(self._handler(session, event.data))
                elif isinstance(event, Closed):
                    session.tls.close()
                    self._flush(session)
                    self._drop(session)
                    return
            self._flush(session)
            if not data:
                self._drop(session)
        except (ChannelError, PermissionError) as exc:
            log.info("enclave: session %d dropped: %s", session.sid, type(exc).__name__)
            self._flush(session)
            self._drop(session)
        except Exception:  # one session's fault must never end the enclave
            log.exception("enclave: session %d failed", session.sid)
            self._drop(session)

    def _flush(self, session: Session) -> None:
        if self._sessions.get(session.sid) is not session:
            return
        out = session.tls.data_to_send()
        if not out:
            return
        if session.direct is not None:
            self._send_direct(session, out)
            return
        for start in range(0, len(out), frames.MAX_PAYLOAD):
            chunk = out[start : start + frames.MAX_PAYLOAD]
            if not self._send_frame(frames.FrameType.DATA, session.sid, chunk):
                log.info("enclave: session %d dropped: hostd does not read", session.sid)
                self._drop(session, notify=False)
                return

    def _drop(self, session: Session, notify: bool = True, reason: bytes = b"closed") -> None:
        if self._sessions.get(session.sid) is not session:
            return
        del self._sessions[session.sid]
        self._admission.done(session.sid)
        if session.direct is not None:
            self._selector.unregister(session.direct)
            session.direct.close()
            session.backlog.clear()
        elif notify:
            self._send_frame(frames.FrameType.CLOSE, session.sid, reason)
        if self._on_close is not None:
            try:
                self._on_close(session)
            except Exception:  # one session's fault must never end the enclave
                log.exception("enclave: on_close of session %d failed", session.sid)
