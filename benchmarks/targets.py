"""Section 1: per-command latency on the four targets, with the same client.

(a) libtpms in the worker process, (b) Debian's swtpm over a persistent data
connection, (c) sgxvtpm through ``vm serve --swtpm`` (same kind of
connection), (d) sgxvtpm through the in-process K2 client.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.context import Context
from benchmarks.procs import run_worker
from benchmarks.swtpm import Swtpm

LABELS = {
    "a": "libtpms in-process",
    "b": "swtpm (unix socket)",
    "c": "sgxvtpm vm serve --swtpm",
    "d": "sgxvtpm K2 in-process",
}


def _latency(
    ctx: Context, target: dict[str, Any], pids: dict[str, int] | None = None
) -> dict[str, Any]:
    """Latency of every command, then where a GetRandom's time goes (CPU per process)."""
    result = run_worker({"job": "latency", "target": target, "cheap": ctx.config.cheap_iterations})
    if result.get("ok"):
        cpu = run_worker(
            {"job": "cpu", "target": target, "pids": pids or {}, "n": ctx.config.cpu_commands}
        )
        if cpu.get("ok"):
            result["cpu"] = cpu
    return result


def _unavailable(reason: str) -> dict[str, Any]:
    return {"ok": False, "reason": f"not available: {reason}"}


def target_a(ctx: Context) -> dict[str, Any]:
    return _latency(ctx, {"kind": "engine"})


def target_b(ctx: Context) -> dict[str, Any]:
    tpm = Swtpm(ctx.workdir / "latency-swtpm")
    try:
        tpm.wait_answering()
        return _latency(ctx, {"kind": "socket", "path": str(tpm.path)}, {"swtpm": tpm.pid})
    finally:
        tpm.close()


def target_c(ctx: Context) -> dict[str, Any]:
    if ctx.sgx_reason:
        return _unavailable(ctx.sgx_reason)
    if ctx.serve_reason:
        return _unavailable(ctx.serve_reason)
    try:
        ctx.grow_vms_to(1)
        fleet = ctx.fleet()
        path = fleet.serve(ctx.vm_names[0])
    except Exception as exc:
        return _unavailable(f"{type(exc).__name__}: {exc}")
    try:
        name = ctx.vm_names[0]
        pids = {
            "vm serve": fleet.serve_pid(name),
            "hostd": fleet.hostd_pid,
            "instance": fleet.vms[name].pid,
        }
        return _latency(ctx, {"kind": "socket", "path": str(path)}, pids)
    finally:
        fleet.stop_serve(ctx.vm_names[0])


def target_d(ctx: Context) -> dict[str, Any]:
    if ctx.sgx_reason:
        return _unavailable(ctx.sgx_reason)
    try:
        ctx.grow_vms_to(1)
        fleet = ctx.fleet()
    except Exception as exc:
        return _unavailable(f"{type(exc).__name__}: {exc}")
    name = ctx.vm_names[0]
    pids = {"hostd": fleet.hostd_pid, "instance": fleet.vms[name].pid}
    return _latency(ctx, fleet.k2_target(name), pids)


def merge_passes(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several passes on a target: the median of their medians and p99s.

    The machine's load drifts during a run (other users, the scheduler
    placing client and server on one core or on two); running the targets
    forwards, backwards, forwards (a b c d d c b a a b c d) gives every
    target the same share of early and late minutes, and the median of the
    passes drops one unlucky pass.
    """
    good = [p for p in passes if p.get("ok")]
    if not good:
        return passes[0]
    commands: dict[str, dict[str, float]] = {}
    for name in good[0]["commands"]:
        entries = [p["commands"][name] for p in good if name in p["commands"]]
        commands[name] = {
            "n": sum(e["n"] for e in entries),
            "median_us": statistics.median(e["median_us"] for e in entries),
            "p99_us": statistics.median(e["p99_us"] for e in entries),
        }
    merged: dict[str, Any] = {"ok": True, "commands": commands, "passes": len(good)}
    cpus = [p["cpu"] for p in good if "cpu" in p]
    if cpus:
        merged["cpu"] = {
            "wall_us": statistics.median(c["wall_us"] for c in cpus),
            **{
                key: {
                    name: statistics.median(c[key][name] for c in cpus if name in c.get(key, {}))
                    for name in cpus[0].get(key, {})
                }
                for key in ("cpu_us", "user_us")
            },
        }
    return merged


def run(ctx: Context) -> dict[str, Any]:
    fns = {"a": target_a, "b": target_b, "c": target_c, "d": target_d}
    forwards, backwards = list(fns), list(reversed(fns))
    order: list[str] = []
    for i in range(ctx.config.latency_passes):
        order += backwards if i % 2 else forwards
    passes: dict[str, list[dict[str, Any]]] = {key: [] for key in fns}
    for key in order:
        if passes[key] and not passes[key][-1].get("ok"):
            continue  # unavailable or broken: once is enough to say why
        passes[key].append(fns[key](ctx))
    out: dict[str, Any] = {}
    for key in fns:
        out[key] = {**merge_passes(passes[key]), "label": LABELS[key]}
    return out
