"""CPU per command per process, A/B between source trees, interleaved.

    python benchmarks/cmdcpu.py ab ROUNDS LABEL=TREE [LABEL=TREE ...]

Each TREE is a checkout of sgxvtpm with its own ``.venv`` (for an older
commit: ``git worktree add DIR COMMIT``, then a venv whose ``.pth`` names
``DIR/src`` and this tree's site-packages). For every tree this starts, with
that tree's interpreter and code, a server (``serve``): a hostd with two VMs,
``vm serve --swtpm`` on the first (c) and the in-process K2 client on the
second (d). Then, ROUNDS times, each server in turn (the order alternating)
runs the command set and reads the CPU time of every process on the path
(/proc/PID/task/*/schedstat, as the benchmark's CPU breakdown does), and the
medians over the rounds are printed per command, target and process, with
the median of the paired differences to the first tree.

The machine is shared and noisy: only differences that hold across the
paired rounds mean something. ``N_CHEAP`` and ``N_HEAVY`` (environment) set
the commands per round.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Step = Callable[[Callable[[bytes], bytes], int], object]


def _commands(fixture: Any, n_cheap: int, n_heavy: int) -> dict[str, tuple[int, Step]]:
    from benchmarks.latency import NV_INDEX, NV_SIZE, PCR
    from sgxvtpm.tpm import wire

    digest = hashlib.sha256(b"sgxvtpm benchmark").digest()
    primary = wire.create_primary(wire.ecc_p256_template())
    nv = [wire.nv_write(NV_INDEX, b"\xa5" * NV_SIZE), wire.nv_write(NV_INDEX, b"\x5a" * NV_SIZE)]

    def create_and_flush(run: Callable[[bytes], bytes], _: int) -> None:
        handle = wire.parse_create_primary(run(primary)).handle
        run(wire.flush_context(handle))

    return {
        "GetRandom": (n_cheap, lambda run, i: run(wire.get_random(32))),
        "PCR_Extend": (n_cheap, lambda run, i: run(wire.pcr_extend(PCR, digest))),
        "PCR_Read": (n_cheap, lambda run, i: run(wire.pcr_read([PCR]))),
        "NV_Write": (max(1, n_cheap // 3), lambda run, i: run(nv[i % 2])),
        "NV_Read": (n_cheap, lambda run, i: run(wire.nv_read(NV_INDEX, NV_SIZE))),
        "SignECDSA": (n_heavy, lambda run, i: run(wire.sign(fixture.ecc_key, digest))),
        "CreatePrimary+Flush": (n_heavy, create_and_flush),
    }


def _measure(transport: Any, pids: dict[str, int]) -> dict[str, dict[str, float]]:
    from benchmarks.latency import Fixture
    from benchmarks.worker import _cpu

    run = transport.transact
    fixture = Fixture(transport)
    n_cheap = int(os.environ.get("N_CHEAP", "400"))
    n_heavy = int(os.environ.get("N_HEAVY", "60"))
    out: dict[str, dict[str, float]] = {}
    try:
        for name, (n, step) in _commands(fixture, n_cheap, n_heavy).items():
            for i in range(max(20, n // 10)):
                step(run, i)
            procs = {**pids, "client": os.getpid()}
            before = {k: _cpu(pid).on_cpu_ns for k, pid in procs.items()}
            t0 = time.perf_counter()
            for i in range(n):
                step(run, i)
            wall = (time.perf_counter() - t0) / n * 1e6
            after = {k: _cpu(pid).on_cpu_ns for k, pid in procs.items()}
            out[name] = {"wall": wall, **{k: (after[k] - before[k]) / n / 1000 for k in procs}}
    finally:
        fixture.close()
    return out


def serve(label: str) -> None:
    """One tree's side: hostd, two VMs, `vm serve` on the first; a round per "go" line."""
    sys.path.insert(0, os.getcwd())  # the tree's benchmarks and sgxvtpm, not this file's
    from benchmarks.config import QUICK
    from benchmarks.context import Context
    from benchmarks.latency import startup
    from benchmarks.worker import open_target

    with tempfile.TemporaryDirectory(prefix=f"cmdcpu-{label}-") as tmp:
        ctx = Context(Path(tmp), QUICK)
        try:
            fleet = ctx.fleet()
            ctx.grow_vms_to(2)
            c_vm, d_vm = ctx.vm_names
            path = fleet.serve(c_vm)
            c_pids = {"serve": fleet.serve_pid(c_vm), "instance": fleet.vms[c_vm].pid}
            d_pids = {"instance": fleet.vms[d_vm].pid}
            if hasattr(fleet, "k2_target"):
                d_spec = fleet.k2_target(d_vm)
            else:  # trees before the credentials directory
                d_spec = {"kind": "k2", "state_dir": str(fleet.state.root), "name": d_vm}
            c = open_target({"kind": "socket", "path": str(path)})
            d = open_target(d_spec)
            for transport in (c, d):
                startup(transport)
            print(json.dumps({"ready": label}), flush=True)
            for line in sys.stdin:
                if line.strip() != "go":
                    break
                print(json.dumps({"c": _measure(c, c_pids), "d": _measure(d, d_pids)}),
                      flush=True)
            c.close()
            d.close()
        finally:
            ctx.close()


def ab(
    rounds: int, trees: dict[str, str], script: str = __file__, args: tuple[str, ...] = ()
) -> dict[str, list[dict[str, Any]]]:
    """Start ``script serve LABEL *args`` with each tree's interpreter in that tree,
    then ROUNDS times send each a "go" (the order alternating); its JSON answers."""
    procs = {}
    for label, tree in trees.items():
        proc = subprocess.Popen(
            [f"{tree}/.venv/bin/python", os.path.abspath(script), "serve", label, *args],
            cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        line = proc.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"{label}: the server did not start")
        procs[label] = proc
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    order = list(trees)
    try:
        for r in range(rounds):
            for label in order if r % 2 == 0 else order[::-1]:
                proc = procs[label]
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
                results[label].append(json.loads(proc.stdout.readline()))
            print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    finally:
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(120)
    return results


def report(results: dict[str, list[dict[str, Any]]]) -> str:
    labels = list(results)
    first = results[labels[0]]
    lines = []
    for target in ("c", "d"):
        for cmd, fields in first[0][target].items():
            for field in fields:
                row = f"{target} {cmd:20s} {field:9s}"
                for label in labels:
                    runs = results[label]
                    value = statistics.median(run[target][cmd][field] for run in runs)
                    row += f" {label} {value:7.1f}"
                    if label != labels[0]:
                        diffs = [b[target][cmd][field] - a[target][cmd][field]
                                 for a, b in zip(first, runs, strict=False)]
                        row += f" (paired {statistics.median(diffs):+.1f})"
                lines.append(row)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(argv[1])
        return 0
    if argv[:1] != ["ab"] or len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    results = ab(int(argv[1]), dict(arg.split("=", 1) for arg in argv[2:]))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
