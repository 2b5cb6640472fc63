"""K2: a VM endpoint's attested session to its instance enclave, through hostd.

The endpoint checks the instance enclave's certificate (quote from this
platform's root, MRENCLAVE of the instance code installed here, key bound
by REPORTDATA, CN = the instance id it expects) and authenticates with the
VM key the manager bound to the instance (SECURITY.md properties 13 and 14).

:class:`K2Client` is blocking: the in-process TCTI uses it, and it is the
``VtpmBackend`` the QEMU and TSS endpoints forward to (they serialise
their calls). After a session breaks (the instance or hostd restarted) the
request in flight fails with :class:`K2Error` and is not resent, since it
may have run and nothing may run twice; the next request opens a new
session. A session the instance ended while it was idle (a restart, another
endpoint's takeover) is noticed before the next request is sent, which then
opens a new session at once: nothing had been sent on the old one.

Every session first attaches to the VM's TPM (sgxvtpm.wire.vtpm, ATTACH):
the instance serves one endpoint per VM at a time and refuses another with
:class:`K2Busy`, unless the client asked for a takeover. Only the first
session of a client may take over: a client whose session was taken from
it must not take it back by reconnecting.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgxvtpm.channel import (
    ChannelError,
    ClientCredential,
    ClientSession,
    Closed,
    HandshakeComplete,
    Message,
)
from sgxvtpm.enclaves.specs import expected_policy
from sgxvtpm.endpoint.backend import MessageBackend
from sgxvtpm.endpoint.streams import timeval
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.platform.base import MeasurementPolicy, QuoteVerifier
from sgxvtpm.vmm.credentials import Credentials, CredentialsError
from sgxvtpm.wire import relay as frames
from sgxvtpm.wire.vtpm import (
    ATTACH_FLAG_TAKEOVER,
    MAX_ATTACH_INFO,
    TpmResult,
    VtpmProtocolError,
    VtpmRequest,
    decode_response,
    encode_request,
)

CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 300.0  # an RSA key generation on a loaded host can take seconds
_READ = 17 * 1024  # one TLS record (16 KiB + overhead)


class K2Error(Exception):
    """The instance could not be reached or the session broke; the message says which."""


class K2Busy(K2Error):
    """The VM already has a connected endpoint; only a takeover replaces it."""

    def __init__(self, vm: str, holder: dict[str, Any], hint: str = "") -> None:
        self.vm = vm
        self.holder = holder
        self.hint = hint or "one endpoint at a time may use a VM's TPM"
        super().__init__(f"{vm} already has a connected endpoint ({_about(holder)}); {self.hint}")

    def with_hint(self, hint: str) -> K2Busy:
        """The same refusal, telling the user how to take over in their own terms."""
        return K2Busy(self.vm, self.holder, hint)


def _about(holder: dict[str, Any]) -> str:
    parts = []
    if isinstance(holder.get("pid"), int):
        parts.append(f"pid {holder['pid']}")
    if isinstance(holder.get("endpoint"), str) and holder["endpoint"]:
        parts.append(repr(holder["endpoint"]))
    if isinstance(holder.get("since"), int | float):
        parts.append("since " + time.strftime("%Y-%m-%d %H:%M:%S",
                                              time.localtime(holder["since"])))
    return ", ".join(parts) or "pid unknown"


@dataclass(frozen=True)
class VmBinding:
    """What a VM endpoint needs: where hostd is, which instance, and the VM's identity."""

    socket_path: Path
    instance_id: str
    credential: ClientCredential
    verifier: QuoteVerifier
    policy: MeasurementPolicy
    name: str = ""  # the VM's name, for messages

    @classmethod
    def load(
        cls, state: StateDir, name: str, *, credentials: Credentials | None = None
    ) -> VmBinding:
        """VM ``name``'s binding to the hostd of ``state``, from a credentials directory
        (``credentials``, else this user's: sgxvtpm/vmm/credentials.py)."""
        host = (credentials or Credentials.at(None)).host(state)
        try:
            vm_dir = host.vm(name)
            info = json.loads((vm_dir / "instance.json").read_text())
            credential = ClientCredential.load(vm_dir / "vm.key", vm_dir / "vm.crt")
            verifier = host.verifier()
        except (OSError, ValueError) as exc:
            raise K2Error(f"VM {name!r} has no usable binding in {host.root}: {exc}") from None
        except CredentialsError as exc:
            raise K2Error(str(exc)) from None
        return cls(
            socket_path=state.socket,
            instance_id=str(info["instance_id"]),
            credential=credential,
            verifier=verifier,
            policy=expected_policy("instance"),
            name=name,
        )

    def new_session(self) -> ClientSession:
        return ClientSession(
            self.policy, self.verifier, self.credential, expected_cn=self.instance_id
        )


