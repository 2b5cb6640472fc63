"""The instance enclave's I/O loop: one thread, one epoll, sans-IO sessions.

Sessions arrive as relay frames on the enclave's stream (OPEN, DATA, CLOSE);
what the frames mean, which sessions are admitted and what is dropped is
decided by the sans-IO core, :class:`sgxvtpm.mux.connection.RelayConnection`,
which this loop drives. Once a client's session is authenticated, hostd may
hand the client's connection itself to the enclave (a HANDOFF frame carrying
the descriptor by SCM_RIGHTS, see sgxvtpm.wire.relay): from then on that
session's TLS records are read and written here directly, past the core, and
hostd is off the command path.

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
import logging
import select
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
from sgxvtpm.mux import connection as relay
from sgxvtpm.mux.limits import SESSION_OUT_MAX, STREAM_OUT_MAX, Admission
from sgxvtpm.util import heap
from sgxvtpm.wire.relay import RelayProtocolError

log = logging.getLogger("sgxvtpm.enclave")


def _log_send_failure(sid: int, exc: OSError) -> None:
    """A client that went away (EPIPE, ECONNRESET) is routine, not a warning."""
    if isinstance(exc, BrokenPipeError | ConnectionResetError):
        log.info("enclave: session %d dropped: its client closed the connection", sid)
    else:
        log.warning("enclave: session %d: send failed: %s", sid, exc)


_MAX_FDS = 8
_READ = 17 * 1024  # a TLS record (16 KiB + overhead); larger reads only cost allocations
_IDLE_TICK = 0.5  # seconds; two idle ticks and free heap goes back to the host
# epoll itself, not the selectors module: its select() costs ~1.2 µs a call in
# Python on top of epoll_wait, once per request. As selectors does, a hang-up or
# an error wakes both directions: the read or the write then sees it.
_READ_ONLY = select.EPOLLIN
_READ_WRITE = select.EPOLLIN | select.EPOLLOUT
_READABLE = ~select.EPOLLOUT
_WRITABLE = ~select.EPOLLIN


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
        self._sessions: dict[int, Session] = {}
        # Read here for the select timeout; decided on by the core.
        self._admission = admission if admission is not None else Admission()
        self._backlog = bytearray()  # frames for hostd its socket has not taken yet
        self._conn = relay.RelayConnection(
            relay.Role.ENCLAVE,
            admission=self._admission,
            takes_handoff=True,
            out_limit=STREAM_OUT_MAX,
            backlog=self._backlog.__len__,
        )
        self._fds: deque[int] = deque()
        self._epoll = select.epoll()
        self._direct: dict[int, Session] = {}  # handed-off connections by descriptor
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
        stream = self._stream.fileno()
        self._epoll.register(stream, _READ_ONLY)
        idle_rounds = 0
        try:
            while self._running:
                events = self._epoll.poll(self._timeout())
                # After a while without requests, hand freed heap back to the
                # host: hundreds of idle instances share one machine.
                idle_rounds = 0 if events else idle_rounds + 1
                if idle_rounds == 2:
                    heap.release_free_memory()
                # Sessions looked up before acting on any: a descriptor this round
                # closes and a HANDOFF reuses must not take the old one's event.
                for fd, session, mask in [(fd, self._direct.get(fd), m) for fd, m in events]:
                    if fd == stream:
                        if mask & _WRITABLE and self._backlog:
                            self._write_stream()
                        if mask & _READABLE and not self._read_stream():
                            return
                    elif session is not None:
                        if mask & _WRITABLE and session.backlog:
                            self._write_direct(session)
                        if mask & _READABLE:
                            self._read_direct(session)
                if len(self._admission):
                    self._expire()
        finally:
            for session in list(self._sessions.values()):
                self._drop(session, notify=False)  # hostd is gone or going
            self._epoll.close()
            for fd in self._fds:
                socket.close(fd)

    def _timeout(self) -> float:
        deadline = self._admission.next_deadline()
        if deadline is None:
            return _IDLE_TICK
        return max(0.0, min(_IDLE_TICK, deadline - time.monotonic()))

    def _expire(self) -> None:
        self._conn.expire()
        self._events()

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
            self._conn.receive_data(data)
            return self._events()
        except RelayProtocolError as exc:
            log.warning("enclave: hostd sent a malformed frame: %s", exc)
            return False

    def _events(self) -> bool:
        """Act on the core's events; False once the stream ended."""
        while (event := self._conn.next_event()) is not None:
            if not self._on_event(event):
                return False
        self._pump()
        return True

    def _on_event(self, event: relay.Event) -> bool:
        if isinstance(event, relay.DataReceived):
            session = self._sessions.get(event.sid)
            if session is not None:
                self._feed(session, event.data)
        elif isinstance(event, relay.SessionOpened):
            tls = self._factory()
            if tls is None:
                self._conn.close(event.sid, relay.NOT_ACCEPTED)
            else:
                self._sessions[event.sid] = Session(event.sid, tls)
        elif isinstance(event, relay.SessionClosed):
            session = self._sessions.get(event.sid)
            if session is not None:
                self._feed(session, b"")
        elif isinstance(event, relay.SessionDropped):
            session = self._sessions.get(event.sid)
            if session is not None:
                log.info("enclave: session %d dropped: %s", event.sid, event.reason)
                self._drop(session, reason=event.reason)
        elif isinstance(event, relay.Handoff):
            self._take_connection(event.sid, event.accepted)
        elif isinstance(event, relay.ConnectionEnded):
            return False
        return True  # ControlReply, HandoffAnswered: this end asks nothing of hostd

    def _take_connection(self, sid: int, accepted: bool) -> None:
        """HANDOFF of ``sid``: its descriptor is the next one received."""
        if not self._fds:
            log.warning("enclave: HANDOFF for session %d without a descriptor", sid)
            conn = None
        else:
            conn = socket.socket(fileno=self._fds.popleft())
        session = self._sessions.get(sid) if accepted else None
        if session is None or conn is None or conn.family != socket.AF_UNIX:
            if conn is not None:
                conn.close()
            if session is not None:
                self._drop(session)  # the relay let go of it, and it cannot come here: over
            return
        conn.setblocking(False)
        session.direct = conn
        self._direct[conn.fileno()] = session
        self._epoll.register(conn, _READ_ONLY)

    def _pump(self) -> None:
        """Write what the core queued for hostd, never waiting: the rest is
        kept (the core counts it against STREAM_OUT_MAX) until the socket takes it."""
        out = self._conn.data_to_send()
        if not out:
            return
        if self._backlog:
            self._backlog += out
            return
        try:
            sent = self._stream.send(out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._running = False
            return
        if sent < len(out):
            self._backlog += memoryview(out)[sent:]
            self._epoll.modify(self._stream, _READ_WRITE)

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
            self._epoll.modify(self._stream, _READ_ONLY)

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
            _log_send_failure(session.sid, exc)
            self._drop(session)
            return
        if sent < len(out):
            if len(out) - sent > SESSION_OUT_MAX:
                self._drop_unread(session)
                return
            session.backlog += memoryview(out)[sent:]
            self._epoll.modify(conn, _READ_WRITE)

    def _write_direct(self, session: Session) -> None:
        conn = session.direct
        if conn is None or self._sessions.get(session.sid) is not session:
            return
        try:
            sent = conn.send(session.backlog)
        except BlockingIOError:
            return
        except OSError as exc:
            _log_send_failure(session.sid, exc)
            self._drop(session)
            return
        del session.backlog[:sent]
        if not session.backlog:
            self._epoll.modify(conn, _READ_ONLY)

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
                    self._conn.authenticated(session.sid)
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
        if not self._conn.send(session.sid, out):
            log.info("enclave: session %d dropped: hostd does not read", session.sid)
            self._drop(session)
            return
        self._pump()

    def _drop(self, session: Session, reason: str = relay.CLOSED, notify: bool = True) -> None:
        """Forget ``session``: CLOSE to hostd if relayed (the core knows) and
        ``notify``, its connection closed if handed off, the handler told."""
        if self._sessions.get(session.sid) is not session:
            return
        del self._sessions[session.sid]
        self._conn.close(session.sid, reason)
        if session.direct is not None:
            del self._direct[session.direct.fileno()]
            self._epoll.unregister(session.direct)
            session.direct.close()
            session.backlog.clear()
        elif notify:
            self._pump()
        if self._on_close is not None:
            try:
                self._on_close(session)
            except Exception:  # one session's fault must never end the enclave
                log.exception("enclave: on_close of session %d failed", session.sid)
