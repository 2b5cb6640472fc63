"""Start and stop a real hostd (the SGX module) for integration tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sgxvtpm.host.statedir import StateDir
from sgxvtpm.wire import relay as frames


class Hostd:
    def __init__(self, state_dir: Path) -> None:
        self.state = StateDir(state_dir)
        self.log_path = state_dir.parent / f"{state_dir.name}-hostd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept for the process's life
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sgxvtpm.cli", "hostd", "--state-dir", str(self.state.root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_ready(self.state.socket, timeout, self.proc)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)

    def kill(self) -> None:
        """kill -9 hostd and everything it started (its process group)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_ready(sock: Path, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until hostd answers and its manager has restored every instance."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"hostd exited with {proc.returncode}")
        if sock.exists():
            try:
                reply = asyncio.run(_control(sock, {"op": "wait_ready"}))
                if reply.get("ok"):
                    return
            except (OSError, TimeoutError, ConnectionError):
                pass
        time.sleep(0.05)
    raise TimeoutError(f"hostd at {sock} not ready after {timeout}s")


async def _control(sock: Path, request: dict[str, object]) -> dict[str, object]:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(frames.encode(frames.Frame.control({**request, "id": 1})))
        await writer.drain()
        decoder = frames.RelayDecoder()
        while True:
            data = await asyncio.wait_for(reader.read(65536), 60)
            if not data:
                raise ConnectionError("hostd closed the connection")
            decoder.receive_data(data)
            frame = decoder.next_frame()
            if frame is not None:
                return frame.control_object()
    finally:
        writer.close()


@contextmanager
def running_hostd(state_dir: Path) -> Iterator[Hostd]:
    hostd = Hostd(state_dir)
    hostd.start()
    try:
        yield hostd
    finally:
        if hostd.proc is not None and hostd.proc.poll() is None:
            hostd.stop()
