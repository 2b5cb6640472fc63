"""K2Client opening a session when the instance goes away right after the handshake.

A scripted hostd on a unix socket answers the client's OPEN with the instance's
TLS handshake flight and, in the same write, CLOSE of the session: what the
client reads when an instance is killed just after it authenticated (CI's crash
run, tests/reliability/test_rel_crash.py). The client must take it as a lost
session (K2Error: its callers reconnect), not as its own misuse of the relay.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.channel import ClientCredential, ClientTrust, EnclaveCredential, ServerSession
from sgxvtpm.endpoint.k2 import K2Client, K2Error, VmBinding
from sgxvtpm.platform.base import EnclaveIdentity, MeasurementPolicy
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.wire.relay import Frame, FrameType, RelayDecoder, encode

INSTANCE = EnclaveIdentity(mrenclave=b"\x33" * 32, mrsigner=b"\x22" * 32, isv_prod_id=2, isv_svn=1)


def _hostd_closing_after_the_handshake(
    listener: socket.socket, instance: EnclaveCredential, trust: ClientTrust
) -> None:
    conn, _ = listener.accept()
    with conn:
        decoder, tls, sid = RelayDecoder(), ServerSession(instance, trust), None
        while True:
            data = conn.recv(65536)
            if not data:
                return
            decoder.receive_data(data)
            while (frame := decoder.next_frame()) is not None:
                if frame.type == FrameType.OPEN:
                    sid = frame.session_id
                elif frame.type == FrameType.DATA:
                    tls.receive_data(frame.payload)
            with contextlib.suppress(Exception):
                tls.next_event()
            flight = tls.data_to_send()
            if flight and sid is not None:
                # The server's flight and the CLOSE in one write: the client reads both
                # at once, so its handshake completes on a session already closed.
                conn.sendall(encode(Frame.data(sid, flight))
                             + encode(Frame(FrameType.CLOSE, sid, b"peer gone")))
                conn.recv(65536)  # the client's last flight, if it sends one
                return


def test_a_session_closed_with_the_handshake_is_a_lost_session(tmp_path: Path) -> None:
    pd = SimPlatformDir.open_or_create(tmp_path / "p")
    instance = EnclaveCredential.create(pd.enclave_platform(INSTANCE), "inst-1")
    vm = ClientCredential.self_signed(ec.generate_private_key(ec.SECP256R1()), "vm")
    path = tmp_path / "hostd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    trust = ClientTrust([vm.cert_pem], frozenset({vm.spki_sha256}))
    hostd = threading.Thread(
        target=_hostd_closing_after_the_handshake, args=(listener, instance, trust), daemon=True
    )
    hostd.start()
    binding = VmBinding(path, "inst-1", vm, pd.verifier(),
                        MeasurementPolicy(mrenclaves=frozenset({INSTANCE.mrenclave})), "vm1")
    client = K2Client(binding, reconnect_timeout=0)
    try:
        with pytest.raises(K2Error, match="closed the session"):
            client.connect()
    finally:
        client.close()
        hostd.join(10)
        listener.close()
    assert not hostd.is_alive()
