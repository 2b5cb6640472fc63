"""The sans-IO relay connection (sgxvtpm.mux.connection): a model-based
hypothesis state machine over both roles, then focused cases.

The machine plays both the driver (commands) and the peer (frames, fed in
random pieces), keeps its own model of the sessions table, the admission,
the CONTROL requests and the bytes queued for the stream, and checks every
event and every byte the connection produces against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from sgxvtpm.mux.connection import (
    BUSY,
    HANDSHAKE_TIMEOUT,
    INPUT_LIMIT,
    NOT_ACCEPTED,
    NOT_DELIVERED,
    TRANSITIONS,
    ConnectionEnded,
    ConnectionState,
    ControlReply,
    DataReceived,
    Event,
    Handoff,
    HandoffAnswered,
    Input,
    RelayConnection,
    RelayLocalError,
    RelayRemoteError,
    Role,
    SessionClosed,
    SessionDropped,
    SessionOpened,
    SessionState,
)
from sgxvtpm.mux.limits import CONTROL_QUEUE_MAX, Admission
from sgxvtpm.wire.relay import (
    CONTROL_SESSION,
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
)

S = SessionState
OPEN, SWITCHED, ENDED, BROKEN = (
    ConnectionState.OPEN,
    ConnectionState.SWITCHED,
    ConnectionState.ENDED,
    ConnectionState.BROKEN,
)
SIZES = [0, 1, 100, MAX_PAYLOAD - HEADER_SIZE, MAX_PAYLOAD, MAX_PAYLOAD + 1, 2 * MAX_PAYLOAD + 7]


@dataclass
class Model:
    state: S
    incoming: bool
    unread: int = 0


def drain(conn: RelayConnection) -> list[Event]:
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


def frames_of(data: bytes) -> list[Frame]:
    decoder = RelayDecoder()
    decoder.receive_data(data)
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    assert decoder.trailing_data() == b""
    return out


class RelayConnectionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.external = 0
        self.steps = 0  # the stream ends or breaks only after a while: sessions get far

    @initialize(
        role=st.sampled_from(Role),
        takes_handoff=st.booleans(),
        out_limit=st.sampled_from([None, 40, 200, 4 * MAX_PAYLOAD]),
        inbox_limit=st.sampled_from([None, 50, 3 * MAX_PAYLOAD]),
        with_backlog=st.booleans(),
        limit=st.integers(1, 3),
    )
    def setup(
        self,
        role: Role,
        takes_handoff: bool,
        out_limit: int | None,
        inbox_limit: int | None,
        with_backlog: bool,
        limit: int,
    ) -> None:
        self.role = role
        self.takes_handoff = takes_handoff
        self.out_limit = out_limit
        self.inbox_limit = inbox_limit
        self.with_backlog = with_backlog
        self.conn = RelayConnection(
            role,
            admission=Admission(limit=limit, grace=1.0, timeout=5.0),
            takes_handoff=takes_handoff,
            out_limit=out_limit,
            inbox_limit=inbox_limit,
            backlog=(lambda: self.external) if with_backlog else None,
            clock=lambda: self.now,
        )
        # The model, with an Admission of its own as the oracle of admit/expire.
        self.admission = Admission(limit=limit, grace=1.0, timeout=5.0)
        self.state = OPEN
        self.sessions: dict[int, Model] = {}
        self.next_sid = 1
        self.next_incoming = RELAY_ASSIGNED
        self.requests: dict[int, int | None] = {}
        self.next_rid = 1
        self.expected: list[Frame] = []  # queued for the stream, not yet taken
        self.trailing = b""

    # -- the model's helpers ----------------------------------------------

    def queued_size(self) -> int:
        return sum(HEADER_SIZE + len(f.payload) for f in self.expected)

    def backlog(self) -> int:
        return self.queued_size() + (self.external if self.with_backlog else 0)

    def queue_bounded(self, frame: Frame) -> None:
        size = HEADER_SIZE + len(frame.payload)
        if self.out_limit is None or self.backlog() + size <= self.out_limit:
            self.expected.append(frame)

    def leave(self, sid: int) -> None:
        del self.sessions[sid]
        self.admission.done(sid)

    def drop(self, sid: int, reason: str) -> None:
        self.leave(sid)
        self.queue_bounded(Frame.close(sid, reason))

    def state_of(self, sid: int) -> S:
        model = self.sessions.get(sid)
        return S.CLOSED if model is None else model.state

    def set_state(self, sid: int, state: S) -> None:
        if self.sessions[sid].state is S.HANDSHAKE and state is not S.HANDSHAKE:
            self.admission.done(sid)
        self.sessions[sid].state = state

    def finish(self, state: ConnectionState) -> None:
        self.state = state
        for sid in list(self.sessions):
            self.leave(sid)
        self.requests.clear()

    def some_sid(self, data: st.DataObject, prefer: S | None = None) -> int:
        """Mostly a session this end knows (most of all one in state ``prefer``:
        where the input does something); sometimes one it does not know (yet)."""
        known = sorted(self.sessions)
        preferred = [sid for sid in known if self.sessions[sid].state is prefer]
        choices = [*preferred * 6, *known * 3, 1, self.next_sid, RELAY_ASSIGNED, self.next_incoming]
        return data.draw(st.sampled_from(choices))

    def feed(self, data: st.DataObject, raw: bytes, trailing: bytes = b"") -> list[Event]:
        """Deliver ``raw`` (one frame) in pieces, then its events."""
        cuts = sorted(data.draw(st.lists(st.integers(1, len(raw) - 1), max_size=3)))
        pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        for piece in filter(None, pieces[:-1]):
            self.conn.receive_data(piece)
            assert self.conn.next_event() is None
        self.conn.receive_data(pieces[-1] + trailing)
        return drain(self.conn)

    def local_error(self, fn: Any, *args: Any) -> None:
        with pytest.raises(RelayLocalError) as info:
            fn(*args)
        assert info.value.role is self.role

    # -- commands ------------------------------------------------------------

    @rule(name=st.sampled_from(["vm", "instance-1", "é" * 3, "", "x" * (MAX_NAME + 1)]))
    def open(self, name: str) -> None:
        if self.state is not OPEN or not 0 < len(name.encode()) <= MAX_NAME:
            self.local_error(self.conn.open, name)
            return
        assert self.conn.open(name) == self.next_sid
        self.sessions[self.next_sid] = Model(S.HANDSHAKE, incoming=False)
        self.expected.append(Frame.open(self.next_sid, name))
        self.next_sid += 1

    @rule(data=st.data(), size=st.sampled_from(SIZES))
    def send(self, data: st.DataObject, size: int) -> None:
        sid = self.some_sid(data)
        payload = bytes([sid & 0xFF]) * size
        state = self.state_of(sid)
        if Input.SEND not in TRANSITIONS[state]:
            self.local_error(self.conn.send, sid, payload)
            return
        sent = self.conn.send(sid, payload)
        if state is S.CLOSED:
            assert sent is False
            return
        chunks = [payload[i : i + MAX_PAYLOAD] for i in range(0, size, MAX_PAYLOAD)]
        need = size + HEADER_SIZE * len(chunks)
        if self.out_limit is not None and self.backlog() + need > self.out_limit:
            assert sent is False
            self.drop(sid, NOT_DELIVERED)
            return
        assert sent is True
        self.expected += [Frame.data(sid, chunk) for chunk in chunks]

    @rule(data=st.data(), reason=st.sampled_from(["closed", "bye", ""]))
    def close(self, data: st.DataObject, reason: str) -> None:
        sid = self.some_sid(data)
        state = self.state_of(sid)
        self.conn.close(sid, reason)
        if state is S.CLOSED:
            return
        self.leave(sid)
        if state is not S.HANDED_OFF:
            self.queue_bounded(Frame.close(sid, reason))

    @rule(data=st.data())
    def authenticated(self, data: st.DataObject) -> None:
        self.authenticated_sid(self.some_sid(data, S.HANDSHAKE))

    def authenticated_sid(self, sid: int) -> None:
        state = self.state_of(sid)
        if Input.AUTHENTICATED not in TRANSITIONS[state]:
            self.local_error(self.conn.authenticated, sid)
            return
        self.conn.authenticated(sid)
        if state is S.HANDSHAKE:
            self.set_state(sid, S.ESTABLISHED)

    @rule(data=st.data())
    def consumed(self, data: st.DataObject) -> None:
        sid = self.some_sid(data)
        model = self.sessions.get(sid)
        n = data.draw(st.integers(-1, (model.unread if model else 0) + 1))
        if model is not None and not 0 <= n <= model.unread:
            self.local_error(self.conn.consumed, sid, n)
            return
        self.conn.consumed(sid, n)
        if model is not None:
            model.unread -= n

    @rule(op=st.sampled_from(["launch", "ping"]))
    def control(self, op: str) -> None:
        if self.state is not OPEN or len(self.requests) >= CONTROL_QUEUE_MAX:
            self.local_error(self.conn.control, {"op": op})
            return
        assert self.conn.control({"op": op, "id": "mine"}) == self.next_rid
        self.requests[self.next_rid] = None
        self.expected.append(Frame.control({"op": op, "id": self.next_rid}))
        self.next_rid += 1

    @rule(data=st.data())
    def request_handoff(self, data: st.DataObject) -> None:
        sid = self.some_sid(data, S.ESTABLISHED)
        if (
            self.role is not Role.CLIENT
            or self.state is not OPEN
            or len(self.requests) >= CONTROL_QUEUE_MAX
            or self.state_of(sid) is not S.ESTABLISHED
        ):
            before = self.conn.session_state(sid)
            self.local_error(self.conn.request_handoff, sid)
            assert self.conn.session_state(sid) is before
            return
        assert self.conn.request_handoff(sid) == self.next_rid
        self.set_state(sid, S.HANDOFF_ASKED)
        self.requests[self.next_rid] = sid
        self.expected.append(Frame.control({"op": "handoff", "session": sid, "id": self.next_rid}))
        self.next_rid += 1

    @precondition(lambda self: self.state is OPEN)
    @rule(data=st.data())
    def a_session_comes_up(self, data: st.DataObject) -> None:
        """Open a session (this end's or the peer's) and authenticate it."""
        before = set(self.sessions)
        if self.role is Role.CLIENT:
            self.open("instance-1")
        else:
            self.peer_open(data, "new", "client")
        for sid in set(self.sessions) - before:
            self.authenticated_sid(sid)

    @rule(dt=st.sampled_from([0.0, 0.5, 1.5, 6.0]))
    def expire(self, dt: float) -> None:
        self.now += dt
        self.conn.expire()
        expected = []
        for sid in self.admission.expired(self.now):
            self.drop(sid, HANDSHAKE_TIMEOUT)
            expected.append(SessionDropped(sid, HANDSHAKE_TIMEOUT))
        if self.state is BROKEN:
            assert expected == []
            with pytest.raises(RelayRemoteError):
                self.conn.next_event()
        else:
            assert drain(self.conn) == expected

    @rule()
    def take_output(self) -> None:
        assert frames_of(self.conn.data_to_send()) == self.expected
        self.expected = []

    @rule(n=st.sampled_from([0, 30, 150, 10 * MAX_PAYLOAD]))
    def transport_backlog(self, n: int) -> None:
        self.external = n

    # -- frames from the peer --------------------------------------------------

    @precondition(lambda self: self.state is OPEN)
    @rule(data=st.data(), kind=st.sampled_from(["new", "new", "low", "again"]), source=st.text())
    def peer_open(self, data: st.DataObject, kind: str, source: str) -> None:
        source = source.encode("utf-8", "replace")[:MAX_NAME].decode("utf-8", "ignore") or "c"
        if self.steps <= 30:
            kind = "new"  # the bad ones end the connection: later
        if kind == "low":
            sid = data.draw(st.integers(1, RELAY_ASSIGNED - 1))
        elif kind == "again" and any(sid >= RELAY_ASSIGNED for sid in self.sessions):
            sid = data.draw(st.sampled_from([s for s in self.sessions if s >= RELAY_ASSIGNED]))
        else:
            sid = self.next_incoming
            self.next_incoming += 1
        raw = encode(Frame.open(sid, source))
        if sid < RELAY_ASSIGNED or sid in self.sessions:
            self.broken(data, raw)
            return
        events = self.feed(data, raw)
        expected: list[Event] = []
        if self.role is Role.CLIENT:
            self.queue_bounded(Frame.close(sid, NOT_ACCEPTED))
        else:
            verdict = self.admission.admit(sid, self.now)
            if not verdict.accepted:
                self.queue_bounded(Frame.close(sid, BUSY))
            else:
                if verdict.evicted is not None:
                    self.drop(verdict.evicted, BUSY)
                    expected.append(SessionDropped(verdict.evicted, BUSY))
                self.sessions[sid] = Model(S.HANDSHAKE, incoming=True)
                expected.append(SessionOpened(sid, source))
        assert events == expected

    @precondition(lambda self: self.state is OPEN)
    @rule(data=st.data(), size=st.sampled_from([0, 1, 30, 60, MAX_PAYLOAD]))
    def peer_data(self, data: st.DataObject, size: int) -> None:
        sid = self.some_sid(data)
        payload = bytes([7]) * size
        events = self.feed(data, encode(Frame.data(sid, payload)))
        model = self.sessions.get(sid)
        if not payload or model is None or TRANSITIONS[model.state][Input.DATA] is None:
            assert events == []
        elif self.inbox_limit is not None and model.unread + size > self.inbox_limit:
            self.drop(sid, INPUT_LIMIT)
            assert events == [SessionDropped(sid, INPUT_LIMIT)]
        else:
            if self.inbox_limit is not None:
                model.unread += size
            assert events == [DataReceived(sid, payload)]

    @precondition(lambda self: self.state is OPEN)
    @rule(data=st.data(), reason=st.sampled_from(["peer gone", ""]))
    def peer_close(self, data: st.DataObject, reason: str) -> None:
        sid = self.some_sid(data)
        events = self.feed(data, encode(Frame.close(sid, reason)))
        if TRANSITIONS[self.state_of(sid)][Input.PEER_CLOSE] is None:
            assert events == []
        else:
            self.set_state(sid, S.REMOTE_CLOSED)
            assert events == [SessionClosed(sid, reason)]

    @precondition(lambda self: self.state is OPEN)
    @rule(data=st.data())
    def peer_handoff(self, data: st.DataObject) -> None:
        sid = self.some_sid(data, S.ESTABLISHED)
        events = self.feed(data, encode(Frame(FrameType.HANDOFF, sid)))
        model = self.sessions.get(sid)
        accepted = (
            self.takes_handoff
            and model is not None
            and model.incoming
            and model.state is S.ESTABLISHED
        )
        if accepted:
            self.set_state(sid, S.HANDED_OFF)
        assert events == [Handoff(sid, accepted)]

    @precondition(lambda self: self.state is OPEN)
    @rule(
        data=st.data(),
        ok=st.sampled_from([True, False, 1, None]),
        stray=st.sampled_from([None, "1", True, 99]),
        trailing=st.binary(max_size=20),
    )
    def peer_control(
        self, data: st.DataObject, ok: Any, stray: Any, trailing: bytes
    ) -> None:
        handoffs = [rid for rid, sid in self.requests.items() if sid is not None]
        rid: Any = (
            data.draw(st.sampled_from([*handoffs * 4, *self.requests]))
            if self.requests
            else stray
        )
        reply: dict[str, Any] = {"ok": ok} if rid is None else {"ok": ok, "id": rid}
        raw = encode(Frame.control(reply))
        if type(rid) is not int or rid not in self.requests:
            assert self.feed(data, raw) == []
            return
        sid = self.requests.pop(rid)
        if sid is None:
            assert self.feed(data, raw) == [ControlReply(rid, reply)]
            return
        accepted = ok is True
        events = self.feed(data, raw, trailing if accepted else b"")
        if sid in self.sessions:
            state = self.sessions[sid].state
            after = {
                (S.HANDOFF_ASKED, True): S.HANDED_OFF,
                (S.HANDOFF_ASKED, False): S.ESTABLISHED,
                (S.REMOTE_CLOSED, True): S.HANDED_OFF,
                (S.REMOTE_CLOSED, False): S.REMOTE_CLOSED,
            }[(state, accepted)]
            self.set_state(sid, after)
        if accepted:
            self.state = SWITCHED
            for other in [s for s in self.sessions if s != sid]:
                self.leave(other)
            self.requests.clear()
            self.trailing = trailing
        assert events == [HandoffAnswered(sid, accepted)]

    @precondition(lambda self: self.state is OPEN and self.steps > 30)
    @rule(data=st.data(), raw=st.sampled_from([b"\x09" + bytes(8), encode(Frame.open(1, "x"))[:5]]))
    def peer_breaks_the_protocol(self, data: st.DataObject, raw: bytes) -> None:
        """An unknown frame type; or a frame cut by the end of the stream."""
        self.broken(data, raw, eof=len(raw) < HEADER_SIZE)

    def broken(self, data: st.DataObject, raw: bytes, eof: bool = False) -> None:
        with pytest.raises(RelayRemoteError) as info:
            self.feed(data, raw)
            if eof:
                self.conn.receive_data(b"")
                self.conn.next_event()
        assert info.value.role is self.role and info.value.state is OPEN
        self.finish(BROKEN)
        for call in (self.conn.next_event, lambda: self.conn.receive_data(b"x")):
            with pytest.raises(RelayRemoteError) as again:
                call()
            assert again.value is info.value

    @precondition(lambda self: self.state is OPEN and self.steps > 30)
    @rule()
    def peer_ends_the_stream(self) -> None:
        self.conn.receive_data(b"")
        assert drain(self.conn) == [ConnectionEnded()]
        self.finish(ENDED)
        assert self.conn.next_event() is None

    @precondition(lambda self: self.state in (ENDED, SWITCHED))
    @rule()
    def no_more_bytes_in(self) -> None:
        self.local_error(self.conn.receive_data, b"\x02")
        assert self.conn.next_event() is None

    # -- invariants ----------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self) -> None:
        if not hasattr(self, "conn"):
            return
        self.steps += 1
        conn = self.conn
        assert conn.state is self.state
        assert conn.sessions == {sid: m.state for sid, m in self.sessions.items()}
        assert conn.pending_requests == len(self.requests)
        assert conn.backlog == self.backlog()
        assert conn.next_deadline() == self.admission.next_deadline()
        if self.state is SWITCHED:
            assert conn.trailing_data == self.trailing
        else:
            with pytest.raises(RelayLocalError):
                conn.trailing_data  # noqa: B018


RelayConnectionMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestRelayConnection = RelayConnectionMachine.TestCase


# ------------------------------------------------------------------ focused cases


def test_the_table_has_an_outcome_for_every_peer_input_in_every_reachable_state() -> None:
    peer = [Input.DATA, Input.PEER_CLOSE, Input.HANDOFF]
    for state, row in TRANSITIONS.items():
        assert all(i in row for i in peer), state
    for state in (S.HANDSHAKE, S.ESTABLISHED, S.HANDOFF_ASKED, S.REMOTE_CLOSED):
        assert Input.DROP in TRANSITIONS[state]
    for state in (S.HANDOFF_ASKED, S.REMOTE_CLOSED):
        assert {Input.HANDOFF_ACCEPTED, Input.HANDOFF_REFUSED} <= TRANSITIONS[state].keys()


def test_errors_name_the_role_the_state_and_the_input() -> None:
    client = RelayConnection(Role.CLIENT)
    sid = client.open("instance-1")
    with pytest.raises(RelayLocalError) as local:
        client.request_handoff(sid)
    assert local.value.role is Role.CLIENT
    assert local.value.state is S.HANDSHAKE
    assert local.value.input == "request_handoff" and local.value.session == sid
    assert str(local.value) == (
        "client end, session 0x1 handshake: request_handoff is not allowed"
    )
    assert isinstance(local.value, RelayUsageError)

    enclave = RelayConnection(Role.ENCLAVE)
    with pytest.raises(RelayLocalError, match="enclave end, connection open: request_handoff"):
        enclave.request_handoff(1)
    enclave.receive_data(encode(Frame.open(5, "client")))
    with pytest.raises(RelayRemoteError) as remote:
        enclave.next_event()
    assert remote.value.role is Role.ENCLAVE and remote.value.state is OPEN
    assert "OPEN of session 0x5" in str(remote.value)
    assert isinstance(remote.value, RelayProtocolError)
    assert enclave.state is BROKEN


def test_a_client_hands_its_connection_off_and_keeps_what_came_after() -> None:
    conn = RelayConnection(Role.CLIENT)
    sid = conn.open("instance-1")
    conn.send(sid, b"hello")
    conn.receive_data(encode(Frame.data(sid, b"server flight")))
    assert drain(conn) == [DataReceived(sid, b"server flight")]
    conn.authenticated(sid)
    rid = conn.request_handoff(sid)
    with pytest.raises(RelayLocalError, match="handoff asked: send"):
        conn.send(sid, b"too early")
    assert [f.type for f in frames_of(conn.data_to_send())] == [
        FrameType.OPEN, FrameType.DATA, FrameType.CONTROL,
    ]
    conn.receive_data(encode(Frame.control({"ok": True, "id": rid})) + b"\x17\x03\x03raw")
    assert drain(conn) == [HandoffAnswered(sid, True)]
    assert conn.state is SWITCHED and conn.session_state(sid) is S.HANDED_OFF
    assert conn.trailing_data == b"\x17\x03\x03raw"
    with pytest.raises(RelayLocalError, match="handed off: send"):
        conn.send(sid, b"raw now")
    conn.close(sid)
    assert conn.data_to_send() == b""  # no CLOSE: hostd no longer relays it


def test_a_refused_handoff_keeps_the_relay() -> None:
    conn = RelayConnection(Role.CLIENT)
    sid = conn.open("instance-1")
    conn.authenticated(sid)
    rid = conn.request_handoff(sid)
    conn.receive_data(encode(Frame.control({"ok": False, "id": rid})))
    assert drain(conn) == [HandoffAnswered(sid, False)]
    assert conn.state is OPEN and conn.session_state(sid) is S.ESTABLISHED
    assert conn.send(sid, b"still framed")


def test_an_enclave_takes_only_established_incoming_sessions() -> None:
    conn = RelayConnection(Role.ENCLAVE, takes_handoff=True)
    a, b = RELAY_ASSIGNED, RELAY_ASSIGNED + 1
    conn.receive_data(encode(Frame.open(a, "client")) + encode(Frame.open(b, "client")))
    assert drain(conn) == [SessionOpened(a, "client"), SessionOpened(b, "client")]
    conn.authenticated(a)
    mine = conn.open("instance-2")  # an enclave opens sessions too (the manager)
    conn.authenticated(mine)
    conn.receive_data(b"".join(encode(Frame(FrameType.HANDOFF, s)) for s in (a, b, mine, 99)))
    assert drain(conn) == [
        Handoff(a, True), Handoff(b, False), Handoff(mine, False), Handoff(99, False)
    ]
    assert conn.sessions == {a: S.HANDED_OFF, b: S.HANDSHAKE, mine: S.ESTABLISHED}


def test_admission_evicts_the_oldest_after_the_grace_and_expires_at_the_deadline() -> None:
    now = [0.0]
    conn = RelayConnection(
        Role.ENCLAVE, admission=Admission(limit=1, grace=0.1, timeout=0.5), clock=lambda: now[0]
    )
    a, b, c = RELAY_ASSIGNED, RELAY_ASSIGNED + 1, RELAY_ASSIGNED + 2
    conn.receive_data(encode(Frame.open(a, "x")) + encode(Frame.open(b, "x")))
    assert drain(conn) == [SessionOpened(a, "x")]
    now[0] = 0.2
    conn.receive_data(encode(Frame.open(c, "x")))
    assert drain(conn) == [SessionDropped(a, BUSY), SessionOpened(c, "x")]
    assert conn.next_deadline() == 0.7
    now[0] = 0.75
    conn.expire()
    assert drain(conn) == [SessionDropped(c, HANDSHAKE_TIMEOUT)]
    assert [(f.session_id, f.text) for f in frames_of(conn.data_to_send())] == [
        (b, BUSY), (a, BUSY), (c, HANDSHAKE_TIMEOUT),
    ]


def test_output_past_the_limit_drops_the_session_not_the_connection() -> None:
    transport = [0]
    conn = RelayConnection(Role.CLIENT, out_limit=1000, backlog=lambda: transport[0])
    one, two = conn.open("a"), conn.open("b")
    conn.data_to_send()
    transport[0] = 900
    assert not conn.send(one, bytes(200))
    assert conn.session_state(one) is S.CLOSED
    assert conn.send(two, bytes(50))
    assert [(f.type, f.session_id) for f in frames_of(conn.data_to_send())] == [
        (FrameType.CLOSE, one), (FrameType.DATA, two)
    ]


def test_data_is_chunked_to_max_payload() -> None:
    conn = RelayConnection(Role.CLIENT)
    sid = conn.open("a")
    conn.data_to_send()
    data = bytes(range(256)) * (2 * MAX_PAYLOAD // 256 + 3)
    assert conn.send(sid, data)
    frames = frames_of(conn.data_to_send())
    assert [len(f.payload) for f in frames] == [MAX_PAYLOAD, MAX_PAYLOAD, len(data) % MAX_PAYLOAD]
    assert b"".join(f.payload for f in frames) == data


def test_session_ids_run_out_below_the_relay_half() -> None:
    conn = RelayConnection(Role.CLIENT)
    conn._next_sid = RELAY_ASSIGNED - 1
    assert conn.open("a") == RELAY_ASSIGNED - 1
    with pytest.raises(RelayLocalError, match="session ids exhausted"):
        conn.open("a")


def test_a_session_closed_while_its_handoff_was_asked_still_switches_the_connection() -> None:
    conn = RelayConnection(Role.CLIENT)
    sid = conn.open("instance-1")
    conn.authenticated(sid)
    rid = conn.request_handoff(sid)
    conn.close(sid)
    conn.receive_data(encode(Frame.control({"ok": True, "id": rid})))
    assert drain(conn) == [HandoffAnswered(sid, True)]
    assert conn.state is SWITCHED and conn.sessions == {}


def test_delivered_bytes_count_against_the_inbox_until_consumed() -> None:
    conn = RelayConnection(Role.CLIENT, inbox_limit=10)
    sid = conn.open("a")
    conn.receive_data(encode(Frame.data(sid, b"123456")))
    assert drain(conn) == [DataReceived(sid, b"123456")]
    conn.consumed(sid, 6)
    conn.receive_data(encode(Frame.data(sid, b"123456")) + encode(Frame.data(sid, b"12345")))
    assert drain(conn) == [DataReceived(sid, b"123456"), SessionDropped(sid, INPUT_LIMIT)]
    assert frames_of(conn.data_to_send())[-1] == Frame.close(sid, INPUT_LIMIT)


def test_control_requests_are_bounded_and_answered_by_id() -> None:
    conn = RelayConnection(Role.CLIENT)
    ids = [conn.control({"op": "ping"}) for _ in range(CONTROL_QUEUE_MAX)]
    with pytest.raises(RelayLocalError, match="CONTROL requests"):
        conn.control({"op": "ping"})
    sent = [json.loads(f.payload) for f in frames_of(conn.data_to_send())]
    assert sent == [{"op": "ping", "id": i} for i in ids]
    conn.receive_data(encode(Frame.control({"ok": True, "id": ids[2]})))
    assert drain(conn) == [ControlReply(ids[2], {"ok": True, "id": ids[2]})]
    assert conn.pending_requests == CONTROL_QUEUE_MAX - 1


def test_a_tpm_frame_or_a_second_open_of_a_session_breaks_the_connection() -> None:
    """Host-TPM frames stop at an enclave's tap (platform/host_tpm.py), never at a
    relay connection; and a session id is opened once."""
    enclave = RelayConnection(Role.ENCLAVE)
    enclave.receive_data(encode(Frame(FrameType.TPM, CONTROL_SESSION, b"\x80\x01")))
    with pytest.raises(RelayRemoteError, match="TPM frame"):
        enclave.next_event()

    enclave = RelayConnection(Role.ENCLAVE)
    sid = RELAY_ASSIGNED + 1
    enclave.receive_data(encode(Frame.open(sid, "client")) * 2)
    with pytest.raises(RelayRemoteError, match="which is open"):
        drain(enclave)
