"""Sans-IO attested sessions (sgxvtpm.channel.session) over the real sim platform.

Every negative test ends with ChannelError on the side that detected the
fault and with no message delivered that it should not have been (SECURITY.md
properties 13-15).
"""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.channel import (
    MAX_MESSAGE,
    ChannelError,
    ChannelUsageError,
    ClientCredential,
    ClientSession,
    ClientTrust,
    Closed,
    EnclaveCredential,
    HandshakeComplete,
    Message,
    PeerCertificate,
    ServerSession,
    State,
    report_data_for,
)
from sgxvtpm.channel.evidence import build_self_signed, spki_der
from sgxvtpm.platform.base import EnclaveIdentity, MeasurementPolicy, VerifiedQuote
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.testing.channel import ChannelPair, InMemoryRelay, split_records

MANAGER = EnclaveIdentity(mrenclave=b"\x11" * 32, mrsigner=b"\x22" * 32, isv_prod_id=1, isv_svn=1)
INSTANCE = EnclaveIdentity(mrenclave=b"\x44" * 32, mrsigner=b"\x22" * 32, isv_prod_id=2, isv_svn=1)
ROGUE = EnclaveIdentity(mrenclave=b"\x66" * 32, mrsigner=b"\x22" * 32, isv_prod_id=2, isv_svn=1)
MANAGER_POLICY = MeasurementPolicy(mrenclaves=frozenset({MANAGER.mrenclave}))
INSTANCE_POLICY = MeasurementPolicy(mrenclaves=frozenset({INSTANCE.mrenclave}))


