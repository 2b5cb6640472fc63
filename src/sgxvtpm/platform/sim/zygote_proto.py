"""Messages between the loader and its zygote, over a unix stream socket.

A message is: u32 header length, u32 blob length (big-endian), a JSON header,
then the blob. File descriptors travel as SCM_RIGHTS with the first 8 bytes.
Launch args are JSON; ``bytes`` values are tagged as {"$bytes": hex}.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.platform.base import PlatformError
from sgxvtpm.platform.sim.measure import CodeFile

_PREFIX = struct.Struct(">II")
MAX_FDS = 4


class ZygoteGone(SgxvtpmError):
    """The other end closed the control socket (the zygote or loader died).

    No enclave can be launched on this loader any more: restart hostd.
    """


def send_message(
    sock: socket.socket,
    header: dict[str, Any],
    blob: bytes | bytearray = b"",
    fds: list[int] | None = None,
) -> None:
    head = json.dumps(header, default=_encode).encode()
    prefix = _PREFIX.pack(len(head), len(blob))
    try:
        socket.send_fds(sock, [prefix], fds or [])
        sock.sendall(head)
        if blob:
            sock.sendall(blob)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise ZygoteGone(str(exc)) from exc


# An enclave's ENCLU requests are small (a key request, 64 bytes of report
# data, a counter name): a bound keeps a compromised enclave from making the
# CPU allocate what it announces. Launches carry the code (~1.5 MB) and come
# from the loader only.
ENCLU_MAX = 64 * 1024
LAUNCH_MAX = 256 * 1024 * 1024


def recv_message(
    sock: socket.socket, max_size: int = LAUNCH_MAX
) -> tuple[dict[str, Any], bytearray, list[int]]:
    """One message; ZygoteGone when the peer closed or announced more than ``max_size``."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, _PREFIX.size, MAX_FDS)
    except ConnectionResetError as exc:
        raise ZygoteGone(str(exc)) from exc
    if not data:
        raise ZygoteGone("control socket closed")
    data += _recv_exactly(sock, _PREFIX.size - len(data))
    head_len, blob_len = _PREFIX.unpack(data)
    if head_len + blob_len > max_size:
        for fd in fds:
            os.close(fd)
        raise ZygoteGone(f"message of {head_len + blob_len} bytes exceeds {max_size}")
    try:
        header = json.loads(_recv_exactly(sock, head_len), object_hook=_decode)
    except ValueError as exc:
        raise ZygoteGone(f"malformed message header: {exc}") from None
    if not isinstance(header, dict):
        raise ZygoteGone("malformed message header")
    return header, _recv_exactly(sock, blob_len), list(fds)


def _recv_exactly(sock: socket.socket, n: int) -> bytearray:
    # One buffer, filled in place: a launch carries ~1.5 MB of code, and a
    # bytearray lets the enclave process free it once measured (see zygote).
    buf = bytearray(n)
    with memoryview(buf) as view:
        got = 0
        while got < n:
            try:
                k = sock.recv_into(view[got:], min(n - got, 1 << 20))
            except ConnectionResetError as exc:
                raise ZygoteGone(str(exc)) from exc
            if not k:
                raise ZygoteGone("control socket closed mid-message")
            got += k
    return buf


def _encode(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": bytes(value).hex()}
    raise TypeError(f"enclave launch data must be JSON or bytes, not {type(value).__name__}")


def _decode(obj: dict[str, Any]) -> Any:
    if obj.keys() == {"$bytes"}:
        return bytes.fromhex(obj["$bytes"])
    return obj


def wait_readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` becomes readable within ``timeout`` seconds.

    poll(2), not select(2): hostd holds far more than FD_SETSIZE (1024)
    descriptors once a few hundred instances run.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


#: How long a started helper process (the sim CPU, the zygote) has to say it is ready.
READY_TIMEOUT = 60.0


def first_message(sock: socket.socket, what: str, cleanup: Callable[[], None]) -> dict[str, Any]:
    """The header of the first message a process just started sends on ``sock``;
    PlatformError naming ``what``, after ``cleanup()``, if none comes in time."""
    if not wait_readable(sock.fileno(), READY_TIMEOUT):
        cleanup()
        raise PlatformError(f"{what} did not start in time")
    try:
        header, _, _ = recv_message(sock)
    except ZygoteGone as exc:
        cleanup()
        raise PlatformError(f"{what} failed to start (see its stderr)") from exc
    return header


def unpack_code(header: Mapping[str, Any], blob: bytes | bytearray) -> tuple[list[CodeFile], bytes]:
    """The launch blob is the config, then each file's bytes in the header's order."""
    offset = int(header["config_len"])
    with memoryview(blob) as view:
        config = bytes(view[:offset])
        code = []
        for name, path, size in header["files"]:
            code.append(CodeFile(str(name), Path(path), bytes(view[offset : offset + int(size)])))
            offset += int(size)
    if offset != len(blob):
        raise ValueError("launch blob length does not match its file list")
    return code, config
