"""Running an endpoint until SIGTERM/SIGINT, or until it ends itself, without an event loop.

The main thread waits in select(2) on a pipe. A pipe and not a
threading.Event: a Python signal handler runs in the main thread between
bytecodes and must not take a lock the main thread may hold (Event.wait
holds its condition's lock for a moment); and signal.set_wakeup_fd makes
the C-level handler write to the pipe, which wakes the select even when
the kernel delivers the signal to a connection thread.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from types import FrameType
from typing import Protocol

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """A one-way flag: :meth:`set` from any thread or signal handler, :meth:`wait` for it.

    Its pipe lives as long as the process (closing it could let a late
    set() write into a reused descriptor).
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._set = False

    @property
    def wakeup_fd(self) -> int:
        """For signal.set_wakeup_fd: a signal wakes :meth:`wait`, whose handler then sets."""
        return self._write

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        with contextlib.suppress(OSError):  # a full pipe is awake already
            os.write(self._write, b"\0")

    def wait(self, timeout: float | None = None) -> bool:
        """Until set (True) or ``timeout`` seconds passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            select.select([self._read], [], [], left)
            with contextlib.suppress(BlockingIOError):
                os.read(self._read, 4096)
        return True


class Servable(Protocol):
    @property
    def stopped(self) -> StopFlag: ...

    def serve_forever(self) -> None: ...

    def close(self) -> None: ...


def run_until_signal(endpoint: Servable) -> None:
    """Serve until SIGTERM/SIGINT or until ``endpoint`` stops itself, then close it.

    Call from the main thread (signal handlers can only be set there).
    """
    stopped = endpoint.stopped

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}
    old_wakeup = signal.set_wakeup_fd(stopped.wakeup_fd, warn_on_full_buffer=False)
    try:
        endpoint.serve_forever()
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        endpoint.close()
