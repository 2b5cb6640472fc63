"""K2: a VM endpoint's attested session to its instance enclave, through hostd.

The endpoint checks the instance enclave's certificate (quote from this
platform's root, MRENCLAVE of the instance code installed here, key bound
by REPORTDATA, CN = the instance id it expects) and authenticates with the
VM key the manager bound to the instance (SECURITY.md properties 13 and 14).

:class:`K2Client` is blocking: the in-process TCTI uses it, and it is the
``VtpmBackend`` the QEMU and TSS endpoints forward to (they serialise
their calls). After a session breaks (the instance was killed and hostd
relaunched it, hostd was restarted or killed) the client reconnects by
itself, with bounded retries and exponential backoff, each attempt logged,
and ATTACHes with its resume token (sgxvtpm/wire/resume.py): the instance
comes back with the TPM as it was, and a request that was in flight is
answered exactly once (its stored response, or it is sent again if it never
ran). If the instance cannot resume (no record of this client's epoch and
count: SECURITY.md property 19) the request in flight fails with
:class:`K2Error` and the TPM is not running, as after a power loss; the
client logs why. A VM that was destroyed raises :class:`K2Destroyed`.

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
from collections.abc import Callable
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
from sgxvtpm.endpoint.backend import MessageBackend
from sgxvtpm.endpoint.streams import timeval
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.mux.connection import (
    ConnectionEnded,
    DataReceived,
    HandoffAnswered,
    RelayConnection,
    Role,
    SessionClosed,
)
from sgxvtpm.platform.base import MeasurementPolicy, QuoteVerifier
from sgxvtpm.util import log
from sgxvtpm.vmm.credentials import Credentials, CredentialsError
from sgxvtpm.wire.relay import DESTROYED, RelayProtocolError, RelayUsageError
from sgxvtpm.wire.resume import (
    REPLAY_MAX_REQUESTS,
    AttachReply,
    ResumeToken,
    Unrecorded,
    answer_digest,
    attach_info,
    decode_attach_reply,
)
from sgxvtpm.wire.vtpm import (
    ATTACH_FLAG_TAKEOVER,
    MAX_ATTACH_INFO,
    TpmResult,
    VtpmProtocolError,
    VtpmRequest,
    decode_response,
    encode_request,
    recorded_of,
)

CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 300.0  # an RSA key generation on a loaded host can take seconds
_READ = 17 * 1024  # one TLS record (16 KiB + overhead)
#: Reconnecting after a session broke: first delay, its cap, and when to give up.
RETRY_FIRST = 0.05
RETRY_MAX = 2.0
RECONNECT_TIMEOUT = 60.0


class K2Error(SgxvtpmError):
    """The instance could not be reached or the session broke; the message says which.

    Check that hostd runs and that the VM exists (``sgxvtpm vm show NAME``), then reconnect.
    """


class K2Destroyed(K2Error):
    """The VM's instance was destroyed (``sgxvtpm vm destroy``): its TPM is gone for good.

    An endpoint of that VM has nothing left to serve and exits.
    """

    def __init__(self, vm: str) -> None:
        self.vm = vm
        super().__init__(f"VM {vm} was destroyed; this endpoint exits")


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


def describe_holder(holder: dict[str, Any]) -> str:
    """An endpoint as the instance describes it: "pid N, 'what it serves', since T"."""
    return _about(holder)


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
            vm_dir = host.existing_vm(name)
            info = json.loads((vm_dir / "instance.json").read_text())
            credential = ClientCredential.load(vm_dir / "vm.key", vm_dir / "vm.crt")
            verifier = host.verifier()
            policy = host.policy("instance")
        except (OSError, ValueError) as exc:
            raise K2Error(f"VM {name!r} has no usable binding in {host.root}: {exc}") from None
        except CredentialsError as exc:
            raise K2Error(str(exc)) from None
        return cls(
            socket_path=state.socket,
            instance_id=str(info["instance_id"]),
            credential=credential,
            verifier=verifier,
            policy=policy,
            name=name,
        )

    def new_session(self) -> ClientSession:
        return ClientSession(
            self.policy, self.verifier, self.credential, expected_cn=self.instance_id
        )


class K2Client(MessageBackend):
    """A blocking K2 session: ``request(bytes) -> bytes``, one at a time.

    The session opens through relay frames (a client
    :class:`~sgxvtpm.mux.connection.RelayConnection`); once the instance is
    authenticated, it asks hostd to hand the connection to the instance
    (sgxvtpm.wire.relay, HANDOFF) and, when hostd agrees, carries the TLS
    records as they are: each command then goes from the TLS session to the
    socket with nothing in between. ``handoff=False`` keeps the relay.

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
        reconnect_timeout: float = RECONNECT_TIMEOUT,
        on_destroyed: Callable[[K2Destroyed], None] | None = None,
    ) -> None:
        self.binding = binding
        self.reconnect_timeout = reconnect_timeout
        #: Called (then K2Destroyed is raised) when the VM turns out to be destroyed.
        self.on_destroyed = on_destroyed
        # The resume token: the epoch the instance gave this client and the
        # number of its requests answered in it (sgxvtpm/wire/resume.py).
        self._epoch: str | None = None
        self._seq = 0
        self._recorded = 0  # the last of them the instance recorded (UNRECORDED answers)
        # The requests after it the instance asked to keep, with their numbers and
        # answers, for the token (digested then).
        self._unrecorded: list[tuple[int, bytes, bytes]] = []
        self._token: ResumeToken | None = None
        self._close_reason = ""
        #: Sessions resumed after a break (the instance or hostd restarted under them).
        self.resumes = 0
        self.timeout = timeout
        self.handoff = handoff
        self.takeover = takeover
        self.label = label
        self._sock: socket.socket | None = None
        self._tls: ClientSession | None = None
        # The relay connection while the session goes through hostd; None once direct.
        self._relay: RelayConnection | None = None
        self._sid = 0
        self._eof = False  # the session's end of stream was fed to the TLS session
        self._idle = select.poll()

    @property
    def direct(self) -> bool:
        """True while a session is open on a connection hostd handed to the instance."""
        return self._tls is not None and self._relay is None

    def connect(self) -> None:
        """Open a session and attach to the VM's TPM; K2Busy if another endpoint holds it.

        A new epoch: a session broken before is not resumed (:meth:`request` does that).
        """
        self._open(None)

    def _open(self, token: ResumeToken | None) -> AttachReply | None:
        self.close()
        self._close_reason = ""
        try:
            return self._open_session(token)
        except (K2Error, ChannelError):
            if self._close_reason == DESTROYED.decode():
                self._destroyed()
            raise

    def _destroyed(self) -> None:
        self.close()
        exc = K2Destroyed(self.binding.name or self.binding.instance_id)
        log.log("k2.vm_destroyed", vm=exc.vm)
        if self.on_destroyed is not None:
            self.on_destroyed(exc)
        raise exc

    def _open_session(self, token: ResumeToken | None) -> AttachReply | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(str(self.binding.socket_path))
        except OSError as exc:
            sock.close()
            raise K2Error(
                f"hostd is not reachable at {self.binding.socket_path} ({exc.strerror or exc}): "
                f"start it with `sgxvtpm hostd --state-dir {self.binding.socket_path.parent}`"
            ) from None
        relay = RelayConnection(Role.CLIENT)
        self._sock, self._tls, self._relay = sock, self.binding.new_session(), relay
        self._eof = False
        self._sid = relay.open(self.binding.instance_id)
        self._flush()
        while not isinstance(self._next_event(), HandshakeComplete):
            pass
        relay.authenticated(self._sid)
        if self.handoff:
            self._hand_off(relay)
        # From here on the kernel's timeouts (socket(7)) on a blocking socket:
        # CPython's own socket timeout costs a poll(2) before every send and recv.
        sock.settimeout(None)
        limit = timeval(self.timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        self._idle = select.poll()
        self._idle.register(sock, select.POLLIN)
        self._token = token
        return self._attach()

    def _hand_off(self, relay: RelayConnection) -> None:
        """Ask hostd to hand this connection to the instance and wait for its
        answer (sending nothing meanwhile: every byte after it is the instance's)."""
        if self._eof:  # the session ended with the handshake (the instance went away)
            self.close()
            raise K2Error("the instance closed the session")
        self._flush()  # the handshake's last flight goes before the request
        relay.request_handoff(self._sid)
        self._flush()
        while self._relay is not None and relay.pending_requests:
            assert self._sock is not None
            try:
                data = self._receive(self._sock)
            except OSError as exc:
                raise self._lost(exc) from None
            self._take_in(data)
            self._flush()

    def _attach(self) -> AttachReply | None:
        """ATTACH, with the resume token of :meth:`_open_session` if there is one."""
        about: dict[str, Any] = {"pid": os.getpid(),
                                 "endpoint": self.label[: MAX_ATTACH_INFO // 8]}
        flags = ATTACH_FLAG_TAKEOVER if self.takeover else 0
        request = VtpmRequest.attach(flags, attach_info(about, self._token))
        try:
            response = decode_response(self._send(encode_request(request)))
        except VtpmProtocolError as exc:
            self.close()
            raise K2Error(f"the instance answered ATTACH with garbage: {exc}") from None
        if response.success:
            self.takeover = False  # a later reconnect must not take the VM back
            try:
                reply = decode_attach_reply(response.payload)
            except VtpmProtocolError as exc:
                self.close()
                raise K2Error(f"the instance answered ATTACH with garbage: {exc}") from None
            if reply is None:  # an instance that knows no epochs: nothing to resume
                self._epoch, self._seq = None, 0
            else:
                self._epoch, self._seq = reply.epoch, reply.seq
            self._recorded = self._seq  # the instance records where a session starts
            self._unrecorded.clear()
            return reply
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
        """Send one request, its answer back, exactly once across crashes behind the session."""
        if self._tls is None or self._ended_while_idle():
            if self._epoch is None:
                self.connect()
            else:
                self._reconnect(in_flight=False)
        while True:
            try:
                answer = self._send(payload)
            except (K2Error, ChannelError) as exc:
                if self._epoch is None:
                    raise
                replay = self._reconnect(in_flight=True, cause=exc)
                if replay is not None:
                    return replay
                continue  # it never ran (or its effects were not committed): send it again
            self._seq += 1
            answer, recorded, keep = recorded_of(answer)
            if recorded:
                self._recorded = self._seq
                if self._unrecorded:
                    self._unrecorded.clear()
            elif keep and len(self._unrecorded) <= REPLAY_MAX_REQUESTS:  # more: not ours
                self._unrecorded.append((self._seq, payload, answer))
            return answer

    def _reconnect(self, in_flight: bool, cause: BaseException | None = None) -> bytes | None:
        """Reconnect and resume this client's epoch; the in-flight request's stored
        answer if the instance had run it, else None. Retries with backoff until
        ``reconnect_timeout``; K2Error if the instance cannot resume (logged)."""
        assert self._epoch is not None
        name = self.binding.name or self.binding.instance_id
        try:
            token = ResumeToken(self._epoch, self._seq, in_flight, self._recorded, tuple(
                Unrecorded(seq, request, answer_digest(answer))
                for seq, request, answer in self._unrecorded))
        except VtpmProtocolError:  # an instance that left more unrecorded than it may
            token = ResumeToken(self._epoch, self._seq, in_flight, self._recorded)
        deadline = time.monotonic() + self.reconnect_timeout
        delay, attempt = RETRY_FIRST, 0
        reason = str(cause) if cause is not None else "the instance ended the session"
        while True:
            attempt += 1
            log.log("k2.reconnect", vm=name, attempt=attempt, in_flight=in_flight,
                    seq=token.seq, reason=reason)
            try:
                reply = self._open(token)
                break
            except (K2Busy, K2Destroyed):
                raise
            except (K2Error, ChannelError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                if time.monotonic() + delay > deadline:
                    log.log("k2.reconnect_gave_up", vm=name, attempts=attempt, reason=reason)
                    raise K2Error(f"could not reconnect to the instance of {name} within "
                                  f"{self.reconnect_timeout:g} s: {reason}") from None
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        if reply is None or not reply.resumed:
            why = reply.reason if reply is not None else "the instance does not resume"
            log.log("k2.resume_refused", vm=name, attempts=attempt, reason=why)
            if in_flight:
                raise K2Error(f"the instance of {name} restarted and could not resume its TPM "
                              f"({why}); the request in flight may not have run")
            return None
        self.resumes += 1
        log.log("k2.resumed", vm=name, attempts=attempt, seq=reply.seq,
                replayed=reply.response is not None)
        return reply.response

    def _ended_while_idle(self) -> bool:
        """True if the instance closed the session since the last answer.

        It never speaks unasked, so anything readable now is its close_notify
        or the end of the connection. One poll(2), no exception, per request.
        """
        if not self._idle.poll(0):
            return False
        assert self._sock is not None and self._tls is not None
        if self._eof:  # the relay already ended this session's stream
            self.close()
            return True
        try:
            data = self._sock.recv(_READ, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        try:
            self._take_in(data)
            event = self._tls.next_event()
        except ChannelError:
            event = None
            data = b""
        if data and event is None:
            return False  # part of a record; whatever it is, the request will see it
        self.close()
        return True

    def _send(self, payload: bytes) -> bytes:
        assert self._tls is not None
        try:
            self._tls.send_message(payload)
        except ChannelError:
            self.close()
            raise
        self._flush()
        while True:
            event = self._next_event()
            if isinstance(event, Message):
                return event.data

    def close(self) -> None:
        if self._sock is not None:
            if self._tls is not None:
                # _flush raises K2Error (and closes) when the peer is gone: close quietly.
                with contextlib.suppress(OSError, ChannelError, K2Error, RelayUsageError):
                    self._tls.close()
                    if self._relay is not None:
                        self._relay.send(self._sid, self._tls.data_to_send())
                        self._relay.close(self._sid)
                    self._flush()
            if self._sock is None:
                return
            self._sock.close()
        self._sock = None
        self._tls = None
        self._relay = None

    def _flush(self) -> None:
        assert self._sock is not None and self._tls is not None
        out: bytes | bytearray = self._tls.data_to_send()
        relay = self._relay
        if relay is not None:  # still through hostd: in frames
            if out:
                relay.send(self._sid, out)
            out = relay.data_to_send()
        if out:
            try:
                self._sock.sendall(out)
            except OSError as exc:
                self.close()
                raise K2Error(f"connection to the instance lost: {exc.strerror}") from None

    def _take_in(self, data: bytes) -> None:
        """Bytes from the socket into the TLS session (in the relay's frames
        until the handoff); ChannelError, the connection closed, if they break either."""
        assert self._tls is not None
        try:
            if self._relay is None:
                self._tls.receive_data(data)
            else:
                self._take_in_frames(self._relay, data)
        except ChannelError:
            self.close()
            raise
        except RelayProtocolError:
            self.close()
            raise ChannelError() from None

    def _take_in_frames(self, relay: RelayConnection, data: bytes) -> None:
        assert self._tls is not None
        relay.receive_data(data)
        while (event := relay.next_event()) is not None:
            if isinstance(event, DataReceived):
                self._tls.receive_data(event.data)
            elif isinstance(event, SessionClosed | ConnectionEnded):
                if isinstance(event, SessionClosed):
                    self._close_reason = event.reason
                if not self._eof:
                    self._eof = True
                    self._tls.receive_data(b"")
            elif isinstance(event, HandoffAnswered) and event.accepted:
                # hostd's last frame: what follows is the instance's TLS as it is.
                self._relay = None
                if tail := relay.trailing_data:
                    self._tls.receive_data(tail)

    def _lost(self, exc: OSError) -> K2Error:
        """Reading the socket failed: closed, and the error to raise."""
        self.close()
        if isinstance(exc, TimeoutError | BlockingIOError):  # BlockingIOError: SO_RCVTIMEO
            return K2Error("the instance did not answer in time")
        return K2Error(f"connection to the instance lost: {exc.strerror}")

    def _next_event(self) -> HandshakeComplete | Message:
        assert self._sock is not None and self._tls is not None
        sock, tls = self._sock, self._tls
        while True:
            try:
                event = tls.next_event()
            except ChannelError:
                self.close()
                raise
            if isinstance(event, Message | HandshakeComplete):
                return event
            if isinstance(event, Closed):
                self.close()
                raise K2Error("the instance closed the session")
            try:
                data = self._receive(sock)
            except OSError as exc:
                raise self._lost(exc) from None
            if self._relay is None:  # handed off: the instance's TLS as it is
                try:
                    tls.receive_data(data)
                except ChannelError:
                    self.close()
                    raise
            else:
                self._take_in(data)
            self._flush()

    @staticmethod
    def _receive(sock: socket.socket) -> bytes:
        # A function of its own: benchmarks.profile counts samples in it as waiting.
        return sock.recv(_READ)

    def __enter__(self) -> K2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
