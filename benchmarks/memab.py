"""Idle instance memory, A/B between source trees.

    python benchmarks/memab.py ROUNDS INSTANCES LABEL=TREE [LABEL=TREE ...]

Like cmdcpu.py (same tree layout): each tree's server starts a hostd and
creates INSTANCES VMs with that tree's code; then, ROUNDS times, each server
in turn reads the memory of its idle instances as the benchmark's memory
section does (benchmarks/memory.py: PSS and private dirty pages per
instance enclave, everything under hostd divided by the instances). All
trees' instances are alive at once, so they see the same machine. Prints
the median per tree and the median of the paired differences to the first.

Unlike CPU time, PSS hardly depends on the machine's load: a tree's
median moves by ~0.1-0.3 MiB between rounds and runs.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cmdcpu import ab  # a script beside this one, run as a file

FIELDS = ("pss_kib", "private_dirty_kib", "tree_pss_per_instance_kib", "hostd_pss_kib")
SETTLE_S = 1.5  # an instance hands free heap back after two idle loop ticks (0.5 s)


def serve(label: str, instances: int) -> None:
    sys.path.insert(0, os.getcwd())  # the tree's benchmarks and sgxvtpm, not this file's
    from benchmarks.config import QUICK
    from benchmarks.context import Context
    from benchmarks.memory import sgx_memory

    with tempfile.TemporaryDirectory(prefix=f"memab-{label}-") as tmp:
        ctx = Context(Path(tmp), QUICK)
        try:
            ctx.fleet()
            ctx.grow_vms_to(instances)
            print(json.dumps({"ready": label}), flush=True)
            for line in sys.stdin:
                if line.strip() != "go":
                    break
                time.sleep(SETTLE_S)
                print(json.dumps(sgx_memory(ctx, instances)), flush=True)
        finally:
            ctx.close()


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(argv[1], int(argv[2]))
        return 0
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    rounds, instances = int(argv[0]), int(argv[1])
    trees = dict(arg.split("=", 1) for arg in argv[2:])
    answers = ab(rounds, trees, __file__, (str(instances),))
    failed = [label for label, runs in answers.items() if not all(r.get("ok") for r in runs)]
    if failed:
        print(f"no reading from {', '.join(failed)}: {answers[failed[0]]}", file=sys.stderr)
        return 1
    first = answers[next(iter(trees))]
    for label, runs in answers.items():
        for field in FIELDS:
            diffs = [b[field] - a[field] for a, b in zip(first, runs, strict=True)]
            print(f"{label:10s} {field:26s} {statistics.median(r[field] for r in runs):9.0f} KiB"
                  f" (paired {statistics.median(diffs):+.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
