"""Memory of a process as the kernel accounts it (/proc/PID/smaps_rollup).

PSS (proportional set size) charges each shared page to its sharers in equal
parts, so the PSS of N processes adds up to what they really occupy: the
figure to compare per instance. RSS counts shared pages in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Memory:
    pss_kib: int
    rss_kib: int
    private_dirty_kib: int = 0  # pages only this process holds, written since fork


def parse_smaps_rollup(text: str) -> Memory:
    """Pss, Rss and Private_Dirty (kB) of a smaps_rollup text; ValueError if Pss or
    Rss is missing."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Rss", "Private_Dirty"):
            values[key] = int(rest.split()[0])
    if "Pss" not in values or "Rss" not in values:
        raise ValueError("smaps_rollup without Pss/Rss lines")
    return Memory(
        pss_kib=values["Pss"],
        rss_kib=values["Rss"],
        private_dirty_kib=values.get("Private_Dirty", 0),
    )


def memory(pid: int) -> Memory:
    return parse_smaps_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())


def total_pss_kib(pids: list[int]) -> int:
    """PSS summed over ``pids``; a process that exited since it was listed counts 0."""
    total = 0
    for pid in pids:
        try:
            total += memory(pid).pss_kib
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total
