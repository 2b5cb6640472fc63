"""sgxvtpm.util.heap: a long-lived process gives the pages of large freed blocks
back (the sim CPU and the zygote, which each receive ~1.5 MB launch messages)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

_LAUNCHES = """
import os, sys
from sgxvtpm.util import heap
if sys.argv[1] == "fixed":
    assert heap.keep_large_blocks_mapped()
def resident_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
before = resident_kib()
for _ in range(3):  # three launch messages, each received whole, then dropped
    message = bytearray(3_000_000)
    del message
print(resident_kib() - before)
"""


def _kept_kib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHES, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_large_freed_blocks_leave_the_process_once_the_threshold_is_fixed() -> None:
    # glibc's adaptive threshold keeps the second message's 3 MB in the heap...
    assert _kept_kib("adaptive") > 2000
    # ...unless the threshold is fixed: every message is its own mapping, unmapped on free.
    assert _kept_kib("fixed") < 500
