"""hostd's switch: the untrusted end of every relay connection.

:class:`Relay` joins connections (asyncio stream pairs: client sockets,
enclave streams) and moves relay frames (:mod:`sgxvtpm.wire.relay`) between
them. It never holds a key and never looks into DATA: what it carries are
TLS records of attested sessions, whose keys are in the enclaves and their
clients (:mod:`sgxvtpm.mux`). A connection registered under a name
("manager", an instance id) is a *target*; OPEN(target) from another
connection creates a session between the two:

- the opener's session id maps to a fresh id on the target's connection
  (>= RELAY_ASSIGNED), and the target receives OPEN(label of the opener:
  its registered name, else its kind, e.g. "client");
- DATA is forwarded both ways, CLOSE tears down both halves, a connection
  that dies closes all its sessions ("peer gone"), OPEN to an unknown
  target is answered CLOSE("no such target");
- CONTROL frames (session 0) go to ``on_control(conn, obj)`` whose reply is
  sent back as CONTROL; a request's ``"id"`` is echoed in the reply.
- TPM frames (session 0) from an enclave go to ``on_tpm(command)``, the host
  TPM, one command at a time; its response goes back as a TPM frame, an
  empty one without a host TPM. Only enclaves may send them.
A malformed frame ends the offending connection only.

Fleet connections (docs/ARCHITECTURE.md, "Many hosts") are TCP streams to
another hostd. One accepted on ``hostd --fleet-listen`` (kind ``fleet``) may
only OPEN sessions, always to "manager" whatever it names, with any session
id (the other hostd's switch assigned it); one hostd dialled for its manager
(kind ``fleet-out``, a registered target) may only answer. Neither may send
CONTROL; a ``fleet-out`` connection is closed once its last session ends.

Anyone who can connect may send frames, so nothing a client does may hold
up another connection (the bounds are in :mod:`sgxvtpm.mux.limits`): frames
for a connection are queued, never waited for, and a client that lets its
queue pass ``SWITCH_OUT_MAX`` is dropped with its sessions; enclave streams
are read all the time, and only a client sending to an enclave that is
behind waits, in its own loop. CONTROL requests of a connection are answered
one at a time, in order; a client may hold ``CLIENT_SESSIONS_MAX`` sessions;
a target is sent at most ``PENDING_OPENS_MAX`` OPENs it has not answered,
beyond which OPEN is answered CLOSE("busy").
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from sgxvtpm.mux.limits import (
    CLIENT_SESSIONS_MAX,
    CONTROL_QUEUE_MAX,
    PENDING_OPENS_MAX,
    SWITCH_OUT_MAX,
)
from sgxvtpm.wire.relay import (
    RELAY_ASSIGNED,
    Frame,
    FrameType,
    RelayDecoder,
    RelayProtocolError,
    encode_header,
)

log = logging.getLogger("sgxvtpm.relay")

ControlHandler = Callable[["Connection", dict[str, Any]], Awaitable[dict[str, Any]]]
TpmHandler = Callable[[bytes], Awaitable[bytes]]  # one TPM command -> its response
Observer = Callable[[bytes], None]  # sees every byte the relay reads

_READ = 64 * 1024

_NO_TARGET = b"no such target"
_PEER_GONE = b"peer gone"
_BUSY = b"busy"
#: An enclave sends one TPM command at a time (platform/host_tpm.py); a few
#: more are tolerated, not an unbounded queue.
TPM_PENDING_MAX = 4

FLEET_IN = "fleet"  # accepted on hostd --fleet-listen
FLEET_OUT = "fleet-out"  # dialled by hostd for its manager
_FLEET_KINDS = (FLEET_IN, FLEET_OUT)


class Connection:
    """One stream attached to the relay: a client's socket, or an enclave's stream."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.kind = kind
        self.name: str | None = None
        self.closed = False
        self.accepts_handoff = False  # an enclave that takes sessions' connections
        self.close_when_idle = False  # a dialled fleet connection: ends with its last session
        # local session id -> (other connection, its session id)
        self.sessions: dict[int, tuple[Connection, int]] = {}
        # As a target: its session ids whose OPEN it has not answered yet.
        self.unanswered: set[int] = set()
        # CONTROL requests received and not answered yet, oldest first.
        self.controls: deque[dict[str, Any]] = deque()
        self.tpm_pending = 0  # TPM frames received and not answered yet
        self._ids = itertools.count(RELAY_ASSIGNED)

    @property
    def label(self) -> str:
        """How this connection is named to the targets it opens sessions with."""
        return self.name or self.kind

    @property
    def is_enclave(self) -> bool:
        """A stream to an enclave hostd launched: it reads all the time, so
        clients that send to it may wait for it; anything else is a client,
        and nobody waits for a client."""
        return self.kind == "enclave"

    @property
    def backlog(self) -> int:
        """Bytes written to this connection that its socket has not taken yet."""
        return self.writer.transport.get_write_buffer_size()

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
        # Two writes, no concatenation: the transport buffers them together.
        self.writer.write(encode_header(ftype, session_id, len(payload)))
        if payload:
            self.writer.write(payload)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionError:
            self.closed = True

    def __repr__(self) -> str:
        return f"Connection({self.label!r}, sessions={len(self.sessions)})"


