"""Section 5: latency and memory as instances grow (1 -> 500 in the full run).

At each point: the median GetRandom(32) latency of the newest and of the
first instance (fresh worker, persistent connection for swtpm, K2 for
sgxvtpm), the memory per instance (all PSS / instances), and how long the
last instances took to create. At the end every instance is asked for
GetRandom(8): "all answering" is a count, not an assumption. The phase
stops early when its time budget is spent or an instance cannot be made,
and says so.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.context import Context
from benchmarks.procmem import memory, total_pss_kib
from benchmarks.procs import descendants, run_worker

PROBE_COMMANDS = 50


def _probe(target: dict[str, Any]) -> float | None:
    result = run_worker({"job": "probe", "target": target, "n": PROBE_COMMANDS}, timeout=120)
    return float(result["median_us"]) if result.get("ok") else None


def _grow_points(points: tuple[int, ...], existing: int) -> list[int]:
    """The points still ahead, starting with what already exists (if anything does)."""
    ahead = sorted(p for p in set(points) if p > existing)
    return [existing, *ahead] if existing else ahead


def swtpm_scale(ctx: Context) -> dict[str, Any]:
    pool = ctx.swtpm
    pool.close()  # swtpm instances are cheap to start: grow from one
    deadline = time.monotonic() + ctx.config.scale_budget_s
    rows: list[dict[str, Any]] = []
    stopped = ""
    for point in _grow_points(ctx.config.scale_points, 0):
        start_s = 0.0
        try:
            while len(pool.procs) < point:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"time budget ({ctx.config.scale_budget_s:.0f}s) spent")
                start_s = pool.grow_to(min(point, len(pool.procs) + 10))
        except Exception as exc:
            stopped = f"stopped at {len(pool.procs)} instances: {exc}"
        n = len(pool.procs)
        if n == 0:
            break
        rows.append(
            {
                "instances": n,
                "newest_us": _probe({"kind": "socket", "path": str(pool.procs[-1].path)}),
                "first_us": _probe({"kind": "socket", "path": str(pool.procs[0].path)}),
                "pss_per_instance_kib": total_pss_kib(pool.pids()) / n,
                "create_ms": start_s * 1000,
            }
        )
        if stopped:
            break
    answering = run_worker(
        {
            "job": "ping_all",
            "targets": [{"kind": "socket", "path": str(t.path)} for t in pool.procs],
        },
        timeout=600,
    )
    return {"ok": True, "rows": rows, "stopped": stopped, "answering": answering}


def sgx_scale(ctx: Context) -> dict[str, Any]:
    if ctx.sgx_reason:
        return {"ok": False, "reason": f"not available: {ctx.sgx_reason}"}
    fleet = ctx.fleet()
    deadline = time.monotonic() + ctx.config.scale_budget_s
    rows: list[dict[str, Any]] = []
    stopped = ""

    def k2(name: str) -> dict[str, Any]:
        return fleet.k2_target(name)

    for point in _grow_points(ctx.config.scale_points, len(ctx.vm_names)):
        before = len(ctx.create_seconds)
        try:
            ctx.grow_vms_to(point, deadline)
        except Exception as exc:
            stopped = f"stopped at {len(ctx.vm_names)} instances: {type(exc).__name__}: {exc}"
        n = len(ctx.vm_names)
        if n == 0:
            break
        recent = ctx.create_seconds[before:] or ctx.create_seconds[-1:]
        tree = [fleet.hostd_pid, *descendants(fleet.hostd_pid)]
        pids = [fleet.vms[name].pid for name in ctx.vm_names]
        rows.append(
            {
                "instances": n,
                "newest_us": _probe(k2(ctx.vm_names[-1])),
                "first_us": _probe(k2(ctx.vm_names[0])),
                "pss_per_instance_kib": total_pss_kib(tree) / n,
                "instance_pss_kib": statistics.median(memory(p).pss_kib for p in pids),
                "create_ms": statistics.median(recent) * 1000 if recent else 0.0,
            }
        )
        if stopped:
            break
    answering = run_worker(
        {"job": "ping_all", "targets": [k2(name) for name in ctx.vm_names]}, timeout=900
    )
    return {"ok": True, "rows": rows, "stopped": stopped, "answering": answering}


def run(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        out["swtpm"] = swtpm_scale(ctx)
    except Exception as exc:
        out["swtpm"] = {"ok": False, "reason": f"failed: {type(exc).__name__}: {exc}"}
    ctx.swtpm.close()  # 500 idle swtpm processes need not sit beside sgxvtpm's
    try:
        out["sgxvtpm"] = sgx_scale(ctx)
    except Exception as exc:
        out["sgxvtpm"] = {"ok": False, "reason": f"failed: {type(exc).__name__}: {exc}"}
    return out
