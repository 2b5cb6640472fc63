"""K2: a VM endpoint's attested session to its instance enclave, through hostd.

The endpoint checks the instance enclave's certificate (quote from this
platform's root, MRENCLAVE of the instance code installed here, key bound
by REPORTDATA, CN = the instance id it expects) and authenticates with the
VM key the manager bound to the instance (S3, S4).

:class:`K2Client` is blocking: the in-process TCTI uses it, and it is the
``VtpmBackend`` the QEMU and TSS endpoints forward to (they serialise
their calls). After a session breaks (the instance or hostd restarted) the
request in flight fails with :class:`K2Error` and is not resent, since it
may have run (S2); the next request opens a new session.
"""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass
from pathlib import Path

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

CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 300.0  # an RSA key generation on a loaded host can take seconds
_READ = 17 * 1024  # one TLS record (16 KiB + overhead)


class K2Error(Exception):
    """The instance could not be reached or the session broke; the message says which."""


@dataclass(frozen=True)
class VmBinding:
    """What a VM endpoint needs: where hostd is, which instance, and the VM's identity."""

    socket_path: Path
    instance_id: str
    credential: ClientCredential
    verifier: QuoteVerifier
    policy: MeasurementPolicy

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
    """A blocking K2 session: ``request(bytes) -> bytes``, one at a time."""

    Refused = K2Error

    def __init__(
        self, binding: VmBinding, timeout: float = REQUEST_TIMEOUT, *, handoff: bool = True
    ) -> None:
        self.binding = binding
        self.timeout = timeout
        self.handoff = handoff
        self._sock: socket.socket | None = None
        self._conn: K2Connection | None = None

    def connect(self) -> None:
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

    def request(self, payload: bytes) -> bytes:
        if self._conn is None:
            self.connect()
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
