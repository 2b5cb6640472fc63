"""Aggregate throughput, A/B between source trees, interleaved.

    python benchmarks/loadab.py ROUNDS VMS SECONDS LABEL=TREE [LABEL=TREE ...]

Like cmdcpu.py (same tree layout): each tree's server starts a hostd with VMS
VMs and ``vm serve --swtpm`` on each; then, ROUNDS times, each server in turn
(the order alternating) runs the benchmark's load (benchmarks/load.py: a
closed GetRandom(32)/PCR_Extend loop per VM, two load workers) for SECONDS
and reports commands per second. Prints the median per tree and the median
of the paired ratios to the first tree: on a shared machine only those mean
something.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cmdcpu import ab  # a script beside this one, run as a file


def serve(label: str, vms: int, seconds: float) -> None:
    sys.path.insert(0, os.getcwd())  # the tree's benchmarks and sgxvtpm, not this file's
    from benchmarks.config import QUICK
    from benchmarks.context import Context
    from benchmarks.load import drive

    with tempfile.TemporaryDirectory(prefix=f"loadab-{label}-") as tmp:
        ctx = Context(Path(tmp), QUICK)
        try:
            fleet = ctx.fleet()
            ctx.grow_vms_to(vms)
            paths = [fleet.serve(name) for name in ctx.vm_names[:vms]]
            print(json.dumps({"ready": label}), flush=True)
            for line in sys.stdin:
                if line.strip() != "go":
                    break
                result = drive(paths, seconds)
                print(json.dumps(result), flush=True)
        finally:
            ctx.close()


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(argv[1], int(argv[2]), float(argv[3]))
        return 0
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    rounds, vms, seconds = int(argv[0]), int(argv[1]), float(argv[2])
    trees = dict(arg.split("=", 1) for arg in argv[3:])
    answers = ab(rounds, trees, __file__, (str(vms), str(seconds)))
    results = {label: [float(a.get("commands_per_s", 0.0)) for a in runs]
               for label, runs in answers.items()}
    order = list(trees)
    first = results[order[0]]
    for label in order:
        runs = results[label]
        ratios = [b / a for a, b in zip(first, runs, strict=True) if a]
        print(f"{label}: median {statistics.median(runs):.0f} commands/s "
              f"(runs {', '.join(f'{x:.0f}' for x in runs)}); "
              f"paired ratio to {order[0]} {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
