"""Test kit for the TPM engine: a LibtpmsEngine in a child process, and swtpm.

libtpms holds one TPM per process, so tests never start an engine in the
pytest process: :class:`EngineProcess` runs ``tpm_engine_server.py`` and
forwards calls to it; :class:`Swtpm` runs Debian's swtpm for golden
comparisons.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

SERVER = Path(__file__).with_name("tpm_engine_server.py")


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
        argv = [sys.executable, str(SERVER)]
        if state_dir is not None:
            argv.append(str(state_dir))
        self.timeout = timeout
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

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
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
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


def swtpm_available() -> bool:
    return shutil.which("swtpm") is not None


class Swtpm:
    """Debian's swtpm (TPM 2.0) on unix sockets, started fresh in ``directory``.

    ``--flags not-need-init,startup-clear``: commands work at once and swtpm
    has sent TPM2_Startup(CLEAR) itself.
    """

    def __init__(self, directory: Path) -> None:
        self.data_path = directory / "data.sock"
        self.ctrl_path = directory / "ctrl.sock"
        state = directory / "state"
        state.mkdir()
        self.proc = subprocess.Popen(
            [
                "swtpm", "socket", "--tpm2",
                "--server", f"type=unixio,path={self.data_path}",
                "--ctrl", f"type=unixio,path={self.ctrl_path}",
                "--tpmstate", f"dir={state}",
                "--flags", "not-need-init,startup-clear",
                "--log", f"file={directory / 'swtpm.log'}",
            ],
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.data_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("swtpm did not start")
            time.sleep(0.01)
        self.sock = self.connect()

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(self.data_path))
        return s

    def reconnect(self) -> None:
        self.sock.close()
        self.sock = self.connect()

    def read_response(self, timeout: float = 5.0) -> bytes | None:
        """One response (header, then its size); None if swtpm sent nothing."""
        self.sock.settimeout(timeout)
        try:
            header = self._recv_exact(10)
        except (TimeoutError, EOFError):
            return None
        size = struct.unpack(">I", header[2:6])[0]
        return header + self._recv_exact(size - 10)

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def transact(self, command: bytes) -> bytes:
        self.sock.sendall(command)
        response = self.read_response()
        if response is None:
            raise TimeoutError("swtpm did not answer")
        return response

    def close(self) -> None:
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
