"""Section 2: creating an instance with EK and platform certificates.

swtpm: ``swtpm_setup --tpm2 --create-ek-cert --create-platform-cert`` with
swtpm_localca (an RSA-2048 and an ECC P-256 EK, both certified, plus a
platform certificate), then ``swtpm socket`` started until it answers a
command: what libvirt does before a VM with a new vTPM boots.

sgxvtpm: the VMM call ``vm create`` (VmmClient.create: K1 session, instance
enclave launched, EKs made in it, certified by the manager's CA, sealed
state written), with the same two EKs and a platform certificate. Its
phases come from hostd's log. The command line's wall time (a new Python
interpreter included) is reported beside it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.context import Context
from benchmarks.sgx import creation_phases
from benchmarks.swtpm import LocalCa, Swtpm

CLI_RUNS = 3  # `sgxvtpm vm create` command lines timed (a new interpreter each)


def swtpm_creation(ctx: Context) -> dict[str, Any]:
    root = ctx.workdir / "creation-swtpm"
    ca = LocalCa(root)
    ca.setup(root / "warmup")  # the first run creates the local CA itself: not timed
    setup_s, start_s = [], []
    for i in range(ctx.config.creation_runs):
        state = root / f"tpm{i}"
        t0 = time.perf_counter()
        ca.setup(state)
        t1 = time.perf_counter()
        tpm = Swtpm(root / f"run{i}", state=state)
        try:
            tpm.wait_answering()
            t2 = time.perf_counter()
        finally:
            tpm.close()
        setup_s.append(t1 - t0)
        start_s.append(t2 - t1)
    total = [a + b for a, b in zip(setup_s, start_s, strict=True)]
    return {
        "ok": True,
        "runs": len(total),
        "median_ms": statistics.median(total) * 1000,
        "setup_ms": statistics.median(setup_s) * 1000,
        "start_ms": statistics.median(start_s) * 1000,
    }


def sgx_creation(ctx: Context) -> dict[str, Any]:
    if ctx.sgx_reason:
        return {"ok": False, "reason": f"not available: {ctx.sgx_reason}"}
    try:
        fleet = ctx.fleet()
        ctx.grow_vms_to(1)  # the first create after hostd start warms the zygote: not timed
        events_before = len(ctx.vm_names)
        ctx.grow_vms_to(events_before + ctx.config.creation_runs)
        timed = [fleet.vms[n] for n in ctx.vm_names[events_before:]]
        cli_s = []
        # One untimed run first, as for the VMM call: a machine may page out files
        # left idle (this one's DAMON reclaim does after ~1 min), and a first run
        # would then time reading its modules from disk.
        for _ in range(1 + CLI_RUNS):
            cli_name = f"cli{len(ctx.vm_names):03d}"
            cli_s.append(fleet.create_cli(cli_name))
            ctx.vm_names.append(cli_name)
    except Exception as exc:
        return {"ok": False, "reason": f"failed: {type(exc).__name__}: {exc}"}
    events = fleet.log_events()
    phases = [p for p in (creation_phases(events, vm) for vm in timed) if p is not None]
    result: dict[str, Any] = {
        "ok": True,
        "runs": len(timed),
        "median_ms": statistics.median(vm.seconds for vm in timed) * 1000,
        "cli_ms": statistics.median(cli_s[1:]) * 1000,
        "cli_runs": len(cli_s) - 1,
    }
    for key in ("launch_ms", "manufacture_ms", "registry_ms"):
        if phases:
            result[key] = statistics.median(p[key] for p in phases)
    return result


def run(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, fn in (("swtpm", swtpm_creation), ("sgxvtpm", sgx_creation)):
        try:
            out[key] = fn(ctx)
        except Exception as exc:
            out[key] = {"ok": False, "reason": f"failed: {type(exc).__name__}: {exc}"}
    return out
