"""A client for hostd's own CONTROL requests (``ping``, ``wait_ready``).

These are the only things hostd answers in the clear: liveness, never any
VM's data (everything else is an attested session it merely relays).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sgxvtpm.wire import control
from sgxvtpm.wire import relay as frames
from sgxvtpm.wire.jsonmsg import R, Refused, Request


async def hostd_control(sock: Path, request: Request[R], timeout: float = 60) -> R | Refused:
    """Send one CONTROL request (sgxvtpm/wire/control.py) to the hostd at ``sock``; its answer."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(frames.encode(frames.Frame.control(control.request_to_json(request))))
        await writer.drain()
        decoder = frames.RelayDecoder()
        while True:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                raise ConnectionError("hostd closed the connection")
            decoder.receive_data(data)
            frame = decoder.next_frame()
            if frame is not None:
                return control.reply_from_json(request, frame.control_object())
    finally:
        writer.close()
