"""The QEMU guest helpers for tests; they live in the package (``sgxvtpm._demo.guest``)."""

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
]
