"""K1 round trip over real unix sockets, with the relay in its own process.

The relay (tests/helpers/relay_process.py) records every byte it reads;
the enclave side (a sim-platform credential serving sessions) and the client
run here, each on its own unix-socket connection to the relay.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.channel import (
    ChannelError,
    ClientCredential,
    ClientSession,
    ClientTrust,
    EnclaveCredential,
    ServerSession,
)
from sgxvtpm.mux.aio import AsyncSession, RelayMux, open_client_session
from sgxvtpm.platform.base import EnclaveIdentity, MeasurementPolicy, VerifiedQuote
from sgxvtpm.platform.sim import SimPlatformDir

pytestmark = pytest.mark.integration

MANAGER = EnclaveIdentity(mrenclave=b"\x11" * 32, mrsigner=b"\x22" * 32, isv_prod_id=1, isv_svn=1)
POLICY = MeasurementPolicy(mrenclaves=frozenset({MANAGER.mrenclave}))
RELAY_PROCESS = Path(__file__).parents[1] / "helpers" / "relay_process.py"


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    sock = tmp_path / "relay.sock"
    capture = tmp_path / "relay.capture"
    argv = ["--listen", str(sock), "--capture", str(capture)]
    proc = subprocess.Popen(
        [sys.executable, str(RELAY_PROCESS), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        assert proc.pid != os.getpid()
        yield sock, capture
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode()


def test_k1_round_trip_through_a_relay_process(
    relay_process: tuple[Path, Path], tmp_path: Path
) -> None:
    sock, capture = relay_process
    pd = SimPlatformDir.open_or_create(tmp_path / "platform")
    manager = EnclaveCredential.create(pd.enclave_platform(MANAGER), "manager", is_ca=True)
    operator = ClientCredential.self_signed(ec.generate_private_key(ec.SECP256R1()), "operator")
    stranger = ClientCredential.self_signed(ec.generate_private_key(ec.SECP256R1()), "operator")
    trust = ClientTrust([operator.cert_pem], frozenset({operator.spki_sha256}))
    marker = secrets.token_bytes(32)
    secret_reply = secrets.token_bytes(32)
    received: list[bytes] = []

    async def handler(session: AsyncSession) -> None:
        while True:
            msg = await session.recv()
            received.append(msg)
            await session.send(secret_reply + msg[::-1])

    async def main() -> None:
        er, ew = await asyncio.open_unix_connection(str(sock))
        enclave = RelayMux(
            er, ew, session_factory=lambda source: ServerSession(manager, trust), handler=handler
        )
        enclave.start()
        assert await enclave.control({"op": "register", "name": "manager"}) == {"ok": True, "id": 1}

        r, w = await asyncio.open_unix_connection(str(sock))
        client = ClientSession(POLICY, pd.verifier(), operator, "manager")
        session = await open_client_session(r, w, client, "manager")
        assert isinstance(session.peer, VerifiedQuote)
        assert session.peer.identity == MANAGER
        for _ in range(3):
            await session.send(marker)
            assert await session.recv() == secret_reply + marker[::-1]
        await session.close()

        # A client with an unpinned key gets nothing through.
        r2, w2 = await asyncio.open_unix_connection(str(sock))
        with pytest.raises(ChannelError):
            bad = await open_client_session(
                r2, w2, ClientSession(POLICY, pd.verifier(), stranger, "manager"), "manager"
            )
            await bad.send(b"intruder" + marker)
            await bad.recv()
        await enclave.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert received == [marker] * 3
    seen = capture.read_bytes()
    assert len(seen) > 2000  # both handshakes and the records crossed the relay
    assert marker not in seen
    assert secret_reply not in seen
    assert marker[::-1] not in seen
