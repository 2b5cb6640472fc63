"""Test kit for the TPM engine: a LibtpmsEngine in a child process.

libtpms holds one TPM per process, so tests never start an engine in the
pytest process: :class:`EngineProcess` runs ``tpm_engine_server.py`` and
forwards calls to it. Debian's swtpm, the golden peer, is tests/helpers/swtpm.py.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import struct
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.helpers.processes import helper_command, helper_env, stop_process


class RemoteError(Exception):
    """The child raised ``type_name`` (and its cause, if any)."""

    def __init__(self, type_name: str, message: str, cause: str | None) -> None:
        self.type_name = type_name
        self.cause = cause
        super().__init__(f"{type_name}: {message} (cause: {cause})")


class ChildDied(Exception):
    """The engine process exited (crash) while a call was outstanding."""


class EngineProcess:
    """A LibtpmsEngine in its own process; ``call(op, *args)`` runs an op there."""

    def __init__(self, state_dir: Path | None = None, timeout: float = 60.0) -> None:
        argv = helper_command("tpm_engine_server", *([str(state_dir)] if state_dir else []))
        self.timeout = timeout
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=helper_env()
        )

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _read(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        data = b""
        deadline = time.monotonic() + self.timeout
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"engine process did not answer within {self.timeout}s")
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise ChildDied(f"engine process exited with {self.proc.wait()}")
            data += chunk
        return data

    def call(self, op: str, *args: Any) -> Any:
        assert self.proc.stdin is not None
        msg = pickle.dumps((op, args))
        try:
            self.proc.stdin.write(struct.pack(">I", len(msg)) + msg)
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise ChildDied(f"engine process exited with {self.proc.wait()}") from exc
        (length,) = struct.unpack(">I", self._read(4))
        reply = pickle.loads(self._read(length))
        if reply[0] == "err":
            raise RemoteError(*reply[1:])
        return reply[1]

    def process(self, command: bytes, locality: int = 0) -> bytes:
        response: bytes = self.call("process", command, locality)
        return response

    def close(self) -> int:
        """End the child (EOF on stdin); returns its exit code."""
        if self.proc.stdin and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            return stop_process(self.proc, sig=None)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()


def started_engine(state_dir: Path | None = None) -> EngineProcess:
    """An EngineProcess with the engine started and TPM2_Startup(CLEAR) done."""
    from sgxvtpm.tpm import wire

    ep = EngineProcess(state_dir)
    ep.call("start")
    wire.check_success(ep.process(wire.startup()))
    return ep
