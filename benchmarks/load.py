"""Section 4: aggregate commands per second with 1, 8 and 32 VMs at once.

Each VM is one persistent data connection running a closed loop of
GetRandom(32) and PCR_Extend (the next command leaves when the previous
answer arrives). The connections are spread over two load workers (this
machine has two cores), which start together and count only the commands
answered during the measured seconds, after a warm-up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.context import Context
from benchmarks.procs import finish_worker, start_worker

WORKERS = 2
WARMUP_S = 0.5


def drive(paths: list[Path], seconds: float) -> dict[str, Any]:
    """Run the load on ``paths``; commands per second, or the reason it failed."""
    groups = [paths[i::WORKERS] for i in range(min(WORKERS, len(paths)))]
    start_at = time.time() + 1.0 + 0.05 * len(paths)  # workers import and connect first
    procs = [
        start_worker(
            {
                "job": "load",
                "paths": [str(p) for p in group],
                "duration": seconds,
                "warmup": WARMUP_S,
                "start_at": start_at,
            }
        )
        for group in groups
    ]
    results = [finish_worker(p, timeout=120 + seconds) for p in procs]
    failed = [r for r in results if not r.get("ok")]
    if failed:
        return {"ok": False, "reason": f"failed: {failed[0].get('reason')}"}
    completed = sum(int(r["completed"]) for r in results)
    return {"ok": True, "vms": len(paths), "commands_per_s": completed / seconds}


def swtpm_load(ctx: Context, n: int) -> dict[str, Any]:
    ctx.swtpm.grow_to(n)
    return drive([tpm.path for tpm in ctx.swtpm.procs[:n]], ctx.config.load_seconds)


def sgx_load(ctx: Context, n: int) -> dict[str, Any]:
    if ctx.sgx_reason:
        return {"ok": False, "reason": f"not available: {ctx.sgx_reason}"}
    if ctx.serve_reason:
        return {"ok": False, "reason": f"not available: {ctx.serve_reason}"}
    ctx.grow_vms_to(n)
    fleet = ctx.fleet()
    names = ctx.vm_names[:n]
    try:
        paths = [fleet.serve(name) for name in names]
        return drive(paths, ctx.config.load_seconds)
    finally:
        for name in names:
            fleet.stop_serve(name)


def run(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {"swtpm": {}, "sgxvtpm": {}}
    for n in ctx.config.load_vms:
        for key, fn in (("swtpm", swtpm_load), ("sgxvtpm", sgx_load)):
            try:
                out[key][str(n)] = fn(ctx, n)
            except Exception as exc:
                out[key][str(n)] = {"ok": False, "reason": f"failed: {type(exc).__name__}: {exc}"}
    return out
