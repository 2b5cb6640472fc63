"""How CPU placement changes the latency of one command through ``vm serve``.

    .venv/bin/python -m benchmarks.affinity [--iterations 3000] [--rounds 2]

Starts a hostd with one VM and ``vm serve --swtpm``, and a swtpm, then times
GetRandom(32) from this process over one persistent connection with the
client, the endpoint and the instance enclave (or swtpm) placed on the CPUs
of each row (all threads of each process, sched_setaffinity). Prints
medians. Needs two CPUs.
Not part of ``make bench``: it moves processes around, which the
side-by-side comparison with swtpm must not do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

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
        instance, serve = fleet.vms["vm0"].pid, fleet.serve_pid("vm0")
        command = wire.get_random(32)
        for _ in range(args.rounds):
            for label, client_cpus, serve_cpus, instance_cpus in PLACEMENTS:
                os.sched_setaffinity(0, client_cpus)
                _pin(serve, serve_cpus)
                _pin(instance, instance_cpus)
                _pin(swtpm.pid, instance_cpus)
                mine = _median_us(sgx, command, args.iterations)
                theirs = _median_us(peer, command, args.iterations)
                print(
                    f"{label}: GetRandom(32) median sgxvtpm {mine:.1f} us, "
                    f"swtpm (placed as the instance) {theirs:.1f} us",
                    flush=True,
                )
        sgx.close()
        peer.close()
    finally:
        swtpm.close()
        fleet.stop()

if __name__ == "__main__":
    main()
