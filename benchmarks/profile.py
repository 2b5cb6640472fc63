"""Profile sgxvtpm's hot path with py-spy: every process a cheap command crosses.

    .venv/bin/pip install py-spy        # not a dependency of sgxvtpm
    .venv/bin/python -m benchmarks.profile [--target c|d] [--seconds 8] [--out DIR]

Starts a hostd with one VM, runs a closed GetRandom(32) loop through
``vm serve --swtpm`` (c) or the K2 client (d) in a worker, and samples the
client, the endpoint (c), hostd and the instance enclave at the same time.
Writes py-spy's raw (collapsed) stacks per process to DIR and prints, per
process, the functions that hold most of the busy samples (waiting in
epoll/recv is left out).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.config import QUICK
from benchmarks.context import Context
from benchmarks.procs import start_worker

IDLE_LEAVES = (
    "select (selectors.py",
    "_receive (sgxvtpm/endpoint/k2.py",
    "_recv (sgxvtpm/endpoint/streams.py",
    "recv_response",
)


def busy_functions(raw: str, top: int = 15) -> list[tuple[float, str]]:
    """(share of busy samples, function) with the largest inclusive share.

    ``raw`` is py-spy's collapsed format: ``frame;frame;... count`` per line;
    samples whose innermost frame is waiting for I/O are not busy.
    """
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if any(marker in frames[-1] for marker in IDLE_LEAVES):
            continue
        n = int(count)
        total += n
        for name in {frame.split(":")[0] for frame in frames}:
            inclusive[name] += n
    return [(n / total, name) for name, n in inclusive.most_common(top)] if total else []


def _loop_job(
    ctx: Context, target: str, seconds: float
) -> tuple[dict[str, object], dict[str, int]]:
    fleet = ctx.fleet()
    ctx.grow_vms_to(1)
    name = ctx.vm_names[0]
    pids = {"hostd": fleet.hostd_pid, "instance": fleet.vms[name].pid}
    if target == "c":
        path = fleet.serve(name)
        pids["vm serve"] = fleet.serve_pid(name)
        spec: dict[str, object] = {"kind": "socket", "path": str(path)}
    else:
        spec = fleet.k2_target(name)
    n = int(seconds / 300e-6)  # enough GetRandoms to outlast the sampling
    return {"job": "cpu", "target": spec, "pids": {}, "n": n}, pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", choices=("c", "d"), default="c")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("profile-out"))
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sgxvtpm-profile-") as tmp:
        ctx = Context(Path(tmp), QUICK)
        try:
            job, pids = _loop_job(ctx, args.target, args.seconds * 2)
            worker = start_worker(job)
            time.sleep(1.5)  # past the worker's start and warm-up
            pids["client"] = worker.pid
            spies = {
                name: subprocess.Popen(
                    [
                        spy,
                        "record",
                        "-p",
                        str(pid),
                        "-d",
                        str(int(args.seconds)),
                        "-r",
                        "250",
                        "-f",
                        "raw",
                        "--nonblocking",
                        "-o",
                        str(args.out / f"{name}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for name, pid in pids.items()
            }
            for proc in spies.values():
                proc.wait()
            worker.kill()
            worker.communicate()
        finally:
            ctx.close()
    for name in pids:
        path = args.out / f"{name}.txt"
        if not path.exists():
            print(f"== {name}: no profile (py-spy could not attach)")
            continue
        print(f"== {name}: busy samples by function (inclusive)")
        for share, function in busy_functions(path.read_text()):
            print(f"  {share * 100:5.1f}%  {function}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
