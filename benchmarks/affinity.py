"""How CPU placement changes the latency of one command through ``vm serve``.

    .venv/bin/python -m benchmarks.affinity [--iterations 3000] [--rounds 2]

Also the ``placement`` section of ``make bench`` (:func:`run`), after the
other sections, on their hostd and swtpm processes.

Starts a hostd with one VM and ``vm serve --swtpm``, and a swtpm, then times
GetRandom(32) from this process over one persistent connection with the
client, the endpoint and the instance enclave (or swtpm) placed on the CPUs
of each row (all threads of each process, sched_setaffinity). Prints
medians. Needs two CPUs.
The other sections leave placement to the scheduler; this one pins, then
gives every process it pinned all CPUs back.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.context import Context
from benchmarks.sgx import Fleet
from benchmarks.swtpm import Swtpm
from benchmarks.transports import SocketTransport
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU

# (label, client CPUs, vm serve CPUs, instance CPUs)
PLACEMENTS = (
    ("free", {0, 1}, {0, 1}, {0, 1}),
    ("all three on one CPU", {1}, {1}, {1}),
    ("vm serve + instance on one CPU, client on the other", {0}, {1}, {1}),
    ("instance on one CPU, client + vm serve on the other", {0}, {0}, {1}),
)


def _pin(pid: int, cpus: set[int]) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def _median_us(transport: SocketTransport, command: bytes, n: int) -> float:
    for _ in range(n // 10):
        transport.transact(command)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        transport.transact(command)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def _measure_rows(
    sgx: SocketTransport, peer: SocketTransport, pids: tuple[int, int, int], iterations: int
) -> list[dict[str, Any]]:
    """One row per placement; ``pids`` = (vm serve, instance, swtpm)."""
    serve, instance, swtpm = pids
    command = wire.get_random(32)
    everywhere = set(range(os.cpu_count() or 1))
    rows = []
    try:
        for label, client_cpus, serve_cpus, instance_cpus in PLACEMENTS:
            os.sched_setaffinity(0, client_cpus)
            _pin(serve, serve_cpus)
            _pin(instance, instance_cpus)
            _pin(swtpm, instance_cpus)
            rows.append(
                {
                    "placement": label,
                    "sgxvtpm_us": _median_us(sgx, command, iterations),
                    "swtpm_us": _median_us(peer, command, iterations),
                }
            )
    finally:
        os.sched_setaffinity(0, everywhere)
        for pid in pids:
            with contextlib.suppress(OSError):  # it may be gone
                _pin(pid, everywhere)
    return rows


def run(ctx: Context) -> dict[str, Any]:
    """The bench section: GetRandom(32) medians per placement, sgxvtpm (c) and swtpm."""
    if (os.cpu_count() or 1) < 2:
        return {"ok": False, "reason": "needs two CPUs"}
    if ctx.sgx_reason or ctx.serve_reason:
        return {"ok": False, "reason": f"not available: {ctx.sgx_reason or ctx.serve_reason}"}
    ctx.swtpm.grow_to(1)
    ctx.grow_vms_to(1)
    fleet = ctx.fleet()
    name = ctx.vm_names[0]
    sgx = SocketTransport(fleet.serve(name))
    peer = SocketTransport(ctx.swtpm.procs[0].path)
    try:
        sgx.transact(wire.startup(TPM2_SU.CLEAR))  # TPM_RC_INITIALIZE if already up: fine
        pids = (fleet.serve_pid(name), fleet.vms[name].pid, ctx.swtpm.procs[0].pid)
        rows = _measure_rows(sgx, peer, pids, max(200, ctx.config.cheap_iterations // 2))
    finally:
        sgx.close()
        peer.close()
        fleet.stop_serve(name)
    return {"ok": True, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.affinity")
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two CPUs")
    root = Path(tempfile.mkdtemp(prefix="sgxvtpm-affinity-"))
    fleet = Fleet(root / "sgxvtpm")
    fleet.start()
    swtpm = Swtpm(root / "swtpm")
    try:
        swtpm.wait_answering()
        fleet.create("vm0")
        sgx = SocketTransport(fleet.serve("vm0"))
        sgx.transact(wire.startup(TPM2_SU.CLEAR))
        peer = SocketTransport(swtpm.path)
        pids = (fleet.serve_pid("vm0"), fleet.vms["vm0"].pid, swtpm.pid)
        for _ in range(args.rounds):
            for row in _measure_rows(sgx, peer, pids, args.iterations):
                print(
                    f"{row['placement']}: GetRandom(32) median sgxvtpm "
                    f"{row['sgxvtpm_us']:.1f} us, swtpm (placed as the instance) "
                    f"{row['swtpm_us']:.1f} us",
                    flush=True,
                )
        sgx.close()
        peer.close()
    finally:
        swtpm.close()
        fleet.stop()


if __name__ == "__main__":
    main()
