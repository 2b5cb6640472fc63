"""Sans-IO attested sessions: TLS 1.3 over ``ssl.SSLObject`` + ``MemoryBIO``.

h11-style: feed received bytes with :meth:`receive_data` (``b""`` = EOF),
take events with :meth:`next_event`, queue messages with
:meth:`send_message`, and write whatever :meth:`data_to_send` returns. No
sockets here; the relay (``sgxvtpm.mux``, ``sgxvtpm.host.switch``) moves the bytes.

Application messages are framed inside TLS as ``u32 length || payload``
(big-endian), at most :data:`MAX_MESSAGE` bytes, so message boundaries are
protected by the record MAC like the payload.

State machine (one table, :data:`_TRANSITIONS`)::

    HANDSHAKING --peer authenticated--> OPEN --close()/peer close--> OPEN (half)
         |                               |                         -> CLOSED
         +------- any failure -----------+--> BROKEN (forever)

Authentication happens at the HANDSHAKING -> OPEN edge, before any
application byte is read or written (SECURITY.md properties 13 and 14):

- the client verifies the enclave certificate's quote, measurement and key
  binding (:func:`verify_enclave_certificate`); messages sent earlier are held;
- the server has had OpenSSL verify the client chain to its anchors and then
  checks the key pin. On a pin failure it sends nothing more and the session
  breaks; the client sees the stream end without close_notify and fails too.

In TLS 1.3 the client finishes its handshake before the server has judged
its certificate; a rejection arrives later as an alert, which the client
reports as :class:`ChannelError` from :meth:`next_event`. Since the server
never reads application data from a client it rejected, nothing is
delivered on either side.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import ssl
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography import x509

from sgxvtpm.platform.base import MeasurementPolicy, QuoteVerifier, VerifiedQuote
from sgxvtpm.util import log

from .context import client_context, server_context
from .errors import ChannelError, ChannelUsageError, fail
from .evidence import EnclaveCredential, spki_sha256, verify_enclave_certificate
from .identity import ClientCredential, ClientTrust

MAX_MESSAGE = 1 << 20
_LEN = struct.Struct(">I")
_READ_SIZE = 16 * 1024  # one TLS record at most; a larger buffer costs an mmap per read


@dataclass(frozen=True)
class PeerCertificate:
    """The client as the server authenticated it."""

    cert_der: bytes
    spki_sha256: bytes


@dataclass(frozen=True)
class HandshakeComplete:
    """The peer is authenticated; messages may flow. ``peer`` is the client's
    certificate (server side) or the enclave's verified quote (client side)."""

    peer: PeerCertificate | VerifiedQuote


@dataclass(frozen=True)
class Message:
    """One application message, delivered whole and in order."""

    data: bytes


@dataclass(frozen=True)
class Closed:
    """The peer closed the session cleanly (TLS close_notify)."""


Event = HandshakeComplete | Message | Closed


class State(enum.Enum):
    HANDSHAKING = "handshaking"
    OPEN = "open"
    CLOSED = "closed"
    BROKEN = "broken"


# The only legal state changes; anything else is a bug in this module.
_TRANSITIONS: dict[State, frozenset[State]] = {
    State.HANDSHAKING: frozenset({State.OPEN, State.CLOSED, State.BROKEN}),
    State.OPEN: frozenset({State.CLOSED, State.BROKEN}),
    State.CLOSED: frozenset({State.BROKEN}),
    State.BROKEN: frozenset(),
}
# The states as module names: the per-message methods below test the state
# several times a message, and a member looked up on its Enum class costs
# ~0.1 µs in CPython 3.11 against ~0.01 µs for a module global.
_HANDSHAKING, _OPEN, _CLOSED, _BROKEN = State.HANDSHAKING, State.OPEN, State.CLOSED, State.BROKEN