class K2Connection:
    """Sans-IO: one K2 session on one hostd connection, with the handoff.

    Bytes in with :meth:`receive_data`, bytes out with :meth:`data_to_send`.
    The session opens through relay frames; once the instance is
    authenticated, it asks hostd to hand the connection to the instance
    (sgxvtpm.wire.relay, HANDOFF) and, when hostd agrees, carries raw TLS
    records from then on. Messages sent meanwhile are held until the answer.
    """

    SID = 1

    def __init__(self, binding: VmBinding, *, handoff: bool = True) -> None:
        self.session = binding.new_session()
        self._decoder: frames.RelayDecoder | None = frames.RelayDecoder()
        self._out = bytearray(frames.encode(frames.Frame.open(self.SID, binding.instance_id)))
        self._handoff = handoff
        self._awaiting_handoff = False
        self._held: list[bytes] = []
        self.authenticated = False
        self._flush_session()

    @property
    def direct(self) -> bool:
        """True once hostd handed the connection to the instance."""
        return self._decoder is None

    def receive_data(self, data: bytes) -> None:
        """Bytes from the socket; ``b""`` at end of stream."""
        if self._decoder is None:
            self.session.receive_data(data)  # direct: data_to_send() takes what it wrote
            return
        decoder = self._decoder
        decoder.receive_data(data)
        # After hostd's answer to the handoff nothing more comes in frames.
        while self._decoder is not None and (frame := decoder.next_frame()) is not None:
            self._on_frame(frame)
        if not data:
            self.session.receive_data(b"")
        self._flush_session()

    def next_event(self) -> HandshakeComplete | Message | Closed | None:
        event = self.session.next_event()
        if isinstance(event, HandshakeComplete):
            self.authenticated = True
            if self._handoff:
                self._awaiting_handoff = True
                request = frames.Frame.control({"op": "handoff", "session": self.SID})
                self._out += frames.encode(request)
        return event

    def send_message(self, payload: bytes) -> None:
        if self._awaiting_handoff:
            self._held.append(payload)
            return
        self.session.send_message(payload)
        if self._decoder is not None:  # relayed: frame it now (direct: data_to_send does)
            self._flush_session()

    def close(self) -> None:
        self.session.close()
        self._flush_session()

    def data_to_send(self) -> bytes:
        if self._decoder is None:
            # Direct: the session's TLS records as they are, after anything older.
            if not self._out:
                return self.session.data_to_send()
            self._flush_session()
        out, self._out = bytes(self._out), bytearray()
        return out

    def _on_frame(self, frame: frames.Frame) -> None:
        if frame.type is frames.FrameType.DATA:
            self.session.receive_data(frame.payload)
        elif frame.type is frames.FrameType.CLOSE:
            self.session.receive_data(b"")
        elif frame.type is frames.FrameType.CONTROL and self._awaiting_handoff:
            # The last frame hostd sends on this connection if it agreed.
            self._awaiting_handoff = False
            if frame.control_object().get("ok"):
                self._decoder = None
            held, self._held = self._held, []
            for payload in held:
                self.send_message(payload)

    def _flush_session(self) -> None:
        out = self.session.data_to_send()
        if not out:
            return
        if self._decoder is None:
            self._out += out
            return
        for start in range(0, len(out), frames.MAX_PAYLOAD):
            self._out += frames.encode(
                frames.Frame.data(self.SID, out[start : start + frames.MAX_PAYLOAD])
            )


