"""One end of a relay connection, as one sans-IO state machine (h11-style).

A relay connection is one byte stream to hostd's switch carrying relay
frames (:mod:`sgxvtpm.wire.relay`): many sessions, CONTROL requests to hostd,
and the HANDOFF of a session's connection. :class:`RelayConnection` is
everything an end of it decides, with no I/O:

- bytes in with :meth:`~RelayConnection.receive_data` (``b""`` = the stream
  ended), events out with :meth:`~RelayConnection.next_event`;
- commands in (:meth:`~RelayConnection.open`, :meth:`~RelayConnection.send`,
  :meth:`~RelayConnection.close`, :meth:`~RelayConnection.control`,
  :meth:`~RelayConnection.request_handoff`, ...), bytes out with
  :meth:`~RelayConnection.data_to_send`;
- the bounds of :mod:`sgxvtpm.mux.limits`: incoming sessions are admitted by
  an :class:`~sgxvtpm.mux.limits.Admission` and dropped at their handshake
  deadline (:meth:`~RelayConnection.expire`, the clock is the driver's);
  DATA and CLOSE frames that would take the unsent output past ``out_limit``
  are not queued (a session whose DATA does not fit is dropped: nobody waits
  for hostd); bytes delivered to a session and not yet consumed are at most
  ``inbox_limit``; at most ``CONTROL_QUEUE_MAX`` CONTROL requests wait for
  hostd's answer.

What a session carries (TLS records of an attested session) is the driver's
business: it tells the connection when the session's peer is authenticated
(:meth:`~RelayConnection.authenticated`), which frees its admission slot.
The drivers are :mod:`sgxvtpm.mux.aio` (asyncio: the manager enclave, the
VMM), :mod:`sgxvtpm.enclaves.loop` (epoll: the instance enclave, which
also takes handed-off connections) and :mod:`sgxvtpm.endpoint.k2` (blocking:
a VM endpoint). After a HANDOFF a session's bytes no longer pass through
here: the driver moves them between the TLS session and the handed-off
connection itself (the per-command path).

Roles. A ``CLIENT`` end opens sessions, refuses incoming ones and may ask
hostd to hand its whole connection to the enclave at the other end of its
session; once hostd agrees the connection is ``SWITCHED``: what follows on
the stream is the session's raw TLS (:attr:`~RelayConnection.trailing_data`
holds what already arrived). An ``ENCLAVE`` end also serves incoming sessions
and, with ``takes_handoff``, takes an established one onto a connection of
its own (HANDOFF, the descriptor arriving beside the frame).

Session states, one table (:data:`TRANSITIONS`), every input named by
:class:`Input`::

    HANDSHAKE --authenticated--> ESTABLISHED --request_handoff--> HANDOFF_ASKED
        |                          |    ^                           |
        |                          |    +------ handoff refused ----+
        |                          +--HANDOFF (enclave)--+  +-- handoff accepted
        |                                                v  v
        +--(peer CLOSE, from any relayed state)-->  REMOTE_CLOSED   HANDED_OFF
    any state --close()/dropped--> CLOSED (the session leaves the table)

An id this end does not know is ``CLOSED``. The peer cannot make a session
input fail: every frame has an outcome in every state (often "ignored": a
frame that crossed a CLOSE in flight). A command the table does not allow
raises :class:`RelayLocalError` (nothing was sent); a frame the protocol
forbids (malformed, OPEN of an id that is open or not the relay's to
assign) raises :class:`RelayRemoteError` and the connection is ``BROKEN``.
Both name the role, the state and the input. A command on a session the
connection already ended (dropped, stream gone) does nothing: the driver
learns why from the event.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sgxvtpm.mux.limits import CONTROL_QUEUE_MAX, Admission
from sgxvtpm.wire.relay import (
    HEADER_SIZE,
    MAX_NAME,
    MAX_PAYLOAD,
    RELAY_ASSIGNED,
    Frame,
    FrameType,
    RelayDecoder,
    RelayProtocolError,
    RelayUsageError,
    encode,
    encode_header,
)

# CLOSE reasons (informational: the peer may show them, nobody relies on them).
CLOSED = "closed"
NOT_ACCEPTED = "not accepted"
BUSY = "busy"
HANDSHAKE_TIMEOUT = "handshake timeout"
INPUT_LIMIT = "input limit"
NOT_DELIVERED = "not delivered"


class Role(enum.Enum):
    CLIENT = "client"
    ENCLAVE = "enclave"


class ConnectionState(enum.Enum):
    OPEN = "open"
    SWITCHED = "switched"  # a client's connection, handed off: no more frames
    ENDED = "ended"  # the peer ended the stream cleanly
    BROKEN = "broken"  # the peer broke the protocol


class SessionState(enum.Enum):
    HANDSHAKE = "handshake"
    ESTABLISHED = "established"
    HANDOFF_ASKED = "handoff asked"
    HANDED_OFF = "handed off"
    REMOTE_CLOSED = "remote closed"
    CLOSED = "closed"


class Input(enum.Enum):
    # commands of this end
    SEND = "send"
    CLOSE = "close"
    AUTHENTICATED = "authenticated"
    REQUEST_HANDOFF = "request_handoff"
    # frames from the peer
    DATA = "DATA"
    PEER_CLOSE = "CLOSE"
    HANDOFF = "HANDOFF"
    HANDOFF_ACCEPTED = "handoff accepted"
    HANDOFF_REFUSED = "handoff refused"
    # the connection's own decisions (admission, limits)
    DROP = "drop"


S = SessionState
I = Input  # noqa: E741
#: The one state table: state -> input -> next state; None = ignored (no
#: change, no event). A command missing from its state's row is local misuse;
#: the inputs from the peer and the limits have an entry in every state they
#: can reach.
TRANSITIONS: Mapping[SessionState, Mapping[Input, SessionState | None]] = {
    S.HANDSHAKE: {
        I.SEND: S.HANDSHAKE,
        I.CLOSE: S.CLOSED,
        I.AUTHENTICATED: S.ESTABLISHED,
        I.DATA: S.HANDSHAKE,
        I.PEER_CLOSE: S.REMOTE_CLOSED,
        I.HANDOFF: None,  # only an authenticated session leaves the relay
        I.DROP: S.CLOSED,
    },
    S.ESTABLISHED: {
        I.SEND: S.ESTABLISHED,
        I.CLOSE: S.CLOSED,
        I.REQUEST_HANDOFF: S.HANDOFF_ASKED,
        I.DATA: S.ESTABLISHED,
        I.PEER_CLOSE: S.REMOTE_CLOSED,
        I.HANDOFF: S.HANDED_OFF,
        I.DROP: S.CLOSED,
    },
    S.HANDOFF_ASKED: {  # sending waits for hostd's answer
        I.CLOSE: S.CLOSED,
        I.DATA: S.HANDOFF_ASKED,
        I.PEER_CLOSE: S.REMOTE_CLOSED,
        I.HANDOFF: None,
        I.HANDOFF_ACCEPTED: S.HANDED_OFF,
        I.HANDOFF_REFUSED: S.ESTABLISHED,
        I.DROP: S.CLOSED,
    },
    S.HANDED_OFF: {  # its bytes travel on a connection of its own
        I.CLOSE: S.CLOSED,
        I.DATA: None,
        I.PEER_CLOSE: None,
        I.HANDOFF: None,
    },
    S.REMOTE_CLOSED: {  # hostd forgot it; this end may still say goodbye
        I.SEND: S.REMOTE_CLOSED,
        I.CLOSE: S.CLOSED,
        I.AUTHENTICATED: S.REMOTE_CLOSED,
        I.DATA: None,
        I.PEER_CLOSE: None,
        I.HANDOFF: None,
        I.HANDOFF_ACCEPTED: S.HANDED_OFF,
        I.HANDOFF_REFUSED: S.REMOTE_CLOSED,
        I.DROP: S.CLOSED,
    },
    S.CLOSED: {  # unknown to this end: commands and frames alike do nothing
        I.SEND: None,
        I.CLOSE: None,
        I.AUTHENTICATED: None,
        I.DATA: None,
        I.PEER_CLOSE: None,
        I.HANDOFF: None,
    },
}
del S, I


class RelayLocalError(RelayUsageError):
    """This end used the relay connection wrongly; nothing was sent."""

    def __init__(
        self, role: Role, state: SessionState | ConnectionState, what: str, sid: int | None = None
    ) -> None:
        self.role, self.state, self.input, self.session = role, state, what, sid
        where = "connection" if sid is None else f"session {sid:#x}"
        super().__init__(f"{role.value} end, {where} {state.value}: {what} is not allowed")


class RelayRemoteError(RelayProtocolError):
    """The peer broke the relay protocol; the connection is over."""

    def __init__(self, role: Role, state: ConnectionState, what: str) -> None:
        self.role, self.state, self.input = role, state, what
        super().__init__(f"{role.value} end, connection {state.value}: {what}")


# -- events --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionOpened:
    """The peer opened session ``sid`` and admission took it (enclave role).
    The driver starts a server session, or refuses with ``close(sid, NOT_ACCEPTED)``."""

    sid: int
    source: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes of session ``sid`` (with ``inbox_limit``: report them consumed)."""

    sid: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The peer closed session ``sid``; the driver ends it with :meth:`RelayConnection.close`."""

    sid: int
    reason: str


@dataclass(frozen=True, slots=True)
class SessionDropped:
    """This end dropped session ``sid`` (``reason``: busy, handshake timeout,
    input limit); its CLOSE is queued if it fits; the id is unknown from now on."""

    sid: int
    reason: str


@dataclass(frozen=True, slots=True)
class ControlReply:
    """hostd's answer to the CONTROL request :meth:`RelayConnection.control` numbered."""

    request_id: int
    reply: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Handoff:
    """A HANDOFF frame for ``sid`` arrived (with a descriptor beside it). If
    ``accepted`` the session is HANDED_OFF: its bytes go on that descriptor;
    otherwise the driver closes the descriptor."""

    sid: int
    accepted: bool


