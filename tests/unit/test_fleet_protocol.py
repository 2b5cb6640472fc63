"""The fleet's pure logic (enclaves/fleet.py), its messages (wire/fleet.py), the
in-band client trust of fleet sessions, and hostd's switch rules for fleet
connections (host/switch.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from sgxvtpm.channel import ClientTrust
from sgxvtpm.channel.errors import ChannelUsageError
from sgxvtpm.enclaves.fleet import (
    MAX_INVITES,
    TOKEN_TTL,
    FleetError,
    FleetState,
    accepted_peer,
    unwrap,
    wrap,
)
from sgxvtpm.enclaves.registry import Registry
from sgxvtpm.enclaves.specs import INSTANCE_PROD_ID, ISV_SVN, MANAGER_PROD_ID
from sgxvtpm.host.switch import FLEET_IN, FLEET_OUT, Relay
from sgxvtpm.platform.base import EnclaveIdentity
from sgxvtpm.wire import fleet as fleetwire
from sgxvtpm.wire.relay import RELAY_ASSIGNED, Frame, FrameType, RelayDecoder, encode

OWN = EnclaveIdentity(b"\x11" * 32, b"\x22" * 32, isv_prod_id=MANAGER_PROD_ID, isv_svn=ISV_SVN)
KEY = ec.generate_private_key(ec.SECP256R1())


@settings(max_examples=25, deadline=None)
@given(secret=st.binary(min_size=16, max_size=64), context=st.binary(max_size=64))
def test_wrap_unwraps_only_with_the_recipient_key_and_context(
    secret: bytes, context: bytes
) -> None:
    ephemeral, wrapped = wrap(secret, KEY.public_key(), context)
    assert secret not in wrapped
    assert unwrap(KEY, ephemeral, wrapped, context) == secret
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(FleetError, match="does not unwrap"):
        unwrap(other, ephemeral, wrapped, context)
    with pytest.raises(FleetError, match="does not unwrap"):
        unwrap(KEY, ephemeral, wrapped, context + b"x")
    flipped = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    with pytest.raises(FleetError, match="does not unwrap"):
        unwrap(KEY, ephemeral, flipped, context)
    with pytest.raises(FleetError, match="does not unwrap"):
        unwrap(KEY, b"\x04" + bytes(64), wrapped, context)


def test_peer_policy_needs_same_signer_manager_product_and_our_code() -> None:
    assert accepted_peer(OWN, OWN) is None
    cases = {
        "not allowed by the fleet policy": EnclaveIdentity(b"\x33" * 32, OWN.mrsigner,
                                                           MANAGER_PROD_ID, ISV_SVN),
        "not a manager enclave": EnclaveIdentity(OWN.mrenclave, b"\x44" * 32,
                                                 MANAGER_PROD_ID, ISV_SVN),
    }  # fmt: skip
    instance = EnclaveIdentity(OWN.mrenclave, OWN.mrsigner, INSTANCE_PROD_ID, ISV_SVN)
    cases["not a manager enclave "] = instance
    for why, peer in cases.items():
        reason = accepted_peer(OWN, peer)
        assert reason is not None and why.strip() in reason


def test_tokens_are_single_use_and_expire() -> None:
    state = FleetState()
    with pytest.raises(FleetError, match="not in a fleet"):
        state.use_token(bytes(32), 0.0)
    token, expires = state.invite("p1", OWN, "h:1", now=1000.0)
    assert expires == 1000.0 + TOKEN_TTL
    assert state.member and len(state.key) == 32 and set(state.members) == {"p1"}
    # Only a hash of the token is kept.
    assert token.hex() not in repr(state.to_json())
    state.use_token(token, 1001.0)
    with pytest.raises(FleetError, match="used already"):
        state.use_token(token, 1002.0)
    late, _ = state.invite("p1", OWN, "", now=2000.0)
    with pytest.raises(FleetError, match="expired"):
        state.use_token(late, 2000.0 + TOKEN_TTL)
    # An expired token is gone for good, also for a clock that goes back.
    with pytest.raises(FleetError, match="used already"):
        state.use_token(late, 2001.0)


def test_outstanding_invitations_are_bounded_oldest_first() -> None:
    state = FleetState()
    tokens = [state.invite("p1", OWN, "", now=100.0 + i)[0] for i in range(MAX_INVITES + 2)]
    assert len(state.invites) == MAX_INVITES
    with pytest.raises(FleetError, match="used already"):
        state.use_token(tokens[0], 110.0)
    state.use_token(tokens[-1], 110.0)


def test_state_survives_the_sealed_registry_and_leave_remove() -> None:
    state = FleetState()
    state.invite("p1", OWN, "h:1", now=5.0)
    state.members["p2"] = {"address": "h:2", "joined": 6.0, "mrenclave": "aa"}
    registry = Registry("op", "ca", fleet=state.to_json())
    back = FleetState.from_json(Registry.decode(registry.encode()).fleet)
    assert back == state
    assert [m.platform_id for m in back.info("p1").members] == ["p1", "p2"]
    with pytest.raises(FleetError, match="use fleet leave"):
        back.remove("p1", "p1")
    with pytest.raises(FleetError, match="no fleet member"):
        back.remove("p9", "p1")
    back.remove("p2", "p1")
    assert list(back.members) == ["p1"]
    back.leave()
    assert not back.member and back.info("p1").fleet_id == ""
    # A registry of before the fleet has none.
    before = Registry.decode(Registry("op", "ca").encode())
    assert FleetState.from_json(before.fleet) == FleetState()


def test_join_message_checks_its_fields() -> None:
    good = fleetwire.Join(token=bytes(32), evidence=b"e", address="h:1")
    assert fleetwire.decode_request(fleetwire.encode_request(good)) == good
    for bad in (
        b'{"op":"join","token":"00","evidence":"65"}',
        b'{"op":"join","token":"' + b"00" * 32 + b'","evidence":""}',
        b'{"op":"leave"}',
        b"\xff",
    ):
        with pytest.raises(fleetwire.FleetProtocolError):
            fleetwire.decode_request(bad)


def test_in_band_client_trust_has_no_anchors_or_pins() -> None:
    assert ClientTrust([], in_band=True).in_band
    with pytest.raises(ChannelUsageError):
        ClientTrust([], frozenset(), in_band=True)
    with pytest.raises(ChannelUsageError):
        ClientTrust([])


# -- the switch ------------------------------------------------------------------


@pytest.fixture
def ends() -> Iterator[list[socket.socket]]:
    """Our ends of the connections a test attaches to the switch, closed after it."""
    ours: list[socket.socket] = []
    yield ours
    for end in ours:
        end.close()


async def _attach(
    ends: list[socket.socket], relay: Relay, kind: str, name: str | None = None, **kw: bool
) -> socket.socket:
    ours, theirs = socket.socketpair()
    ends.append(ours)
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    asyncio.get_running_loop().create_task(
        relay.serve(reader, writer, kind=kind, name=name, **kw)
    )
    await asyncio.sleep(0)
    ours.setblocking(False)
    return ours


async def _frames(sock: socket.socket, count: int) -> list[Frame | None]:
    """``count`` frames from ``sock``, None at end of stream."""
    loop = asyncio.get_running_loop()
    decoder, out = RelayDecoder(), []
    while len(out) < count:
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        if not data:
            return [*out, None]
        decoder.receive_data(data)
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    return out


def test_switch_routes_fleet_connections_to_the_manager_only(ends: list[socket.socket]) -> None:
    async def scenario() -> None:
        relay = Relay()
        loop = asyncio.get_running_loop()
        manager = await _attach(ends, relay, "enclave", "manager")
        await _attach(ends, relay, "enclave", "instance-1")
        peer = await _attach(ends, relay, FLEET_IN)
        # Whatever target it names, with the other switch's session id: the manager.
        await loop.sock_sendall(peer, encode(Frame(FrameType.OPEN, RELAY_ASSIGNED + 7,
                                                   b"instance-1")))  # fmt: skip
        (opened,) = await _frames(manager, 1)
        assert opened is not None and opened.type is FrameType.OPEN
        assert opened.payload == FLEET_IN.encode()
        await loop.sock_sendall(manager, encode(Frame(FrameType.DATA, opened.session_id, b"hi")))
        (data,) = await _frames(peer, 1)
        assert data == Frame(FrameType.DATA, RELAY_ASSIGNED + 7, b"hi")
        # No CONTROL from a fleet peer: the connection ends, its session with it.
        await loop.sock_sendall(peer, encode(Frame.control({"op": "ping"})))
        assert await _frames(peer, 1) == [None]
        (closed,) = await _frames(manager, 1)
        assert closed is not None and closed.type is FrameType.CLOSE
        # A dialled connection only answers: its OPEN ends it.
        out = await _attach(ends, relay, FLEET_OUT, "fleet-1", close_when_idle=True)
        await loop.sock_sendall(out, encode(Frame(FrameType.OPEN, 1, b"manager")))
        assert await _frames(out, 1) == [None]
        await relay.aclose()

    asyncio.run(scenario())


def test_a_dialled_fleet_connection_closes_with_its_last_session(
    ends: list[socket.socket],
) -> None:
    async def scenario() -> None:
        relay = Relay()
        loop = asyncio.get_running_loop()
        manager = await _attach(ends, relay, "enclave", "manager")
        out = await _attach(ends, relay, FLEET_OUT, "fleet-1", close_when_idle=True)
        await loop.sock_sendall(manager, encode(Frame(FrameType.OPEN, 3, b"fleet-1")))
        (opened,) = await _frames(out, 1)
        assert opened is not None and opened.payload == b"manager"
        await loop.sock_sendall(manager, encode(Frame(FrameType.CLOSE, 3, b"")))
        closed, end = await _frames(out, 2)
        assert closed is not None and closed.type is FrameType.CLOSE
        assert end is None
        assert "fleet-1" not in relay.targets
        await relay.aclose()

    asyncio.run(scenario())
