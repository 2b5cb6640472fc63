"""Round-trip cost of an attested session versus a plain socketpair.

Both variants echo the same messages over a unix socketpair with a thread
on the far end; the session variant wraps them in our TLS 1.3 session
(ClientSession / ServerSession, sim platform). Prints medians and the ratio
session / plain per message size, plus the cost of one attested handshake
(key generation and quote excluded: the enclave makes those once).

    .venv/bin/python benchmarks/bench_channel.py [--iterations N]
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.channel import (
    ClientCredential,
    ClientSession,
    ClientTrust,
    EnclaveCredential,
    HandshakeComplete,
    Message,
    ServerSession,
)
from sgxvtpm.platform.base import EnclaveIdentity, MeasurementPolicy
from sgxvtpm.platform.sim import SimPlatformDir

IDENTITY = EnclaveIdentity(mrenclave=b"\x11" * 32, mrsigner=b"\x22" * 32, isv_prod_id=1, isv_svn=1)
POLICY = MeasurementPolicy(mrenclaves=frozenset({IDENTITY.mrenclave}))
SIZES = (32, 1024, 4096, 65536)
_LEN = struct.Struct(">I")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _plain_echo(sock: socket.socket) -> None:
    try:
        while True:
            (n,) = _LEN.unpack(_recv_exact(sock, 4))
            sock.sendall(_LEN.pack(n) + _recv_exact(sock, n))
    except (EOFError, OSError):
        pass


def _plain_round_trip(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LEN.pack(len(payload)) + payload)
    (n,) = _LEN.unpack(_recv_exact(sock, 4))
    _recv_exact(sock, n)


def _next(sock: socket.socket, session: ClientSession | ServerSession) -> object:
    """Flush, then read until the session yields an event."""
    while True:
        out = session.data_to_send()
        if out:
            sock.sendall(out)
        event = session.next_event()
        if event is not None:
            return event
        data = sock.recv(1 << 17)
        session.receive_data(data)
        if not data:
            raise EOFError


def _session_echo(sock: socket.socket, make: Callable[[], ServerSession]) -> None:
    try:
        while True:
            session = make()
            while True:
                event = _next(sock, session)
                if isinstance(event, Message):
                    session.send_message(event.data)
                    if event.data == b"bye":  # acknowledged, so streams never mix
                        sock.sendall(session.data_to_send())
                        break
    except (EOFError, OSError):
        pass


class Fixture:
    def __init__(self, directory: Path) -> None:
        pd = SimPlatformDir.open_or_create(directory / "platform")
        self.verifier = pd.verifier()
        self.server = EnclaveCredential.create(pd.enclave_platform(IDENTITY), "bench")
        self.client = ClientCredential.self_signed(
            ec.generate_private_key(ec.SECP256R1()), "operator"
        )
        self.trust = ClientTrust([self.client.cert_pem], frozenset({self.client.spki_sha256}))

    def server_session(self) -> ServerSession:
        return ServerSession(self.server, self.trust)

    def client_session(self) -> ClientSession:
        return ClientSession(POLICY, self.verifier, self.client, "bench")


def _time(fn: Callable[[], None], iterations: int) -> float:
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _handshake(sock: socket.socket, fx: Fixture) -> ClientSession:
    session = fx.client_session()
    while not isinstance(_next(sock, session), HandshakeComplete):
        pass
    return session


def _bye(sock: socket.socket, session: ClientSession) -> None:
    session.send_message(b"bye")
    assert _next(sock, session) == Message(b"bye")


def run(iterations: int = 300, sizes: tuple[int, ...] = SIZES) -> dict[str, float]:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fx = Fixture(Path(tmp))
        a, b = socket.socketpair()
        threading.Thread(target=_plain_echo, args=(b,), daemon=True).start()
        c, d = socket.socketpair()
        threading.Thread(target=_session_echo, args=(d, fx.server_session), daemon=True).start()
        try:
            hs_samples = []
            for _ in range(max(3, iterations // 20)):
                t0 = time.perf_counter()
                s = _handshake(c, fx)
                hs_samples.append(time.perf_counter() - t0)
                _bye(c, s)
            results["handshake_ms"] = statistics.median(hs_samples) * 1e3
            session = _handshake(c, fx)
            for size in sizes:
                payload = bytes(size)

                def secure(payload: bytes = payload) -> None:
                    session.send_message(payload)
                    event = _next(c, session)
                    assert isinstance(event, Message) and len(event.data) == len(payload)

                def plain_rt(payload: bytes = payload) -> None:
                    _plain_round_trip(a, payload)

                plain = _time(plain_rt, iterations)
                tls = _time(secure, iterations)
                results[f"plain_us_{size}"] = plain * 1e6
                results[f"session_us_{size}"] = tls * 1e6
                results[f"ratio_{size}"] = tls / plain
            _bye(c, session)
        finally:
            for sock in (a, b, c, d):
                sock.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args(argv)
    # The echo thread's last session ends at an EOF; that failure is expected.
    logging.getLogger("sgxvtpm.channel").setLevel(logging.ERROR)
    results = run(args.iterations)
    print(f"attested handshake (TLS 1.3 + quote check): {results['handshake_ms']:.2f} ms")
    print(f"{'size':>8} {'plain us':>10} {'session us':>11} {'ratio':>7}")
    for size in SIZES:
        print(
            f"{size:>8} {results[f'plain_us_{size}']:>10.1f} "
            f"{results[f'session_us_{size}']:>11.1f} {results[f'ratio_{size}']:>7.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
