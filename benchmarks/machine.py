"""The machine a run measured: CPU, cores, memory, kernel, and software versions."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path


def _first(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return "unknown"


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "unknown"


def _package_version(name: str) -> str:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True, text=True, check=False
    )
    return proc.stdout.strip() or "unknown"


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
    )
    return proc.stdout.strip()


def _git_commit(root: Path) -> str:
    commit = _git(root, "rev-parse", "--short", "HEAD") or "unknown"
    if _git(root, "status", "--porcelain", "--", "src", "benchmarks"):
        commit += " + uncommitted changes"
    return commit


def load_average() -> str:
    """1, 5 and 15 minute load averages: other users of the machine show up here."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def describe(root: Path) -> dict[str, str]:
    mem_kib = _first("/proc/meminfo", "MemTotal").split()[0]
    mem = f"{int(mem_kib) / 1024 / 1024:.1f} GiB" if mem_kib.isdigit() else "unknown"
    return {
        "cpu": _first("/proc/cpuinfo", "model name"),
        "cores": str(os.cpu_count() or "unknown"),
        "memory": mem,
        "kernel": platform.release(),
        "os": _os_release(),
        "python": sys.version.split()[0],
        "libtpms": _package_version("libtpms0"),
        "swtpm": _package_version("swtpm"),
        "sgxvtpm commit": _git_commit(root),
        "load average at start": load_average(),
    }
