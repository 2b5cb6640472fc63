"""The C heap of a long-lived process (glibc malloc): give back what is free.

Two habits of glibc keep freed memory from the host. ``free`` returns pages
in the middle of the heap only on ``malloc_trim``; and its mmap threshold
adapts: once a large block (a launch message is ~1.5 MB) has been freed,
blocks up to that size come from the heap instead of their own mapping, so
every later launch leaves its message's pages in the process after it is
freed. :func:`keep_large_blocks_mapped` pins the threshold at glibc's
default (128 KiB), so each large block is unmapped when it is freed.
Elsewhere than glibc both are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's default, which setting it keeps fixed


def release_free_memory() -> None:
    """Return the heap's free pages to the host (``malloc_trim(0)``)."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)


def keep_large_blocks_mapped() -> bool:
    """Fix the mmap threshold for this process (and the children it forks).

    True if the C library took it.
    """
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return False
