"""Running benchmark workers (``python -m benchmarks.worker``) and finding processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def worker_argv(config: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "benchmarks.worker", json.dumps(config)]


def parse_worker_output(stdout: str, stderr: str, returncode: int) -> dict[str, Any]:
    """The worker's last stdout line as JSON, or a failure saying what went wrong."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if lines:
        try:
            result: dict[str, Any] = json.loads(lines[-1])
            return result
        except ValueError:
            pass
    tail = stderr.strip().splitlines()[-1:] or [f"exit status {returncode}"]
    return {"ok": False, "reason": f"worker failed: {tail[0]}"}


def run_worker(config: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Run one job in a fresh worker process from the repository root."""
    try:
        proc = subprocess.run(
            worker_argv(config),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"worker timed out after {timeout:.0f}s"}
    return parse_worker_output(proc.stdout, proc.stderr, proc.returncode)


def start_worker(config: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        worker_argv(config), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_worker(proc: subprocess.Popen[str], timeout: float = 600) -> dict[str, Any]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"ok": False, "reason": f"worker timed out after {timeout:.0f}s"}
    return parse_worker_output(stdout, stderr, proc.returncode)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc/*/stat's ppid field)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out
