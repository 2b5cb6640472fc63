"""The isolation matrix (RELIABILITY.md scenario 5; SECURITY.md properties 12-15).

Every cross-tenant attempt we could think of, each refused:

- every credential against every enclave: only VM A's key opens instance A,
  only the operator key opens the manager (VM B's key, the operator key, a
  key certified by another host's manager, a fresh self-signed key: refused);
- a captured K2 session replayed byte for byte on a new connection: the
  instance hangs up and the command it carried does not run again;
- an enclave's stream is a socketpair held by hostd: no enclave listens or
  holds a network socket; the only socket paths an enclave holds are
  connections accepted on hostd.sock and handed to it after the handshake;
  a client that speaks to an instance through hostd without TLS gets no
  answer (and runs nothing);
- hostd's CONTROL operations that launch, stop or erase instances are the
  manager enclave's alone;
- no API hands out sealed state: the VMM's replies hold no sealed bytes, and
  VM A's GET_STATEBLOB gives a blob that only A's instance accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.helpers.vmtools import (
    COUNTER_ATTRS,
    TRANSIENT,
    VMM_TRANSIENT,
    HostdCtl,
    boot,
    counter,
    running,
)

from sgxvtpm.channel import ClientCredential
from sgxvtpm.endpoint.k2 import K2Client, VmBinding
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU
from sgxvtpm.tpm.engine import StateType
from sgxvtpm.tpm.nv import execute
from sgxvtpm.vmm.client import VmmClient
from sgxvtpm.wire import relay as frames
from sgxvtpm.wire import vtpm

pytestmark = pytest.mark.integration

CTR = 0x01500050


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostdCtl, HostdCtl]]:
    """This host with VMs a and b, and another host (another manager CA, another operator)
    with VM x."""
    base = tmp_path_factory.mktemp("iso")
    with (
        running(base / "state") as ctl,
        running(base / "other", credentials=base / "other-credentials") as other,
    ):
        ctl.create_many(["a", "b"])
        other.create("x")
        for name in ("a", "b"):
            with boot(ctl, name) as c:
                execute(c.transact, wire.nv_define_space(CTR, 8, COUNTER_ATTRS))
                execute(c.transact, wire.nv_increment(CTR))
        yield ctl, other


def vm_credential(ctl: HostdCtl, name: str) -> ClientCredential:
    return ctl.h.binding(name).credential


def credentials(ctl: HostdCtl, other: HostdCtl) -> dict[str, ClientCredential]:
    return {
        "vm a": vm_credential(ctl, "a"),
        "vm b": vm_credential(ctl, "b"),
        "operator": ctl.h.credentials.operator(),
        "other host's vm": vm_credential(other, "x"),
        "other host's operator": other.h.credentials.operator(),
        "self-signed": ClientCredential.self_signed(ec.generate_private_key(ec.SECP256R1()), "a"),
    }


def opens_instance(ctl: HostdCtl, credential: ClientCredential) -> bool:
    base = ctl.h.binding("a")
    binding = VmBinding(base.socket_path, base.instance_id, credential, base.verifier, base.policy)
    try:
        with K2Client(binding, timeout=30) as c:
            c.power_on()
            execute(c.transact, wire.startup(TPM2_SU.CLEAR))
            return len(wire.parse_get_random(execute(c.transact, wire.get_random(8)))) == 8
    except TRANSIENT:
        return False


def opens_manager(ctl: HostdCtl, credential: ClientCredential) -> bool:
    try:
        asyncio.run(VmmClient(ctl.state, credentials=ctl.h.credentials,
                              operator=credential).list())
    except VMM_TRANSIENT:
        return False
    return True


def test_credential_matrix(host: tuple[HostdCtl, HostdCtl]) -> None:
    ctl, other = host
    creds = credentials(ctl, other)
    instance = {label: opens_instance(ctl, c) for label, c in creds.items()}
    manager = {label: opens_manager(ctl, c) for label, c in creds.items()}
    assert instance == {label: label == "vm a" for label in creds}, instance
    assert manager == {label: label == "operator" for label in creds}, manager


# ------------------------------------------------------------------ replay


class Recorder:
    """A unix-socket proxy in front of hostd that keeps what the client sent."""

    def __init__(self, path: Path, upstream: Path) -> None:
        self.path, self.upstream = path, upstream
        self.sent = bytearray()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._server.accept()
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.connect(str(self.upstream))
        back = threading.Thread(target=self._pump, args=(up, conn, None), daemon=True)
        back.start()
        self._pump(conn, up, self.sent)
        back.join(10)
        conn.close()
        up.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, keep: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if keep is not None:
                    keep += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._server.close()
        self._thread.join(10)


def raw_exchange(sock_path: Path, data: bytes, wait: float = 5.0) -> list[frames.Frame]:
    """Send ``data`` on a fresh hostd connection; the frames hostd sends back."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(wait)
    s.connect(str(sock_path))
    s.sendall(data)
    decoder, got = frames.RelayDecoder(), []
    try:
        while chunk := s.recv(65536):
            decoder.receive_data(chunk)
            while (f := decoder.next_frame()) is not None:
                got.append(f)
                if f.type in (frames.FrameType.CLOSE, frames.FrameType.CONTROL):
                    return got
    except TimeoutError:
        pass
    finally:
        s.close()
    return got