class _Session(abc.ABC):
    """What client and server sessions share: the TLS engine and message framing."""

    _role = "session"

    def __init__(self, context: ssl.SSLContext, *, server_side: bool) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self._state = _HANDSHAKING
        self._events: deque[Event] = deque()
        self._held: list[bytes] = []  # messages sent before authentication
        self._rx = bytearray()
        self._local_closed = False
        self._peer_closed = False
        self._eof = False
        self._peer: PeerCertificate | VerifiedQuote | None = None

    # -- public API -------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def peer(self) -> PeerCertificate | VerifiedQuote | None:
        """The authenticated peer, once the handshake is complete."""
        return self._peer

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the peer; ``b""`` means the stream ended."""
        if self._state is _BROKEN:
            raise ChannelError()
        if self._eof:
            raise ChannelUsageError(f"{self._role}: receive_data after end of stream")
        if data:
            self._incoming.write(data)
        else:
            self._eof = True
            self._incoming.write_eof()
        try:
            self._advance()
        except ChannelError:
            self._set_state(_BROKEN)
        except ssl.SSLError as exc:
            fail("%s: TLS error %s", self._role, exc)
            self._set_state(_BROKEN)

    def next_event(self) -> Event | None:
        """The next event, None if more data is needed.

        Events decoded before a failure are still returned (they were
        authenticated); then :class:`ChannelError` is raised on every call.
        """
        if self._events:
            return self._events.popleft()
        if self._state is _BROKEN:
            raise ChannelError()
        return None

    def events(self) -> Iterator[Event]:
        """Drain the pending events (raises ChannelError at the end if broken)."""
        while (event := self.next_event()) is not None:
            yield event

    def send_message(self, payload: bytes) -> None:
        """Queue one application message (held until the peer is authenticated)."""
        if self._state is _BROKEN:
            raise ChannelError()
        if self._local_closed or self._state is _CLOSED:
            raise ChannelUsageError(f"{self._role}: send_message after close")
        if len(payload) > MAX_MESSAGE:
            raise ChannelUsageError(
                f"{self._role}: message of {len(payload)} bytes exceeds {MAX_MESSAGE}"
            )
        framed = _LEN.pack(len(payload)) + payload
        if self._state is _HANDSHAKING:
            self._held.append(framed)
        else:
            self._write(framed)

    def data_to_send(self) -> bytes:
        """TLS bytes for the peer (also after a failure: a pending alert)."""
        return self._outgoing.read()

    def close(self) -> None:
        """Send close_notify once authenticated; idempotent. Held messages
        of a session that never finished its handshake are discarded."""
        if self._local_closed or self._state is _BROKEN:
            return
        self._local_closed = True
        if self._state is _HANDSHAKING:
            self._held.clear()
            self._set_state(_CLOSED)
            return
        try:
            self._tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is written; the peer's arrives (or not) later
        except ssl.SSLError as exc:
            log.log("channel.close_failed", role=self._role, reason=str(exc))
        if self._peer_closed:
            self._set_state(_CLOSED)

    # -- internals --------------------------------------------------------

    def _set_state(self, new: State) -> None:
        if new is self._state:
            return
        if new not in _TRANSITIONS[self._state]:
            raise AssertionError(f"{self._role}: illegal transition {self._state} -> {new}")
        self._state = new
        if new is _BROKEN:
            self._held.clear()
            self._rx.clear()

    def _write(self, framed: bytes) -> None:
        try:
            self._tls.write(framed)
        except ssl.SSLError as exc:
            self._set_state(_BROKEN)
            raise fail("%s: TLS write failed: %s", self._role, exc) from None

    def _advance(self) -> None:
        if self._state is _HANDSHAKING:
            if self._local_closed:
                return
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                return
            except ssl.SSLError as exc:
                raise fail("%s: handshake failed: %s", self._role, exc) from None
            self._peer = self._authenticate()
            self._set_state(_OPEN)
            self._events.append(HandshakeComplete(self._peer))
            held, self._held = self._held, []
            for framed in held:
                self._write(framed)
        if self._state is _OPEN and not self._peer_closed:
            self._read_records()

    def _read_records(self) -> None:
        while True:
            try:
                chunk = self._tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self._on_peer_close()
                return
            except ssl.SSLError as exc:
                # Bad record MAC (flip, replay, reorder, drop), unexpected EOF
                # (truncation) or an alert from the peer.
                raise fail("%s: record rejected: %s", self._role, exc) from None
            if not chunk:
                # CPython returns b"" instead of raising SSLZeroReturnError when
                # close_notify arrives and we have not sent ours yet.
                self._on_peer_close()
                return
            if self._rx or not self._one_message(chunk):
                self._rx += chunk
                self._split_messages()
            if not self._incoming.pending and not self._tls.pending():
                return  # nothing left to decrypt: skip the read that would raise WantRead

    def _one_message(self, chunk: bytes) -> bool:
        """The common case, a record holding exactly one message: deliver it
        without going through the reassembly buffer."""
        if len(chunk) < _LEN.size:
            return False
        (length,) = _LEN.unpack_from(chunk)
        if length > MAX_MESSAGE or len(chunk) != _LEN.size + length:
            return False
        self._events.append(Message(chunk[_LEN.size :]))
        return True

    def _split_messages(self) -> None:
        rx = self._rx
        offset = 0
        while len(rx) - offset >= _LEN.size:
            (length,) = _LEN.unpack_from(rx, offset)
            if length > MAX_MESSAGE:
                raise fail("%s: peer announced a %d-byte message", self._role, length)
            end = offset + _LEN.size + length
            if len(rx) < end:
                break
            self._events.append(Message(bytes(rx[offset + _LEN.size : end])))
            offset = end
        del rx[:offset]

    def _on_peer_close(self) -> None:
        if self._rx:
            raise fail("%s: peer closed inside a message", self._role)
        self._peer_closed = True
        self._events.append(Closed())
        if self._local_closed:
            self._set_state(_CLOSED)

    @abc.abstractmethod
    def _authenticate(self) -> PeerCertificate | VerifiedQuote:
        """Check the peer once the handshake is done; ChannelError if it fails."""


class ServerSession(_Session):
    """The enclave side: presents the RA-TLS certificate, requires a pinned client."""

    _role = "server"

    def __init__(self, credential: EnclaveCredential, trust: ClientTrust) -> None:
        super().__init__(
            server_context(credential.key, credential.certificate, trust), server_side=True
        )
        self._trust = trust

    def _authenticate(self) -> PeerCertificate:
        if self._trust.in_band:
            return PeerCertificate(cert_der=b"", spki_sha256=b"")
        der = self._tls.getpeercert(binary_form=True)
        if not der:
            raise fail("server: client sent no certificate")
        digest = spki_sha256(x509.load_der_x509_certificate(der))
        if not self._trust.pinned(digest):
            raise fail("server: client key %s is not pinned", digest.hex())
        return PeerCertificate(cert_der=der, spki_sha256=digest)


class ClientSession(_Session):
    """The VMM / VM endpoint side: authenticates with a client certificate and
    accepts the server only after verifying its enclave quote."""

    _role = "client"

    def __init__(
        self,
        policy: MeasurementPolicy,
        verifier: QuoteVerifier,
        credential: ClientCredential,
        expected_cn: str | None = None,
    ) -> None:
        super().__init__(
            client_context(credential.key, credential.certificate), server_side=False
        )
        self._policy = policy
        self._verifier = verifier
        self._expected_cn = expected_cn
        # The client speaks first: ClientHello is ready before any input.
        with contextlib.suppress(ssl.SSLWantReadError):
            self._tls.do_handshake()

    def _authenticate(self) -> VerifiedQuote:
        der = self._tls.getpeercert(binary_form=True)
        if not der:
            raise fail("client: server sent no certificate")
        return verify_enclave_certificate(der, self._policy, self._verifier, self._expected_cn)

