"""A standalone relay process for the integration tests, and an enclave's serving loop.

``python tests/helpers/relay_process.py --listen PATH [--capture FILE]`` runs
hostd's switch (:class:`sgxvtpm.host.switch.Relay`) alone on a unix socket:
any connection may register itself as a target with CONTROL
{"op": "register", "name": ...}. That is safe because the relay is untrusted
anyway: a fake "manager" fails the client's quote check. With ``--capture``
it appends every byte it reads to FILE, so a test can look for plaintext.

:func:`serve_sessions` is what an enclave does on its stream, without the
enclave around it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from sgxvtpm.host.switch import Connection, Relay
from sgxvtpm.mux.aio import RelayMux, SessionFactory, SessionHandler


async def serve_sessions(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    session_factory: SessionFactory,
    handler: SessionHandler,
) -> None:
    """Inside an enclave: serve every session the relay opens on this stream.

    ``session_factory(source_label)`` returns a fresh :class:`ServerSession`
    (or None to refuse); ``handler`` runs per session after the client is
    authenticated, and the session is closed when it returns.
    """
    mux = RelayMux(reader, writer, session_factory=session_factory, handler=handler)
    try:
        await mux.run()
    finally:
        await mux.aclose()



async def _standalone(path: str, capture: str | None) -> None:
    sink = open(capture, "ab", buffering=0) if capture else None  # noqa: SIM115

    def observe(data: bytes) -> None:
        assert sink is not None
        sink.write(data)

    relay: Relay

    async def on_control(conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("op") == "register" and isinstance(request.get("name"), str):
            try:
                relay.register(conn, request["name"])
            except ValueError as exc:
                return {"ok": False, "error": str(exc)}
            return {"ok": True}
        if request.get("op") == "ping":
            return {"ok": True}
        return {"ok": False, "error": "unknown op"}

    relay = Relay(on_control, observer=observe if sink else None)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await relay.serve(reader, writer, kind="client")

    server = await asyncio.start_unix_server(on_connect, path=path)
    os.chmod(path, 0o600)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()
    await relay.aclose()
    if sink is not None:
        sink.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay_process.py", description=__doc__)
    parser.add_argument("--listen", required=True, help="unix socket path to listen on")
    parser.add_argument("--capture", help="append every byte the relay reads to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_standalone(args.listen, args.capture))
    return 0


if __name__ == "__main__":
    sys.exit(main())