class _OverLimit(RelayProtocolError):
    """A client went past one of the limits of :mod:`sgxvtpm.mux.limits`."""


async def _no_control(conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
    """The CONTROL handler of a relay given none: every request is refused."""
    return {"error": "no control handler"}


class Relay:
    """Moves frames between attached connections; see the module docstring."""

    def __init__(
        self,
        on_control: ControlHandler | None = None,
        *,
        observer: Observer | None = None,
        on_tpm: TpmHandler | None = None,
    ) -> None:
        self._on_control = on_control if on_control is not None else _no_control
        self._on_tpm = on_tpm
        self._tpm_lock = asyncio.Lock()  # the host has one TPM
        self._observer = observer
        #: Why a target is absent, for OPEN's CLOSE reason (default "no such target"):
        #: hostd tells a destroyed instance from one not (yet) running.
        self.why_absent: Callable[[str], bytes] = lambda name: _NO_TARGET
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
        close_when_idle: bool = False,
    ) -> None:
        """Run one connection until it ends; then close all its sessions."""
        conn = Connection(reader, writer, kind)
        conn.accepts_handoff = accepts_handoff
        conn.close_when_idle = close_when_idle
        # drain() waits only past the limit (clients sending to an enclave).
        writer.transport.set_write_buffer_limits(high=SWITCH_OUT_MAX)
        self._connections.add(conn)
        try:
            if name is not None:
                self.register(conn, name)
            await self._loop(conn)
        except _OverLimit as exc:
            # Routine under a flood: not worth a warning per connection.
            log.debug("relay: dropping %r: %s", conn, exc)
        except RelayProtocolError as exc:
            log.warning("relay: dropping %r: %s", conn, exc)
        except ConnectionError as exc:
            log.debug("relay: %r lost: %s", conn, exc)
        finally:
            self._drop(conn)

    async def _loop(self, conn: Connection) -> None:
        decoder = RelayDecoder()
        while not conn.closed:
            data = await conn.reader.read(_READ)
            if self._observer is not None and data:
                self._observer(data)
            decoder.receive_data(data)
            while not conn.closed and (frame := decoder.next_frame()) is not None:
                if await self._on_frame(conn, frame):
                    return  # the connection now belongs to the enclave
            if not data:
                return

    async def _on_frame(self, conn: Connection, frame: Frame) -> bool:
        """Act on one frame of ``conn``; True once ``conn`` was handed off."""
        ftype, sid, payload = frame.type, frame.session_id, frame.payload
        if ftype is FrameType.DATA:
            await self._forward(conn, sid, payload)
        elif ftype is FrameType.OPEN:
            self._open(conn, sid, frame.text)
        elif ftype is FrameType.CLOSE:
            self._close(conn, sid, payload)
        elif ftype is FrameType.HANDOFF:
            raise RelayProtocolError("HANDOFF is the relay's to send")
        elif ftype is FrameType.TPM:
            if not conn.is_enclave:
                raise RelayProtocolError("TPM frames are for enclaves only")
            if conn.tpm_pending >= TPM_PENDING_MAX:
                raise RelayProtocolError(f"more than {TPM_PENDING_MAX} TPM commands outstanding")
            conn.tpm_pending += 1
            task = asyncio.get_running_loop().create_task(self._tpm(conn, payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            if conn.kind in _FLEET_KINDS:
                raise RelayProtocolError("CONTROL from a fleet connection")
            request = frame.control_object()
            if request.get("op") == "handoff":
                return await self._handoff(conn, request)
            self._control(conn, request)
        return False

    async def _tpm(self, conn: Connection, command: bytes) -> None:
        """One command to the host TPM for ``conn``; the bytes pass unread."""
        response = b""
        if self._on_tpm is not None:
            async with self._tpm_lock:
                if conn.closed:  # dropped while it waited: its commands go nowhere
                    return
                try:
                    response = await self._on_tpm(command)
                except Exception as exc:  # the enclave sees no answer as "no host TPM"
                    log.warning("relay: host TPM command for %r failed: %s", conn, exc)
        conn.tpm_pending -= 1
        conn.send(FrameType.TPM, 0, response)

    def _send(self, conn: Connection, ftype: FrameType, sid: int, payload: bytes) -> None:
        """Queue a frame for ``conn``; never waits. A client that lets its
        backlog pass the limit is not reading: it is dropped, with its sessions."""
        conn.send(ftype, sid, payload)
        if not conn.is_enclave and not conn.closed and conn.backlog > SWITCH_OUT_MAX:
            log.debug("relay: dropping %r: it does not read what it is sent", conn)
            self._drop(conn, abort=True)

    async def _forward(self, conn: Connection, sid: int, payload: bytes) -> None:
        entry = conn.sessions.get(sid)
        if entry is None:
            return  # crossed a CLOSE in flight
        conn.unanswered.discard(sid)  # a target's first frame answers the OPEN
        peer, peer_sid = entry
        if peer.is_enclave and not conn.is_enclave:
            # Back-pressure: this client waits until the enclave catches up.
            # Only this connection's loop waits; an enclave's loop never does.
            while peer.backlog > SWITCH_OUT_MAX and not peer.closed and not conn.closed:
                await peer.drain()
            if conn.sessions.get(sid) != entry:
                return  # closed while this client waited
        self._send(peer, FrameType.DATA, peer_sid, payload)

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
                target.unanswered.discard(target_sid)
        reply = Frame.control({"ok": ok, **({"id": request["id"]} if "id" in request else {})})
        self._send(conn, reply.type, reply.session_id, reply.payload)
        await conn.drain()
        return ok

    async def _pass_connection(self, conn: Connection, target: Connection, sid: int) -> bool:
        client = conn.writer.get_extra_info("socket")
        stream = target.writer.get_extra_info("socket")
        if client is None or stream is None or target.closed:
            return False
        # Everything already queued for the enclave must precede HANDOFF.
        await target.drain()
        while target.backlog and not target.closed:
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
        if conn.kind == FLEET_OUT:
            raise RelayProtocolError("OPEN from a dialled fleet connection")
        if conn.kind == FLEET_IN:
            target_name = "manager"  # all a fleet peer may reach
        elif sid >= RELAY_ASSIGNED:
            raise RelayProtocolError(f"OPEN with relay-assigned session id {sid:#x}")
        if sid in conn.sessions:
            raise RelayProtocolError(f"OPEN of session {sid} which is open")
        # A registered target (the standalone test relay's) counts the sessions
        # others open to it; the limit is on what one client opens.
        if not conn.is_enclave and conn.name is None and len(conn.sessions) >= CLIENT_SESSIONS_MAX:
            raise _OverLimit(f"more than {CLIENT_SESSIONS_MAX} sessions on one connection")
        target = self._targets.get(target_name)
        if target is None or target.closed or target is conn:
            self._send(conn, FrameType.CLOSE, sid, self.why_absent(target_name))
            return
        if len(target.unanswered) >= PENDING_OPENS_MAX:
            self._send(conn, FrameType.CLOSE, sid, _BUSY)
            return
        peer_sid = target.allocate_session_id()
        conn.sessions[sid] = (target, peer_sid)
        target.sessions[peer_sid] = (conn, sid)
        target.unanswered.add(peer_sid)
        self._send(target, FrameType.OPEN, peer_sid, conn.label.encode("utf-8"))
        log.debug("relay: session %s/%d -> %s/%d", conn.label, sid, target.label, peer_sid)

    def _close(self, conn: Connection, sid: int, reason: bytes) -> None:
        entry = conn.sessions.pop(sid, None)
        if entry is None:
            return
        conn.unanswered.discard(sid)
        peer, peer_sid = entry
        peer.sessions.pop(peer_sid, None)
        peer.unanswered.discard(peer_sid)
        self._send(peer, FrameType.CLOSE, peer_sid, reason)
        for end in (conn, peer):
            if end.close_when_idle and not end.sessions:
                self._drop(end)

    def _control(self, conn: Connection, request: dict[str, Any]) -> None:
        """Queue a CONTROL request; they are answered one at a time, in order."""
        if len(conn.controls) >= CONTROL_QUEUE_MAX:
            raise _OverLimit(f"more than {CONTROL_QUEUE_MAX} CONTROL requests outstanding")
        conn.controls.append(request)
        if len(conn.controls) == 1:  # no answerer running for this connection
            task = asyncio.get_running_loop().create_task(self._answer(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, conn: Connection) -> None:
        while conn.controls and not conn.closed:
            request = conn.controls[0]
            try:
                reply = dict(await self._on_control(conn, request))
            except Exception:
                log.exception("relay: control handler failed")
                reply = {"error": "internal error"}
            if conn.closed:
                return  # dropped meanwhile; its queue is gone
            if "id" in request:
                reply["id"] = request["id"]
            frame = Frame.control(reply)
            conn.controls.popleft()
            self._send(conn, frame.type, frame.session_id, frame.payload)

    def _drop(self, conn: Connection, *, abort: bool = False) -> None:
        """End ``conn`` and every session it has (idempotent). ``abort`` throws
        away what it was not sent: a client that does not read gets nothing more."""
        if conn.closed and conn not in self._connections:
            return
        conn.closed = True
        self._connections.discard(conn)
        conn.controls.clear()
        if conn.name is not None and self._targets.get(conn.name) is conn:
            del self._targets[conn.name]
        sessions, conn.sessions = conn.sessions, {}
        conn.unanswered.clear()
        for peer, peer_sid in sessions.values():
            peer.sessions.pop(peer_sid, None)
            peer.unanswered.discard(peer_sid)
            self._send(peer, FrameType.CLOSE, peer_sid, _PEER_GONE)
        if abort:
            conn.writer.transport.abort()
        else:
            conn.writer.close()

    async def aclose(self) -> None:
        """Close every connection and cancel pending control requests."""
        for conn in list(self._connections):
            self._drop(conn)
        for task in list(self._tasks):
            task.cancel()
