"""The QEMU guest helpers for tests; they live in the package (``sgxvtpm._demo.guest``)."""

import time

from sgxvtpm._demo.guest import (
    MARKER,
    QEMU,
    BootResult,
    Guest,
    build_initramfs,
    kernel_path,
    missing_tools,
    parse_console,
    replay_event_log,
)

__all__ = [
    "MARKER",
    "QEMU",
    "BootResult",
    "Guest",
    "build_initramfs",
    "kernel_path",
    "missing_tools",
    "parse_console",
    "replay_event_log",
    "wait_loaded",
]


def wait_loaded(guest: Guest, timeout: float = 60.0) -> None:
    """Until QEMU has loaded its incoming state (it then waits paused)."""
    deadline = time.monotonic() + timeout
    while True:
        status = guest.monitor("info status")
        if "VM status: paused" in status and "inmigrate" not in status:
            return
        assert guest.proc.poll() is None, guest.console()[-2000:]
        assert time.monotonic() < deadline, "the incoming state did not load"
        time.sleep(0.2)
