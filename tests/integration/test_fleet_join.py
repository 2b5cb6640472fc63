"""A fleet of managers on several hosts (docs/ARCHITECTURE.md, "Many hosts").

Real hostd processes on this machine, each with its own state directory and
loopback fleet port: A and B are provisioned under one sim root, C under
another. A joiner gets the fleet key only
with a fresh token of a member, from a manager of the same root, signer and
code; the token is used up by the first attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from tests.helpers.fleet import cli, free_port, ok
from tests.helpers.hostd import Hostd, running_hostd

from sgxvtpm.channel import ClientCredential, ClientSession, EnclaveCredential
from sgxvtpm.enclaves.fleet import FleetError, FleetState
from sgxvtpm.enclaves.specs import expected_policy
from sgxvtpm.mux.aio import open_client_session
from sgxvtpm.platform import EnclaveIdentity, VerifiedQuote, init_sim_root, platform_kind
from sgxvtpm.platform.sim import SimPlatformDir, SimQuoteVerifier
from sgxvtpm.platform.sim.authority import SimAuthority
from sgxvtpm.wire import fleet as fleetwire
from sgxvtpm.wire.jsonmsg import Refused

pytestmark = pytest.mark.integration


def invite(h: Hostd) -> str:
    token = json.loads(ok(cli(h, "fleet", "invite", "--json")))["token"]
    assert isinstance(token, str) and len(token) == 64
    return token


def show(h: Hostd) -> dict[str, object]:
    shown = json.loads(ok(cli(h, "fleet", "show", "--json")))
    assert isinstance(shown, dict)
    return shown


def join(h: Hostd, member_port: int, token: str) -> subprocess.CompletedProcess[str]:
    return cli(h, "fleet", "join", f"127.0.0.1:{member_port}", "--token", token)


class RecordingProxy:
    """A TCP forwarder to 127.0.0.1:``port`` that keeps every byte it carries (the network)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.carried = bytearray()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                self.carried += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop accepting, end every forwarded connection and its pumps, close the sockets
        (none is left for the garbage collector to find in another test's thread)."""
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)
        for sock in self._sockets:
            sock.close()


class Fleet:
    def __init__(self, root: Path, hosts: dict[str, Hostd], ports: dict[str, int]) -> None:
        self.root, self.hosts, self.ports = root, hosts, ports


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("fleet")
    init_sim_root(base / "root1")
    init_sim_root(base / "root2")
    roots = {"a": "root1", "b": "root1", "c": "root2"}
    ports = {name: free_port() for name in roots}
    with (
        running_hostd(base / "a", args=_args(base, roots, ports, "a")) as a,
        running_hostd(base / "b", args=_args(base, roots, ports, "b")) as b,
        running_hostd(base / "c", args=_args(base, roots, ports, "c")) as c,
    ):
        yield Fleet(base / "root1", {"a": a, "b": b, "c": c}, ports)


def _args(base: Path, roots: dict[str, str], ports: dict[str, int], name: str) -> list[str]:
    return ["--sim-root", str(base / roots[name]), "--fleet-listen", f"127.0.0.1:{ports[name]}"]


def test_a_host_with_no_token_of_the_fleet_gets_nothing(fleet: Fleet) -> None:
    invite(fleet.hosts["a"])  # A has a fleet; B has no token of it
    done = join(fleet.hosts["b"], fleet.ports["a"], "ab" * 32)
    assert done.returncode == 1
    assert "unknown or was used already" in done.stderr
    assert show(fleet.hosts["b"])["fleet_id"] == ""


def test_join_gives_the_fleet_to_both_managers(fleet: Fleet) -> None:
    a, b = fleet.hosts["a"], fleet.hosts["b"]
    assert show(b)["fleet_id"] == ""
    token = invite(a)
    # Through a recording proxy: what the network between the two hostds carries.
    proxy = RecordingProxy(fleet.ports["a"])
    try:
        done = join(b, proxy.port, token)
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr
    assert len(proxy.carried) > 1000  # two quotes and certificates went through
    assert bytes.fromhex(token) not in proxy.carried
    assert token.encode() not in proxy.carried
    shown_a, shown_b = show(a), show(b)
    assert shown_a["fleet_id"] == shown_b["fleet_id"] != ""
    members = {m["platform_id"] for m in shown_a["members"]}  # type: ignore[attr-defined]
    assert members == {shown_a["self_id"], shown_b["self_id"]}
    assert {m["platform_id"] for m in shown_b["members"]} == members  # type: ignore[attr-defined]
    # The same token again: used up. A member cannot join twice either.
    _, reply = asyncio.run(_join_as(fleet.root, fleet.ports["a"], bytes.fromhex(token), b"x"))
    assert isinstance(reply, Refused)
    assert "unknown or was used already" in reply.error
    again = join(b, fleet.ports["a"], invite(a))
    assert again.returncode == 1
    assert "fleet leave first" in again.stderr
    # remove (from A's list) and leave (B forgets the fleet and its key).
    assert cli(a, "fleet", "remove", str(shown_b["self_id"])).returncode == 0
    assert [m["platform_id"] for m in show(a)["members"]] == [shown_a["self_id"]]  # type: ignore[attr-defined]
    assert cli(b, "fleet", "leave").returncode == 0
    assert show(b)["fleet_id"] == ""
    listed = cli(b, "fleet", "show")
    assert listed.returncode == 0 and listed.stdout.strip() == "not in a fleet"