def _issue(ca: EnclaveCredential, key: ec.EllipticCurvePrivateKey, cn: str) -> x509.Certificate:
    """A VM certificate signed by the manager's CA (as CreateInstance would)."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca.key, hashes.SHA256())
    )


@dataclass
class World:
    pd: SimPlatformDir
    other_pd: SimPlatformDir
    manager: EnclaveCredential
    operator: ClientCredential
    instance_a: EnclaveCredential
    vm_a: ClientCredential
    vm_b: ClientCredential

    def manager_trust(self) -> ClientTrust:
        return ClientTrust([self.operator.cert_pem], frozenset({self.operator.spki_sha256}))

    def instance_a_trust(self) -> ClientTrust:
        pins = frozenset({self.vm_a.spki_sha256, self.manager_spki()})
        return ClientTrust([self.manager.cert_pem], pins)

    def manager_spki(self) -> bytes:
        from sgxvtpm.channel import spki_sha256

        return spki_sha256(self.manager.certificate)

    def k1(self, relay: InMemoryRelay | None = None) -> ChannelPair:
        client = ClientSession(MANAGER_POLICY, self.pd.verifier(), self.operator, "manager")
        return ChannelPair(client, ServerSession(self.manager, self.manager_trust()), relay)

    def k2(self, vm: ClientCredential, relay: InMemoryRelay | None = None) -> ChannelPair:
        client = ClientSession(INSTANCE_POLICY, self.pd.verifier(), vm)
        return ChannelPair(client, ServerSession(self.instance_a, self.instance_a_trust()), relay)


@pytest.fixture(scope="module")
def world(sim_platform: SimPlatformDir, other_sim_platform: SimPlatformDir) -> World:
    pd, other = sim_platform, other_sim_platform
    manager = EnclaveCredential.create(pd.enclave_platform(MANAGER), "manager", is_ca=True)
    operator = ClientCredential.self_signed(ec.generate_private_key(ec.SECP256R1()), "operator")
    instance_a = EnclaveCredential.create(pd.enclave_platform(INSTANCE), "instance-a")
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(2)]
    vm_a = ClientCredential(keys[0], _issue(manager, keys[0], "vm-a"))
    vm_b = ClientCredential(keys[1], _issue(manager, keys[1], "vm-b"))
    return World(pd, other, manager, operator, instance_a, vm_a, vm_b)


def open_pair(pair: ChannelPair) -> ChannelPair:
    pair.handshake()
    return pair


# --- positive paths ---------------------------------------------------------


def test_k1_round_trip_and_relay_sees_no_plaintext(world: World) -> None:
    pair = open_pair(world.k1())
    marker = secrets.token_bytes(32)
    reply_marker = secrets.token_bytes(32)
    pair.client.send_message(b"CreateInstance " + marker)
    pair.pump()
    assert pair.messages("server") == [b"CreateInstance " + marker]
    pair.server.send_message(reply_marker)
    pair.pump()
    assert pair.messages("client") == [reply_marker]
    seen = pair.relay.captured
    assert len(seen) > 1000  # handshake + records really went through it
    assert marker not in seen and reply_marker not in seen
    assert marker[:16] not in seen and marker[16:] not in seen


def test_handshake_events_name_the_peer(world: World) -> None:
    pair = open_pair(world.k1())
    (client_done,) = [e for e in pair.client_events if isinstance(e, HandshakeComplete)]
    (server_done,) = [e for e in pair.server_events if isinstance(e, HandshakeComplete)]
    assert isinstance(client_done.peer, VerifiedQuote)
    assert client_done.peer.identity == MANAGER
    assert isinstance(server_done.peer, PeerCertificate)
    assert server_done.peer.spki_sha256 == world.operator.spki_sha256
    assert server_done.peer.cert_der == world.operator.cert_der
    assert pair.client.state is State.OPEN and pair.server.state is State.OPEN


def test_messages_sent_before_authentication_are_held(world: World) -> None:
    pair = world.k1()
    marker = secrets.token_bytes(32)
    pair.client.send_message(marker)
    first_flight = pair.client.data_to_send()  # the ClientHello only
    assert marker not in first_flight
    pair.server.receive_data(first_flight)
    pair.relay.carried.append(("c2s", first_flight))
    pair.pump()
    assert pair.messages("server") == [marker]


def test_k2_vm_key_signed_by_manager_ca(world: World) -> None:
    # OpenSSL accepts a client certificate issued by a CA certificate that
    # carries the (non-critical) quote extension.
    pair = open_pair(world.k2(world.vm_a))
    pair.client.send_message(b"\x80\x01")
    pair.pump()
    assert pair.messages("server") == [b"\x80\x01"]


def test_many_messages_including_empty_and_max_size(world: World) -> None:
    pair = open_pair(world.k1())
    msgs = [b"", b"x", secrets.token_bytes(70_000), secrets.token_bytes(MAX_MESSAGE)]
    for m in msgs:
        pair.client.send_message(m)
    pair.pump()
    assert pair.messages("server") == msgs


def test_clean_close_both_ways(world: World) -> None:
    pair = open_pair(world.k1())
    pair.client.send_message(b"last")
    pair.client.close()
    pair.pump()
    assert pair.messages("server") == [b"last"]
    assert isinstance(pair.server_events[-1], Closed)
    pair.server.send_message(b"after half-close")  # TLS 1.3 half-close (RFC 8446 6.1)
    pair.server.close()
    pair.pump()
    assert pair.messages("client") == [b"after half-close"]
    assert isinstance(pair.client_events[-1], Closed)
    assert pair.client.state is State.CLOSED and pair.server.state is State.CLOSED
    pair.server.receive_data(b"")  # EOF after close_notify is fine
    assert pair.server.next_event() is None


def test_usage_errors(world: World) -> None:
    pair = open_pair(world.k1())
    with pytest.raises(ChannelUsageError):
        pair.client.send_message(bytes(MAX_MESSAGE + 1))
    pair.client.close()
    with pytest.raises(ChannelUsageError):
        pair.client.send_message(b"x")
    pair.server.close()
    pair.pump()
    pair.client.receive_data(b"")
    with pytest.raises(ChannelUsageError):
        pair.client.receive_data(b"more")


# --- enclave identity (SECURITY.md property 13) ------------------------------


def assert_rejected_by_client(pair: ChannelPair, marker: bytes) -> None:
    pair.client.send_message(marker)
    pair.pump()
    assert isinstance(pair.client_error, ChannelError)
    assert pair.client.state is State.BROKEN
    assert not any(isinstance(e, HandshakeComplete) for e in pair.client_events)
    assert pair.messages("server") == [] and pair.messages("client") == []
    assert marker not in pair.relay.captured
    with pytest.raises(ChannelError):
        pair.client.send_message(b"again")


def test_wrong_mrenclave(world: World) -> None:
    rogue = EnclaveCredential.create(world.pd.enclave_platform(ROGUE), "manager", is_ca=True)
    client = ClientSession(MANAGER_POLICY, world.pd.verifier(), world.operator, "manager")
    pair = ChannelPair(client, ServerSession(rogue, world.manager_trust()))
    assert_rejected_by_client(pair, secrets.token_bytes(32))


def test_quote_from_another_platform_root(world: World) -> None:
    foreign = EnclaveCredential.create(world.other_pd.enclave_platform(MANAGER), "manager")
    client = ClientSession(MANAGER_POLICY, world.pd.verifier(), world.operator, "manager")
    pair = ChannelPair(client, ServerSession(foreign, world.manager_trust()))
    assert_rejected_by_client(pair, secrets.token_bytes(32))


def test_reportdata_not_matching_the_key(world: World) -> None:
    # The host replays the manager's genuine quote in a certificate for its own key.
    from sgxvtpm.channel import QUOTE_EXTENSION_OID

    genuine = world.manager.certificate.extensions.get_extension_for_oid(QUOTE_EXTENSION_OID)
    assert isinstance(genuine.value, x509.UnrecognizedExtension)
    host_key = ec.generate_private_key(ec.SECP256R1())
    ext = x509.UnrecognizedExtension(QUOTE_EXTENSION_OID, genuine.value.value)
    cert = build_self_signed(host_key, "manager", is_ca=True, extensions=[ext])
    fake = EnclaveCredential(key=host_key, certificate=cert)
    assert report_data_for(spki_der(host_key.public_key())) != report_data_for(
        spki_der(world.manager.key.public_key())
    )
    client = ClientSession(MANAGER_POLICY, world.pd.verifier(), world.operator, "manager")
    pair = ChannelPair(client, ServerSession(fake, world.manager_trust()))
    assert_rejected_by_client(pair, secrets.token_bytes(32))


def test_wrong_common_name(world: World) -> None:
    client = ClientSession(INSTANCE_POLICY, world.pd.verifier(), world.vm_a, "instance-b")
    pair = ChannelPair(client, ServerSession(world.instance_a, world.instance_a_trust()))
    assert_rejected_by_client(pair, secrets.token_bytes(32))


# --- endpoint identity (SECURITY.md property 14) -----------------------------


def assert_rejected_by_server(pair: ChannelPair, marker: bytes) -> None:
    pair.client.send_message(marker)
    pair.pump()
    # The relay ends the stream when the server drops the session.
    if pair.client_error is None:
        pair.client.receive_data(b"")
        pair.pump()
    assert isinstance(pair.server_error, ChannelError)
    assert isinstance(pair.client_error, ChannelError)
    assert pair.messages("server") == [] and pair.messages("client") == []
    assert not any(isinstance(e, HandshakeComplete) for e in pair.server_events)


def test_client_certificate_not_pinned(world: World) -> None:
    # VM B holds a valid certificate from the same manager CA, but instance A
    # is pinned to VM A's key.
    assert_rejected_by_server(world.k2(world.vm_b), secrets.token_bytes(32))


def test_client_certificate_not_anchored(world: World) -> None:
    stranger = ClientCredential.self_signed(ec.generate_private_key(ec.SECP256R1()), "operator")
    client = ClientSession(MANAGER_POLICY, world.pd.verifier(), stranger, "manager")
    pair = ChannelPair(client, ServerSession(world.manager, world.manager_trust()))
    assert_rejected_by_server(pair, secrets.token_bytes(32))


def test_vm_key_cannot_open_the_manager(world: World) -> None:
    client = ClientSession(MANAGER_POLICY, world.pd.verifier(), world.vm_a, "manager")
    pair = ChannelPair(client, ServerSession(world.manager, world.manager_trust()))
    assert_rejected_by_server(pair, secrets.token_bytes(32))


def test_empty_pin_set_accepts_nobody(world: World) -> None:
    client = ClientSession(MANAGER_POLICY, world.pd.verifier(), world.operator, "manager")
    trust = ClientTrust([world.operator.cert_pem], frozenset())
    assert_rejected_by_server(ChannelPair(client, ServerSession(world.manager, trust)), b"m" * 32)


# --- integrity of records (SECURITY.md property 15) --------------------------


def _records_of(pair: ChannelPair, sender: str, messages: list[bytes]) -> list[bytes]:
    """Send each message as its own TLS record and return the records."""
    session = pair.client if sender == "client" else pair.server
    records: list[bytes] = []
    for m in messages:
        session.send_message(m)
        records += split_records(session.data_to_send())
    return records


def _receiver(pair: ChannelPair, sender: str) -> ClientSession | ServerSession:
    return pair.server if sender == "client" else pair.client


def _deliver(receiver: ClientSession | ServerSession, chunks: list[bytes]) -> list[bytes]:
    """Feed chunks then EOF; return the delivered messages; expect ChannelError."""
    delivered: list[bytes] = []
    with pytest.raises(ChannelError):
        for chunk in [*chunks, b""]:
            receiver.receive_data(chunk)
            for event in receiver.events():
                if isinstance(event, Message):
                    delivered.append(event.data)
    assert receiver.state is State.BROKEN
    with pytest.raises(ChannelError):
        receiver.next_event()
    return delivered


# Positions in a 5-byte-header record: type, version, length, first ciphertext
# byte, middle, start of the 16-byte AEAD tag, last byte of the tag.
FLIP_POSITIONS = [0, 1, 2, 3, 4, 5, 20, -16, -8, -1]


@pytest.mark.parametrize("sender", ["client", "server"])
@pytest.mark.parametrize("position", FLIP_POSITIONS)
@pytest.mark.parametrize("bit", [0, 7])
def test_flipped_bit_in_a_relayed_record(
    world: World, sender: str, position: int, bit: int
) -> None:
    pair = open_pair(world.k1())
    marker = secrets.token_bytes(32)
    (record,) = _records_of(pair, sender, [marker])
    tampered = bytearray(record)
    tampered[position] ^= 1 << bit
    assert _deliver(_receiver(pair, sender), [bytes(tampered)]) == []


@pytest.mark.parametrize("position", [0, 5, 11, 40, 100, 400, -40, -1])
def test_flipped_bit_in_the_server_handshake_flight(world: World, position: int) -> None:
    pair = world.k1()
    pair.server.receive_data(pair.client.data_to_send())
    flight = bytearray(pair.server.data_to_send())
    flight[position] ^= 0x10
    pair.client.send_message(b"never")
    assert _deliver(pair.client, [bytes(flight)]) == []
    assert not any(isinstance(e, HandshakeComplete) for e in pair.client_events)
    assert b"never" not in pair.client.data_to_send()


@pytest.mark.parametrize("sender", ["client", "server"])
def test_dropped_record(world: World, sender: str) -> None:
    pair = open_pair(world.k1())
    records = _records_of(pair, sender, [b"first", b"second"])
    assert _deliver(_receiver(pair, sender), records[1:]) == []


@pytest.mark.parametrize("sender", ["client", "server"])
def test_replayed_record(world: World, sender: str) -> None:
    pair = open_pair(world.k1())
    (record,) = _records_of(pair, sender, [b"TPM2_CC_NV_Increment"])
    # Delivered once, never twice: the replay breaks the session.
    assert _deliver(_receiver(pair, sender), [record, record]) == [b"TPM2_CC_NV_Increment"]


@pytest.mark.parametrize("sender", ["client", "server"])
def test_reordered_records(world: World, sender: str) -> None:
    pair = open_pair(world.k1())
    first, second = _records_of(pair, sender, [b"first", b"second"])
    assert _deliver(_receiver(pair, sender), [second, first]) == []


@pytest.mark.parametrize("sender", ["client", "server"])
@pytest.mark.parametrize("cut", [1, 5, 30, -1])
def test_truncated_stream_inside_a_record(world: World, sender: str, cut: int) -> None:
    pair = open_pair(world.k1())
    (record,) = _records_of(pair, sender, [secrets.token_bytes(32)])
    assert _deliver(_receiver(pair, sender), [record[:cut]]) == []


@pytest.mark.parametrize("sender", ["client", "server"])
def test_truncated_stream_without_close_notify(world: World, sender: str) -> None:
    # Cut at a record boundary: what was received is delivered, but the end
    # of the stream is an error, never a clean Closed (RFC 8446 6.1).
    pair = open_pair(world.k1())
    records = _records_of(pair, sender, [b"one", b"two"])
    assert _deliver(_receiver(pair, sender), records[:1]) == [b"one"]


def test_message_split_across_records_then_cut(world: World) -> None:
    pair = open_pair(world.k1())
    records = _records_of(pair, "client", [secrets.token_bytes(40_000)])
    assert len(records) >= 3
    # close_notify after a partial message is still a truncation.
    assert _deliver(pair.server, records[:-1]) == []


def test_broken_session_stays_broken(world: World) -> None:
    pair = open_pair(world.k1())
    (record,) = _records_of(pair, "client", [b"x"])
    _deliver(pair.server, [record[:-1] + bytes([record[-1] ^ 1])])
    with pytest.raises(ChannelError):
        pair.server.receive_data(record)
    with pytest.raises(ChannelError):
        pair.server.send_message(b"y")
    pair.server.close()  # harmless
    assert pair.server.state is State.BROKEN


def test_tamper_hook_in_the_in_memory_relay(world: World) -> None:
    marker = secrets.token_bytes(32)

    def flip_last_c2s(direction: str, data: bytes) -> bytes:
        if direction == "c2s" and tamper_on:
            return data[:-1] + bytes([data[-1] ^ 0x80])
        return data

    tamper_on = False
    pair = open_pair(world.k1(InMemoryRelay(tamper=flip_last_c2s)))
    tamper_on = True
    pair.client.send_message(marker)
    pair.pump()
    assert isinstance(pair.server_error, ChannelError)
    assert pair.messages("server") == []
