"""A testing kit for code that uses attested sessions (trio style).

:class:`ChannelPair` wires a :class:`ClientSession` and a :class:`ServerSession`
through an :class:`InMemoryRelay` that records every byte it carried, so tests
can assert that the relay saw no plaintext (SECURITY.md property 12) and can
tamper with records in flight (property 15).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from sgxvtpm.channel.errors import ChannelError
from sgxvtpm.channel.session import (
    ClientSession,
    Event,
    HandshakeComplete,
    Message,
    ServerSession,
    State,
)

TLS_RECORD_HEADER = 5  # RFC 8446 section 5.1: type(1) legacy_version(2) length(2)

Tamper = Callable[[str, bytes], bytes]


def split_records(data: bytes) -> list[bytes]:
    """Split a TLS byte stream into whole records (header included)."""
    records = []
    offset = 0
    while offset + TLS_RECORD_HEADER <= len(data):
        (length,) = struct.unpack_from(">H", data, offset + 3)
        end = offset + TLS_RECORD_HEADER + length
        if end > len(data):
            break
        records.append(data[offset:end])
        offset = end
    if offset != len(data):
        raise ValueError("trailing partial TLS record")
    return records


@dataclass
class InMemoryRelay:
    """Carries bytes between the two sessions and remembers all of them.

    ``tamper(direction, data) -> data`` may rewrite each chunk in flight;
    direction is ``"c2s"`` or ``"s2c"``.
    """

    tamper: Tamper | None = None
    carried: list[tuple[str, bytes]] = field(default_factory=list)

    def carry(self, direction: str, data: bytes) -> bytes:
        if self.tamper is not None:
            data = self.tamper(direction, data)
        self.carried.append((direction, data))
        return data

    @property
    def captured(self) -> bytes:
        """Everything the relay saw, both directions, concatenated."""
        return b"".join(data for _, data in self.carried)


class ChannelPair:
    """A client and a server session joined by an in-memory relay."""

    def __init__(
        self,
        client: ClientSession,
        server: ServerSession,
        relay: InMemoryRelay | None = None,
    ) -> None:
        self.client = client
        self.server = server
        self.relay = relay or InMemoryRelay()
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []
        self.client_error: ChannelError | None = None
        self.server_error: ChannelError | None = None

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything to send, and
        collect both sides' events (errors are kept in ``*_error``)."""
        while True:
            moved = self._move("c2s", self.client, self.server)
            moved |= self._move("s2c", self.server, self.client)
            self._collect()
            if not moved:
                return

    def _move(
        self, direction: str, src: ClientSession | ServerSession, dst: ClientSession | ServerSession
    ) -> bool:
        data = src.data_to_send()
        if not data:
            return False
        data = self.relay.carry(direction, data)
        if data and dst.state is not State.BROKEN:
            dst.receive_data(data)
        return True

    def _collect(self) -> None:
        for session, events, attr in (
            (self.client, self.client_events, "client_error"),
            (self.server, self.server_events, "server_error"),
        ):
            if getattr(self, attr) is not None:
                continue
            try:
                events.extend(session.events())
            except ChannelError as exc:
                setattr(self, attr, exc)

    def handshake(self) -> None:
        """Pump until both sides are authenticated; ChannelError otherwise."""
        self.pump()
        for events, error in (
            (self.client_events, self.client_error),
            (self.server_events, self.server_error),
        ):
            if error is not None:
                raise error
            if not any(isinstance(e, HandshakeComplete) for e in events):
                raise ChannelError("handshake did not complete")

    def messages(self, side: str) -> list[bytes]:
        """The messages delivered so far to ``"client"`` or ``"server"``."""
        events = self.client_events if side == "client" else self.server_events
        return [e.data for e in events if isinstance(e, Message)]