class K2Client(MessageBackend):
    """A blocking K2 session: ``request(bytes) -> bytes``, one at a time.

    ``takeover``: the first session ends the one that holds the VM's TPM
    instead of being refused. ``label`` says what this endpoint is, shown to
    an endpoint that is refused while this one holds the VM.
    """

    Refused = K2Error

    def __init__(
        self,
        binding: VmBinding,
        timeout: float = REQUEST_TIMEOUT,
        *,
        handoff: bool = True,
        takeover: bool = False,
        label: str = "K2Client",
    ) -> None:
        self.binding = binding
        self.timeout = timeout
        self.handoff = handoff
        self.takeover = takeover
        self.label = label
        self._sock: socket.socket | None = None
        self._conn: K2Connection | None = None
        self._idle = select.poll()

    def connect(self) -> None:
        """Open a session and attach to the VM's TPM; K2Busy if another endpoint holds it."""
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(str(self.binding.socket_path))
        except OSError as exc:
            sock.close()
            raise K2Error(f"cannot reach hostd at {self.binding.socket_path}: {exc}") from None
        self._sock, self._conn = sock, K2Connection(self.binding, handoff=self.handoff)
        self._flush()
        while not isinstance(self._next_event(), HandshakeComplete):
            pass
        # From here on the kernel's timeouts (socket(7)) on a blocking socket:
        # CPython's own socket timeout costs a poll(2) before every send and recv.
        sock.settimeout(None)
        limit = timeval(self.timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        self._idle = select.poll()
        self._idle.register(sock, select.POLLIN)
        self._attach()

    def _attach(self) -> None:
        about = {"pid": os.getpid(), "endpoint": self.label[: MAX_ATTACH_INFO // 8]}
        flags = ATTACH_FLAG_TAKEOVER if self.takeover else 0
        request = VtpmRequest.attach(flags, json.dumps(about).encode())
        try:
            response = decode_response(self._send(encode_request(request)))
        except VtpmProtocolError as exc:
            self.close()
            raise K2Error(f"the instance answered ATTACH with garbage: {exc}") from None
        if response.success:
            self.takeover = False  # a later reconnect must not take the VM back
            return
        self.close()
        name = self.binding.name or self.binding.instance_id
        if response.result == TpmResult.RESOURCES:
            try:
                holder = json.loads(response.payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                holder = {}
            raise K2Busy(name, holder if isinstance(holder, dict) else {})
        raise K2Error(f"the instance of {name} refused the session (result {response.result:#x})")

    def request(self, payload: bytes) -> bytes:
        if self._conn is None or self._ended_while_idle():
            self.connect()
        return self._send(payload)

    def _ended_while_idle(self) -> bool:
        """True if the instance closed the session since the last answer.

        It never speaks unasked, so anything readable now is its close_notify
        or the end of the connection. One poll(2), no exception, per request.
        """
        if not self._idle.poll(0):
            return False
        assert self._sock is not None and self._conn is not None
        try:
            data = self._sock.recv(_READ, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        try:
            self._conn.receive_data(data)
            event = self._conn.next_event()
        except (ChannelError, frames.RelayProtocolError):
            event = None
            data = b""
        if data and event is None:
            return False  # part of a record; whatever it is, the request will see it
        self.close()
        return True

    def _send(self, payload: bytes) -> bytes:
        assert self._conn is not None
        self._conn.send_message(payload)
        self._flush()
        while True:
            event = self._next_event()
            if isinstance(event, Message):
                return event.data

    def close(self) -> None:
        if self._sock is not None:
            if self._conn is not None:
                # _flush raises K2Error (and closes) when the peer is gone: close quietly.
                with contextlib.suppress(OSError, ChannelError, K2Error):
                    self._conn.close()
                    self._flush()
            if self._sock is None:
                return
            self._sock.close()
        self._sock = None
        self._conn = None

    def _flush(self) -> None:
        assert self._sock is not None and self._conn is not None
        out = self._conn.data_to_send()
        if out:
            try:
                self._sock.sendall(out)
            except OSError as exc:
                self.close()
                raise K2Error(f"connection to the instance lost: {exc.strerror}") from None

    def _next_event(self) -> HandshakeComplete | Message:
        assert self._sock is not None and self._conn is not None
        sock, conn = self._sock, self._conn
        while True:
            try:
                event = conn.next_event()
            except ChannelError:
                self.close()
                raise
            if isinstance(event, Message):
                return event
            if isinstance(event, HandshakeComplete):
                self._flush()  # the handoff request
                return event
            if isinstance(event, Closed):
                self.close()
                raise K2Error("the instance closed the session")
            try:
                data = self._receive(sock)
            except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
                self.close()
                raise K2Error("the instance did not answer in time") from None
            except OSError as exc:
                self.close()
                raise K2Error(f"connection to the instance lost: {exc.strerror}") from None
            try:
                conn.receive_data(data)
            except (ChannelError, frames.RelayProtocolError):
                self.close()
                raise ChannelError() from None
            self._flush()

    @staticmethod
    def _receive(sock: socket.socket) -> bytes:
        # A function of its own: benchmarks.profile counts samples in it as waiting.
        return sock.recv(_READ)

    def __enter__(self) -> K2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
