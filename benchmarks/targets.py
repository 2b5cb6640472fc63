"""Section 1: per-command latency on the four targets, with the same client.

(a) libtpms in the worker process, (b) Debian's swtpm over a persistent data
connection, (c) sgxvtpm through ``vm serve --swtpm`` (same kind of
connection), (d) sgxvtpm through the in-process K2 client.
"""

from __future__ import annotations

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


def _latency(ctx: Context, target: dict[str, Any]) -> dict[str, Any]:
    return run_worker({"job": "latency", "target": target, "cheap": ctx.config.cheap_iterations})


def _unavailable(reason: str) -> dict[str, Any]:
    return {"ok": False, "reason": f"not available: {reason}"}


def target_a(ctx: Context) -> dict[str, Any]:
    return _latency(ctx, {"kind": "engine"})


def target_b(ctx: Context) -> dict[str, Any]:
    tpm = Swtpm(ctx.workdir / "latency-swtpm")
    try:
        tpm.wait_answering()
        return _latency(ctx, {"kind": "socket", "path": str(tpm.path)})
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
        return _latency(ctx, {"kind": "socket", "path": str(path)})
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
    return _latency(
        ctx, {"kind": "k2", "state_dir": str(fleet.state.root), "name": ctx.vm_names[0]}
    )


def run(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, fn in (("a", target_a), ("b", target_b), ("c", target_c), ("d", target_d)):
        result = fn(ctx)
        result["label"] = LABELS[key]
        out[key] = result
    return out
