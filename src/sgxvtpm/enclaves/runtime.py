"""What the manager enclave runs around its own logic: one stream, many attested sessions.

The stream is the enclave's only way in or out (the loader's socketpair);
over it the relay frames carry TLS records (sgxvtpm.mux.aio.RelayMux).
The enclave provides a session factory (its credential and whom it trusts,
given the relay's label of the opener: only a hint, from the host)
and a request handler; the runtime answers each authenticated request
message with one reply message, in order within a session. Sessions are
served concurrently (asyncio); the manager serialises its requests itself.
An instance enclave runs :mod:`sgxvtpm.enclaves.loop` instead (no asyncio,
one request at a time, handed-off client connections).
:func:`platform_verifier` serves both.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from sgxvtpm.channel import PeerCertificate, ServerSession
from sgxvtpm.mux.aio import AsyncSession, RelayMux
from sgxvtpm.platform.base import EnclavePlatform, QuoteVerifier
from sgxvtpm.util import log

RequestHandler = Callable[[PeerCertificate, bytes], Awaitable[bytes]]


def platform_verifier(platform: EnclavePlatform, args: Mapping[str, Any]) -> QuoteVerifier:
    """The quote verifier an enclave uses for its peers: its own platform's.

    The attestation root comes from the platform the enclave runs on
    (base.EnclavePlatform.quote_verifier), never from ``args``: those are the
    host's launch arguments, and the host is untrusted.
    """
    del args
    return platform.quote_verifier()


class EnclaveRuntime:
    def __init__(
        self,
        stream: socket.socket,
        session_factory: Callable[[str], ServerSession],
        handler: RequestHandler,
    ) -> None:
        self._stream = stream
        self._factory = session_factory
        self._handler = handler
        self.mux: RelayMux | None = None
        self.stop = asyncio.Event()

    async def run(
        self, after_start: Callable[[RelayMux], Coroutine[Any, Any, None]] | None = None
    ) -> None:
        """Serve until the host closes the stream (or ``stop`` is set)."""
        self._stream.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=self._stream)
        mux = RelayMux(reader, writer, session_factory=self._new, handler=self._serve)
        self.mux = mux
        runner = asyncio.create_task(mux.run())
        stopper = asyncio.create_task(self.stop.wait())
        # The start-up work (the manager relaunching every instance) runs
        # beside the stream, not before it: if hostd goes away meanwhile, the
        # enclave ends now, instead of waiting out a call timeout per instance
        # while it holds its state directory against its replacement.
        starter: asyncio.Task[None] | None = None
        waited: set[asyncio.Task[Any]] = {runner, stopper}
        if after_start is not None:
            starter = asyncio.create_task(after_start(mux))
            waited.add(starter)
        while True:
            done, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            if starter in done:
                waited.discard(starter)
                starter.result()  # start-up failures end the enclave, as before
                continue
            break
        for task in (stopper, starter):
            if task is not None and not task.done():
                task.cancel()
        await mux.aclose()

    def _new(self, source: str) -> ServerSession | None:
        try:
            return self._factory(source)
        except Exception as exc:  # a broken enclave state must not kill the loop
            log.log("enclave.session_refused", source=source, reason=str(exc))
            return None

    async def _serve(self, session: AsyncSession) -> None:
        peer = session.peer
        if not isinstance(peer, PeerCertificate):
            return
        while True:
            request = await session.recv()
            try:
                reply = await self._handler(peer, request)
            except PermissionError:
                log.log("enclave.request_refused", peer=peer.spki_sha256.hex()[:16])
                return
            await session.send(reply)