def replay_until_closed(sock_path: Path, data: bytes, wait: float = 20.0) -> bool:
    """Send ``data`` on a fresh connection; True once the far end closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(wait)
        s.connect(str(sock_path))
        try:
            s.sendall(data)
            while s.recv(65536):
                pass
        except TimeoutError:
            return False
        except OSError:
            pass  # reset by the peer: closed as well
    return True


def test_replayed_k2_session_runs_nothing(host: tuple[HostdCtl, HostdCtl], tmp_path: Path) -> None:
    ctl, _ = host
    with boot(ctl, "a") as c:
        before = counter(c, CTR)
    proxy = Recorder(tmp_path / "rec.sock", ctl.state.socket)
    base = ctl.h.binding("a")
    recorded = VmBinding(proxy.path, base.instance_id, base.credential, base.verifier, base.policy)
    with K2Client(recorded, timeout=30) as c:
        execute(c.transact, wire.nv_increment(CTR))  # the TPM runs (INIT'd by boot above)
    proxy.close()
    assert len(proxy.sent) > 500  # OPEN, ClientHello, certificate, Finished, records
    # After the handshake the client asks hostd to hand its connection to the
    # instance, so the replay ends in raw TLS: the instance must hang up on it.
    assert replay_until_closed(ctl.state.socket, bytes(proxy.sent)), "replay not refused"
    with boot(ctl, "a") as c:
        assert counter(c, CTR) == before + 1  # the recorded increment ran once, not twice


# ------------------------------------------------------------------ no way around hostd


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _unix_sockets() -> dict[str, tuple[bool, str]]:
    """inode -> (listening, path) from /proc/net/unix (Flags __SO_ACCEPTCON = listening)."""
    out = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        out[parts[6]] = (bool(int(parts[3], 16) & 0x10000), parts[7] if len(parts) > 7 else "")
    return out


def _inet_inodes() -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/net/{table}")
        if path.exists():
            inodes |= {line.split()[9] for line in path.read_text().splitlines()[1:]}
    return inodes


def test_enclave_streams_have_no_path_and_nothing_listens(host: tuple[HostdCtl, HostdCtl]) -> None:
    ctl, _ = host
    pids = {name: pid for name, pid in ctl.enclave_pids().items() if Path(f"/proc/{pid}").exists()}
    assert "manager" in pids and len(pids) >= 3
    # With a VM session open: its connection may have been handed to the
    # instance (an accepted connection of hostd.sock), which is no way in.
    session = boot(ctl, "a")
    unix, inet = _unix_sockets(), _inet_inodes()
    for name, pid in pids.items():
        inodes = _socket_inodes(pid)
        assert inodes, name
        for inode in inodes:
            assert inode not in inet, f"{name} holds a network socket"
            listens, path = unix.get(inode, (False, ""))
            assert not listens, f"{name} listens on {path!r}"
            assert path in ("", str(ctl.state.socket)), f"{name} holds a socket at {path}"
    session.close()
    listening = [p for on, p in unix.values() if on and p.startswith(str(ctl.state.root))]
    assert listening == [str(ctl.state.socket)], listening


def test_plaintext_through_hostd_gets_nothing(host: tuple[HostdCtl, HostdCtl]) -> None:
    ctl, _ = host
    with boot(ctl, "a") as c:
        before = counter(c, CTR)
    instance_id = ctl.instance_id("a")
    request = vtpm.encode_request(vtpm.VtpmRequest.tpm_command(wire.nv_increment(CTR)))
    sent = frames.encode(frames.Frame.open(1, instance_id)) + frames.encode(
        frames.Frame.data(1, request)
    )
    got = raw_exchange(ctl.state.socket, sent)
    data = b"".join(f.payload for f in got if f.type is frames.FrameType.DATA)
    assert got and got[-1].type is frames.FrameType.CLOSE
    assert not data or data[0] in (0x15, 0x16), data[:16]  # a TLS alert at most
    with boot(ctl, "a") as c:
        assert counter(c, CTR) == before


def control(sock_path: Path, request: dict[str, object]) -> dict[str, object]:
    got = raw_exchange(sock_path, frames.encode(frames.Frame.control({**request, "id": 7})), 10)
    replies = [f.control_object() for f in got if f.type is frames.FrameType.CONTROL]
    assert replies, got
    return replies[0]


def test_only_the_manager_may_launch_stop_or_erase(host: tuple[HostdCtl, HostdCtl]) -> None:
    ctl, _ = host
    instance_id = ctl.instance_id("b")
    for op in ("launch_instance", "stop_instance", "instance_info", "manager_ready"):
        reply = control(
            ctl.state.socket, {"op": op, "instance_id": instance_id, "erase": True,
                               "manager_cert_pem": "x"}
        )
        assert reply.get("ok") is False and "only the manager" in str(reply.get("error")), reply
    # A CONTROL frame of deeply nested JSON ends that connection only.
    deep = b"[" * 5000
    bad = frames.HEADER.pack(frames.FrameType.CONTROL, 0, len(deep)) + deep
    raw_exchange(ctl.state.socket, bad, 3)
    assert ctl.sealed("b").exists()
    with boot(ctl, "b") as c:
        assert counter(c, CTR) >= 1
    assert {i.name for i in ctl.list()} == {"a", "b"}


# ------------------------------------------------------------------ no API gives out sealed state


def test_no_api_returns_sealed_state(host: tuple[HostdCtl, HostdCtl]) -> None:
    ctl, _ = host
    sealed = {n: ctl.sealed(n).read_bytes() for n in ("a", "b")}
    replies = json.dumps([i.to_json() for i in [*ctl.list(), ctl.show("a"), ctl.show("b")]])
    for blob in sealed.values():
        body = blob[-64:]  # ciphertext: in hex, base64 or any other text form it would show
        assert body.hex() not in replies
        assert b"SGXVTPMS".hex() not in replies and "SGXVTPMS" not in replies

    def blob_of(name: str) -> bytes:
        with boot(ctl, name) as c:
            r = c.call(vtpm.VtpmRequest.get_stateblob(StateType.PERMANENT))
            assert r.success
            return r.payload

    blob_a, blob_b = blob_of("a"), blob_of("b")
    assert blob_a and blob_b and blob_a != blob_b
    assert blob_a not in sealed["b"] and blob_b not in sealed["a"]

    def set_blob(name: str, blob: bytes) -> bool:
        with boot(ctl, name) as c:
            assert c.call(vtpm.VtpmRequest(vtpm.VtpmOp.STOP)).success
            ok = c.call(vtpm.VtpmRequest.set_stateblob(StateType.PERMANENT, blob)).success
            c.power_on()
            return ok

    assert not set_blob("b", blob_a)  # A's state does not load into B
    with boot(ctl, "b") as c:
        assert counter(c, CTR) >= 1  # B still holds its own state
