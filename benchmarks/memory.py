"""Section 3: idle memory per instance once N instances exist (PSS).

swtpm: the PSS of each idle swtpm process (it is all there is of a swtpm
instance). sgxvtpm: the PSS of each idle instance enclave process (pid from
the VMM), and, for the whole picture, everything under hostd (hostd, the
zygote, the manager and all instances) divided by N.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.context import Context
from benchmarks.procmem import memory, total_pss_kib
from benchmarks.procs import descendants


def swtpm_memory(ctx: Context, n: int) -> dict[str, Any]:
    ctx.swtpm.grow_to(n)
    readings = [memory(pid) for pid in ctx.swtpm.pids()[:n]]
    return {
        "ok": True,
        "instances": n,
        "pss_kib": statistics.median(m.pss_kib for m in readings),
        "rss_kib": statistics.median(m.rss_kib for m in readings),
        "private_dirty_kib": statistics.median(m.private_dirty_kib for m in readings),
    }


def sgx_memory(ctx: Context, n: int) -> dict[str, Any]:
    if ctx.sgx_reason:
        return {"ok": False, "reason": f"not available: {ctx.sgx_reason}"}
    ctx.grow_vms_to(n)
    fleet = ctx.fleet()
    pids = [fleet.vms[name].pid for name in ctx.vm_names]
    readings = [memory(pid) for pid in pids]
    tree = [fleet.hostd_pid, *descendants(fleet.hostd_pid)]
    return {
        "ok": True,
        "instances": len(pids),
        "pss_kib": statistics.median(m.pss_kib for m in readings),
        "rss_kib": statistics.median(m.rss_kib for m in readings),
        "private_dirty_kib": statistics.median(m.private_dirty_kib for m in readings),
        "tree_pss_per_instance_kib": total_pss_kib(tree) / len(pids),
        "hostd_pss_kib": memory(fleet.hostd_pid).pss_kib,
    }


def run(ctx: Context) -> dict[str, Any]:
    n = ctx.config.memory_instances
    out: dict[str, Any] = {}
    for key, fn in (("swtpm", swtpm_memory), ("sgxvtpm", sgx_memory)):
        try:
            out[key] = fn(ctx, n)
        except Exception as exc:
            out[key] = {"ok": False, "reason": f"failed: {type(exc).__name__}: {exc}"}
    return out