def test_a_host_under_another_root_is_refused(fleet: Fleet) -> None:
    a, c = fleet.hosts["a"], fleet.hosts["c"]
    token = invite(a)
    done = join(c, fleet.ports["a"], token)
    assert done.returncode == 1
    assert "refused or unreachable" in done.stderr
    assert show(c)["fleet_id"] == ""
    # A host not in a fleet cannot wait for a migrated VM: nobody could send it state.
    incoming = cli(c, "vm", "create", "waiting", "--incoming")
    assert incoming.returncode == 1
    assert "needs this host in a fleet" in incoming.stderr
    assert cli(c, "vm", "show", "waiting").returncode == 1


async def _join_as(
    root: Path, port: int, token: bytes, evidence: bytes
) -> tuple[VerifiedQuote, fleetwire.Joined | Refused]:
    """Speak the joiner's part from this test process, with ``evidence`` of our making."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    session = ClientSession(
        expected_policy("manager", platform_kind("sim")),
        SimQuoteVerifier((root / "root_ca.pem").read_bytes()),
        ClientCredential.self_signed(ec.generate_private_key(ec.SECP256R1()), "test"),
    )
    wrapped = await open_client_session(reader, writer, session, "manager")
    try:
        peer = wrapped.peer
        assert isinstance(peer, VerifiedQuote)
        join_request = fleetwire.Join(token=token, evidence=evidence)
        await wrapped.send(fleetwire.encode_request(join_request))
        reply = fleetwire.decode_reply(join_request, await wrapped.recv())
    finally:
        await wrapped.close()
    return peer, reply


def _member_identity(fleet: Fleet) -> EnclaveIdentity:
    """The member's manager identity, as its quote shows it (a join with a bad token)."""
    peer, reply = asyncio.run(_join_as(fleet.root, fleet.ports["a"], bytes(32), b"x"))
    assert isinstance(reply, Refused)
    return peer.identity


def _evidence(platform: SimPlatformDir, identity: EnclaveIdentity) -> EnclaveCredential:
    return EnclaveCredential.create(
        platform.enclave_platform(identity), "sgxvtpm manager CA", is_ca=True
    )


def test_a_manager_with_other_code_or_root_gets_nothing(fleet: Fleet, tmp_path: Path) -> None:
    genuine = _member_identity(fleet)
    a = fleet.hosts["a"]
    same_root = SimPlatformDir.open_or_create(
        tmp_path / "e", authority=SimAuthority.open(fleet.root)
    )
    init_sim_root(tmp_path / "root3")
    other_root = SimPlatformDir.open_or_create(
        tmp_path / "f", authority=SimAuthority.open(tmp_path / "root3")
    )
    other_code = dataclasses.replace(genuine, mrenclave=bytes(32))
    cases = [
        (_evidence(same_root, other_code), "not allowed by the fleet policy"),
        (_evidence(other_root, genuine), "evidence is refused"),
    ]
    for credential, why in cases:
        token = invite(a)
        der = credential.certificate.public_bytes(Encoding.DER)
        _, reply = asyncio.run(_join_as(fleet.root, fleet.ports["a"], bytes.fromhex(token), der))
        assert isinstance(reply, Refused)
        assert why in reply.error
        # The attempt used the token up.
        _, again = asyncio.run(_join_as(fleet.root, fleet.ports["a"], bytes.fromhex(token), b"x"))
        assert isinstance(again, Refused)
        assert "unknown or was used already" in again.error


def test_the_key_is_wrapped_to_the_attested_key_only(fleet: Fleet, tmp_path: Path) -> None:
    """Evidence that passes (here: forged with the sim platform's own secrets, which
    sim mode cannot prevent) gets the key wrapped to the key its quote binds; a
    replayed certificate of another manager gets a key only that manager can read."""
    genuine = _member_identity(fleet)
    same_root = SimPlatformDir.open_or_create(
        tmp_path / "e", authority=SimAuthority.open(fleet.root)
    )
    forged = _evidence(same_root, genuine)
    replayed = _evidence(same_root, genuine)  # stands for a real manager's public certificate
    first = bytes.fromhex(invite(fleet.hosts["a"]))
    der = replayed.certificate.public_bytes(Encoding.DER)
    _, reply = asyncio.run(_join_as(fleet.root, fleet.ports["a"], first, der))
    assert isinstance(reply, fleetwire.Joined)
    state = FleetState()
    with pytest.raises(FleetError, match="does not unwrap"):
        state.joined(first, reply, forged.key)
    assert not state.member
    second = bytes.fromhex(invite(fleet.hosts["a"]))
    der = forged.certificate.public_bytes(Encoding.DER)
    proxy = RecordingProxy(fleet.ports["a"])
    try:
        _, reply = asyncio.run(_join_as(fleet.root, proxy.port, second, der))
    finally:
        proxy.close()
    assert isinstance(reply, fleetwire.Joined)
    state.joined(second, reply, forged.key)
    assert state.fleet_id == show(fleet.hosts["a"])["fleet_id"]
    assert len(state.key) == 32
    # The network carried the join, never the token or the fleet key in the clear.
    assert len(proxy.carried) > 1000
    assert second not in proxy.carried and state.key not in proxy.carried
    assert second.hex().encode() not in proxy.carried
    assert state.key.hex().encode() not in proxy.carried