@dataclass(frozen=True, slots=True)
class HandoffAnswered:
    """hostd answered :meth:`RelayConnection.request_handoff`. If ``accepted``
    the connection is SWITCHED: from :attr:`RelayConnection.trailing_data` on,
    the stream carries session ``sid``'s bytes as they are."""

    sid: int
    accepted: bool


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """The peer ended the stream on a frame boundary; every session is over."""


Event = (
    SessionOpened
    | DataReceived
    | SessionClosed
    | SessionDropped
    | ControlReply
    | Handoff
    | HandoffAnswered
    | ConnectionEnded
)


@dataclass(slots=True, eq=False)
class _Session:
    sid: int
    state: SessionState
    incoming: bool
    unread: int = 0  # delivered, not yet consumed (counted with an inbox_limit)


class RelayConnection:
    """One end of a relay connection; see the module docstring.

    ``backlog`` tells how many bytes the driver's transport still holds (taken
    from :meth:`data_to_send`, not yet written); with the bytes held here it is
    what ``out_limit`` bounds. ``clock`` is the time admission deadlines use.
    """

    def __init__(
        self,
        role: Role,
        *,
        admission: Admission | None = None,
        takes_handoff: bool = False,
        out_limit: int | None = None,
        inbox_limit: int | None = None,
        backlog: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.role = role
        self._admission = admission if admission is not None else Admission()
        self._takes_handoff = takes_handoff
        self._out_limit = out_limit
        self._inbox_limit = inbox_limit
        self._transport_backlog = backlog
        self._clock = clock
        self._state = ConnectionState.OPEN
        self._error: RelayRemoteError | None = None
        self._decoder = RelayDecoder()
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._sessions: dict[int, _Session] = {}
        self._next_sid = 1
        self._next_request = 1
        self._requests: dict[int, int | None] = {}  # CONTROL id -> session of a handoff
        self._trailing = b""

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    def session_state(self, sid: int) -> SessionState:
        session = self._sessions.get(sid)
        return SessionState.CLOSED if session is None else session.state

    @property
    def sessions(self) -> dict[int, SessionState]:
        """Every session this end knows, and its state."""
        return {sid: s.state for sid, s in self._sessions.items()}

    @property
    def backlog(self) -> int:
        """Unsent bytes: held here, and (``backlog``) in the driver's transport."""
        held = len(self._out)
        return held if self._transport_backlog is None else held + self._transport_backlog()

    @property
    def pending_requests(self) -> int:
        """CONTROL requests (handoff included) hostd has not answered."""
        return len(self._requests)

    @property
    def trailing_data(self) -> bytes:
        """After the handoff was accepted: what arrived after hostd's answer,
        the first bytes of the session's own stream."""
        if self._state is not ConnectionState.SWITCHED:
            raise RelayLocalError(self.role, self._state, "trailing_data")
        return self._trailing

    def next_deadline(self) -> float | None:
        """When :meth:`expire` has work: the oldest handshake's deadline."""
        return self._admission.next_deadline()

    # -- bytes in, events out ----------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the stream; ``b""`` when it ended."""
        if self._state is not ConnectionState.OPEN:
            raise self._error or RelayLocalError(self.role, self._state, "receive_data")
        self._decoder.receive_data(data)

    def next_event(self) -> Event | None:
        """The next event; None when more bytes are needed (or none will come)."""
        while not self._events:
            if self._state is not ConnectionState.OPEN:
                if self._error is not None:
                    raise self._error
                return None
            try:
                frame = self._decoder.next_frame()
            except RelayProtocolError as exc:
                raise self._broken(f"malformed frame: {exc}") from None
            if frame is not None:
                self._on_frame(frame)
            elif self._decoder.at_clean_end:
                self._finish(ConnectionState.ENDED)
                self._events.append(ConnectionEnded())
            else:
                return None
        return self._events.popleft()

    # -- commands in, bytes out ----------------------------------------------

    def data_to_send(self) -> bytearray:
        """Everything queued for the stream since the last call."""
        out, self._out = self._out, bytearray()
        return out

    def open(self, target: str) -> int:
        """Queue OPEN(``target``); the new session's id (HANDSHAKE)."""
        self._require_open("open")
        name = target.encode("utf-8")
        if not 0 < len(name) <= MAX_NAME:
            raise RelayLocalError(self.role, self._state, f"open of a {len(name)}-byte target")
        sid = self._next_sid
        if sid >= RELAY_ASSIGNED:
            raise RelayLocalError(self.role, self._state, "open: session ids exhausted")
        self._next_sid = sid + 1
        self._sessions[sid] = _Session(sid, SessionState.HANDSHAKE, incoming=False)
        self._out += encode_header(FrameType.OPEN, sid, len(name))
        self._out += name
        return sid

    def send(self, sid: int, data: bytes | bytearray) -> bool:
        """Queue ``data`` for session ``sid`` in DATA frames of at most
        MAX_PAYLOAD bytes. False if the session is closed, or was just dropped
        because the output would pass ``out_limit`` (its CLOSE is queued if it fits)."""
        session = self._sessions.get(sid)
        if not self._fire(session, sid, Input.SEND):
            return False
        assert session is not None
        size = len(data) + -(-len(data) // MAX_PAYLOAD) * HEADER_SIZE
        if self._out_limit is not None and self.backlog + size > self._out_limit:
            self._drop(session, NOT_DELIVERED)
            return False
        view = memoryview(data)
        for start in range(0, len(data), MAX_PAYLOAD):
            chunk = view[start : start + MAX_PAYLOAD]
            self._out += encode_header(FrameType.DATA, sid, len(chunk))
            self._out += chunk
        return True

    def close(self, sid: int, reason: str = CLOSED) -> None:
        """End session ``sid``: CLOSE(``reason``) if it is still relayed and
        fits; nothing if the connection already forgot it."""
        session = self._sessions.get(sid)
        was = self.session_state(sid)
        if self._fire(session, sid, Input.CLOSE) and was is not SessionState.HANDED_OFF:
            self._queue_close(sid, reason)

    def authenticated(self, sid: int) -> None:
        """The peer of session ``sid`` is authenticated: its admission slot is free."""
        self._fire(self._sessions.get(sid), sid, Input.AUTHENTICATED)

    def consumed(self, sid: int, n: int) -> None:
        """The driver's session took in ``n`` bytes of what it was delivered."""
        session = self._sessions.get(sid)
        if session is None:
            return
        if not 0 <= n <= session.unread:
            raise RelayLocalError(self.role, session.state, f"consumed({n})", sid)
        session.unread -= n

    def control(self, request: Mapping[str, Any]) -> int:
        """Queue a CONTROL request to hostd; its id, which the reply echoes."""
        self._require_open("control")
        self._check_request_room()
        return self._request(request, None)

    def request_handoff(self, sid: int) -> int:
        """Ask hostd to hand this connection to the enclave at the other end
        of session ``sid`` (client role, an established session; send nothing
        until :class:`HandoffAnswered`). The request's id."""
        if self.role is not Role.CLIENT:
            raise RelayLocalError(self.role, self._state, "request_handoff")
        self._require_open("request_handoff")
        self._check_request_room()
        self._fire(self._sessions.get(sid), sid, Input.REQUEST_HANDOFF)
        return self._request({"op": "handoff", "session": sid}, sid)

    def expire(self) -> None:
        """Drop the sessions whose handshake deadline passed (events follow)."""
        for sid in self._admission.expired(self._clock()):
            self._drop(self._sessions[sid], HANDSHAKE_TIMEOUT, event=True)

    # -- internals ---------------------------------------------------------

    def _fire(self, session: _Session | None, sid: int, what: Input) -> bool:
        """Apply input ``what`` to a session by :data:`TRANSITIONS`; False if ignored."""
        state = SessionState.CLOSED if session is None else session.state
        row = TRANSITIONS[state]
        if what not in row:
            raise RelayLocalError(self.role, state, what.value, sid)
        target = row[what]
        if target is None:
            return False
        assert session is not None
        if state is SessionState.HANDSHAKE and target is not state:
            self._admission.done(sid)
        if target is SessionState.CLOSED:
            del self._sessions[sid]
        session.state = target
        return True

    def _require_open(self, what: str) -> None:
        if self._state is not ConnectionState.OPEN:
            raise RelayLocalError(self.role, self._state, what)

    def _check_request_room(self) -> None:
        if len(self._requests) >= CONTROL_QUEUE_MAX:
            raise RelayLocalError(
                self.role, self._state, f"more than {CONTROL_QUEUE_MAX} CONTROL requests"
            )

    def _request(self, request: Mapping[str, Any], sid: int | None) -> int:
        rid = self._next_request
        frame = encode(Frame.control({**request, "id": rid}))
        self._next_request = rid + 1
        self._requests[rid] = sid
        self._out += frame
        return rid

    def _queue_bounded(self, frame: bytes) -> bool:
        if self._out_limit is not None and self.backlog + len(frame) > self._out_limit:
            return False  # the peer does not read: it could not hear it anyway
        self._out += frame
        return True

    def _queue_close(self, sid: int, reason: str) -> None:
        self._queue_bounded(encode(Frame.close(sid, reason)))

    def _drop(self, session: _Session, reason: str, *, event: bool = False) -> None:
        self._fire(session, session.sid, Input.DROP)
        self._queue_close(session.sid, reason)
        if event:
            self._events.append(SessionDropped(session.sid, reason))

    def _finish(self, state: ConnectionState) -> None:
        self._state = state
        for sid in self._sessions:
            self._admission.done(sid)
        self._sessions.clear()
        self._requests.clear()

    def _broken(self, what: str) -> RelayRemoteError:
        self._error = RelayRemoteError(self.role, self._state, what)
        self._finish(ConnectionState.BROKEN)
        return self._error

    def _on_frame(self, frame: Frame) -> None:
        ftype, sid = frame.type, frame.session_id
        if ftype is FrameType.DATA:
            self._on_data(sid, frame.payload)
        elif ftype is FrameType.CLOSE:
            if self._fire(self._sessions.get(sid), sid, Input.PEER_CLOSE):
                self._events.append(SessionClosed(sid, frame.text))
        elif ftype is FrameType.OPEN:
            self._on_open(sid, frame.text)
        elif ftype is FrameType.HANDOFF:
            session = self._sessions.get(sid)
            accepted = (
                self._takes_handoff
                and session is not None
                and session.incoming
                and self._fire(session, sid, Input.HANDOFF)
            )
            self._events.append(Handoff(sid, accepted))
        elif ftype is FrameType.TPM:
            # Host-TPM frames stop at the enclave's tap (platform/host_tpm.py).
            raise self._broken("a TPM frame outside an enclave's host-TPM tap")
        else:
            self._on_control(frame.control_object())

    def _on_data(self, sid: int, payload: bytes) -> None:
        session = self._sessions.get(sid)
        # Unknown or closed: it crossed a CLOSE in flight. Empty: it carries nothing.
        if not payload or not self._fire(session, sid, Input.DATA):
            return
        assert session is not None
        if self._inbox_limit is not None:
            if session.unread + len(payload) > self._inbox_limit:
                self._drop(session, INPUT_LIMIT, event=True)
                return
            session.unread += len(payload)
        self._events.append(DataReceived(sid, payload))

    def _on_open(self, sid: int, source: str) -> None:
        if sid < RELAY_ASSIGNED:
            raise self._broken(f"OPEN of session {sid:#x}, an id this end assigns")
        if sid in self._sessions:
            raise self._broken(f"OPEN of session {sid:#x}, which is open")
        if self.role is Role.CLIENT:
            self._queue_close(sid, NOT_ACCEPTED)
            return
        verdict = self._admission.admit(sid, self._clock())
        if not verdict.accepted:
            self._queue_close(sid, BUSY)
            return
        if verdict.evicted is not None:
            self._drop(self._sessions[verdict.evicted], BUSY, event=True)
        self._sessions[sid] = _Session(sid, SessionState.HANDSHAKE, incoming=True)
        self._events.append(SessionOpened(sid, source))

    def _on_control(self, reply: dict[str, Any]) -> None:
        rid = reply.get("id")
        if type(rid) is not int or rid not in self._requests:
            return  # not an answer to this end: nothing to do with it
        sid = self._requests.pop(rid)
        if sid is None:
            self._events.append(ControlReply(rid, reply))
            return
        accepted = reply.get("ok") is True
        session = self._sessions.get(sid)
        if session is not None:
            self._fire(session, sid, Input.HANDOFF_ACCEPTED if accepted else Input.HANDOFF_REFUSED)
        if accepted:
            # hostd sends nothing after its answer: the rest is the session's.
            self._trailing = self._decoder.trailing_data()
            self._state = ConnectionState.SWITCHED
            self._sessions = {sid: session} if session is not None else {}
            self._requests.clear()
        self._events.append(HandoffAnswered(sid, accepted))
