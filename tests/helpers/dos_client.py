"""An unauthenticated local client that tries to wear hostd and its enclaves out.

Usage: python -m tests.helpers.dos_client SOCKET MODE TARGET COUNT SECONDS

Runs in a process of its own so that its work does not share an interpreter
lock with the client whose latency a test measures. Modes:

``hello``  COUNT sessions to TARGET, each sending a real TLS ClientHello
           (the enclave answers each with its whole handshake flight);
``opens``  COUNT OPEN frames to TARGET and nothing else;
``pings``  COUNT bytes of CONTROL ping requests to hostd itself;

all on one connection that is never read (if hostd drops it, on a new one);

``spread`` COUNT connections with one ``hello`` session each, all kept.

Each stops early after SECONDS. It then prints ``sent N`` (sessions, frames
or bytes it got into the socket) and keeps every connection that is still
open, unread, until its stdin closes.
"""

from __future__ import annotations

import socket
import sys
import time

from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.channel import ClientCredential, ClientSession
from sgxvtpm.platform.base import MeasurementPolicy, QuoteVerifier, VerifiedQuote
from sgxvtpm.wire import relay as frames

_BATCH = 256  # frames per sendall: a flood, not a trickle


class _NoVerifier(QuoteVerifier):
    """Never asked: this client does not get past its ClientHello."""

    def verify(self, quote: bytes) -> VerifiedQuote:
        raise AssertionError("not reached")


def client_hello() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    session = ClientSession(
        MeasurementPolicy(mrenclaves=frozenset({bytes(32)})),
        _NoVerifier(),
        ClientCredential.self_signed(key, "nobody"),
    )
    return session.data_to_send()


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def flood(
    path: str, mode: str, target: str, count: int, deadline: float
) -> tuple[int, list[socket.socket]]:
    """Send the mode's units, _BATCH at a time, until ``count`` are in.

    One connection while hostd keeps reading it; when hostd drops it, a new
    one (session ids start again there). Returns the count and the
    connection still open."""
    hello = client_hello() if mode == "hello" else b""
    ping = frames.encode(frames.Frame.control({"op": "ping", "id": 1}))

    def unit(sid: int) -> bytes:
        if mode == "hello":
            return frames.encode(frames.Frame.open(sid, target)) + frames.encode(
                frames.Frame.data(sid, hello)
            )
        if mode == "opens":
            return frames.encode(frames.Frame.open(sid, target))
        if mode == "pings":
            return ping
        raise SystemExit(f"unknown mode {mode!r}")

    sent = 0
    sid = 0
    s: socket.socket | None = None
    while sent < count and time.monotonic() < deadline:
        if s is None:
            try:
                s = connect(path)
            except OSError:
                time.sleep(0.001)
                continue
            sid = 0
        n = min(_BATCH, count - sent)
        batch = b"".join(unit(i) for i in range(sid + 1, sid + n + 1))
        try:
            s.sendall(batch)
        except OSError:
            s.close()
            s = None
            continue
        sent += len(batch) if mode == "pings" else n
        sid += n
    return sent, [s] if s is not None else []


def spread(path: str, target: str, count: int, deadline: float) -> tuple[int, list[socket.socket]]:
    hello = frames.encode(frames.Frame.open(1, target)) + frames.encode(
        frames.Frame.data(1, client_hello())
    )
    held = []
    while len(held) < count and time.monotonic() < deadline:
        s = connect(path)
        try:
            s.sendall(hello)
        except OSError:
            s.close()
            continue
        held.append(s)
    return len(held), held


def main(argv: list[str]) -> int:
    path, mode, target, count, seconds = argv
    deadline = time.monotonic() + float(seconds)
    if mode == "spread":
        sent, held = spread(path, target, int(count), deadline)
    else:
        sent, held = flood(path, mode, target, int(count), deadline)
    print(f"sent {sent}", flush=True)
    sys.stdin.read()  # hold until the test lets go
    for s in held:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
