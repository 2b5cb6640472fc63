"""Run the benchmark suite and write BENCHMARKS.md.

    .venv/bin/python -m benchmarks.run [--quick] [--output PATH] [...]
    make bench              (sgxvtpm bench: the full run, 6-7 min on 2 cores)
                            -> BENCHMARKS.md and benchmarks/results.json
    sgxvtpm bench --quick   (~30 s) -> benchmarks/BENCHMARKS-quick.md (not committed)
    python -m benchmarks.run --from-json benchmarks/results.json   (re-render only)

Sections, in order (each in its own worker processes where it matters):
latency on the four targets, instance creation, the control socket up after
exec (libvirt's one-second wait), idle memory, aggregate throughput, scale,
moving a VM's TPM state to another host (migration), channel overhead. A
section that cannot run says why in its place in the report; the others
still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import affinity, creation, load, memory, migration, scale, startup, targets
from benchmarks.config import FULL, QUICK, Config
from benchmarks.context import Context
from benchmarks.machine import describe, load_average
from benchmarks.procs import ROOT
from benchmarks.report import render

SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "latency": targets.run,
    "placement": affinity.run,
    "creation": creation.run,
    "startup": startup.run,
    "memory": memory.run,
    "load": load.run,
    "scale": scale.run,
    "migration": migration.run,
}
ANALYSIS = Path(__file__).with_name("ANALYSIS.md")
DEFAULT_JSON = Path(__file__).with_name("results.json")
FULL_OUTPUT = ROOT / "BENCHMARKS.md"
QUICK_OUTPUT = Path(__file__).with_name("BENCHMARKS-quick.md")
SNAPSHOT_ENV = "SGXVTPM_BENCH_SOURCE"  # set in the re-run: where the code was copied from


def channel_section(iterations: int) -> dict[str, Any]:
    from benchmarks import bench_channel

    # The echo thread's last session ends at an EOF; that failure is expected.
    logging.getLogger("sgxvtpm.channel").setLevel(logging.ERROR)
    results: dict[str, Any] = dict(bench_channel.run(iterations))
    results["ok"] = True
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sgxvtpm bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a small, fast version (seconds)")
    p.add_argument(
        "--output",
        type=Path,
        help="default: BENCHMARKS.md (full run) or benchmarks/BENCHMARKS-quick.md (--quick)",
    )
    p.add_argument(
        "--json",
        type=Path,
        help="raw results (default: benchmarks/results.json, or OUTPUT with .json)",
    )
    p.add_argument("--iterations", type=int, help="iterations per cheap command")
    p.add_argument("--creation-runs", type=int)
    p.add_argument("--memory-instances", type=int)
    p.add_argument("--load-vms", help="comma-separated VM counts, e.g. 1,8,32")
    p.add_argument("--load-seconds", type=float)
    p.add_argument("--scale-points", help="comma-separated instance counts, e.g. 1,10,50")
    p.add_argument("--scale-budget", type=float, help="seconds per system for the scale phase")
    p.add_argument("--channel-iterations", type=int)
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="RESULTS",
        help="measure nothing: render OUTPUT from a previous run's raw results",
    )
    p.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run on the live source tree instead of a copy taken at the start",
    )
    p.add_argument("--no-sgxvtpm", action="store_true", help="measure only (a) and swtpm")
    p.add_argument(
        "--sections",
        default=",".join([*SECTIONS, "channel"]),
        help="comma-separated subset of: " + ", ".join([*SECTIONS, "channel"]),
    )
    return p


def _ints(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(x) for x in text.split(",") if x)


def config_from(args: argparse.Namespace) -> Config:
    base = QUICK if args.quick else FULL
    return base.with_overrides(
        cheap_iterations=args.iterations,
        creation_runs=args.creation_runs,
        memory_instances=args.memory_instances,
        load_vms=_ints(args.load_vms),
        load_seconds=args.load_seconds,
        scale_points=_ints(args.scale_points),
        scale_budget_s=args.scale_budget,
        channel_iterations=args.channel_iterations,
        sgxvtpm=False if args.no_sgxvtpm else None,
    )


def _say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_sections(config: Config, sections: list[str], workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    ctx = Context(workdir, config)
    try:
        for name in sections:
            if name == "channel":
                continue
            _say(f"{name} ...")
            t0 = time.perf_counter()
            try:
                results[name] = SECTIONS[name](ctx)
            except Exception as exc:  # one broken section must not lose the others
                results[name] = {"ok": False, "reason": f"failed: {type(exc).__name__}: {exc}"}
            _say(f"{name} done in {time.perf_counter() - t0:.1f} s")
    finally:
        ctx.close()
    if "channel" in sections:
        _say("channel ...")
        try:
            results["channel"] = channel_section(config.channel_iterations)
        except Exception as exc:
            results["channel"] = {"ok": False, "reason": f"failed: {type(exc).__name__}: {exc}"}
    return results


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def run_from_snapshot(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command on a copy of the code, so the run measures one version.

    An enclave's MRENCLAVE is computed from the code installed at the
    moment a client checks it (SECURITY.md property 13): if the sources
    change while a long run is under way, instances launched before the
    change no longer verify.
    The copy (sgxvtpm and benchmarks, first on PYTHONPATH) stays put.
    """
    output = args.output.resolve()
    json_path = (args.json or _default_json(output)).resolve()
    with tempfile.TemporaryDirectory(prefix="sgxvtpm-bench-code-") as tmp:
        snap = Path(tmp)
        _copy_tree(ROOT / "src" / "sgxvtpm", snap / "src" / "sgxvtpm")
        _copy_tree(ROOT / "benchmarks", snap / "benchmarks")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(snap / "src"), str(snap)]),
            SNAPSHOT_ENV: str(ROOT),
        }
        child = [*argv, "--output", str(output), "--json", str(json_path)]
        command = [sys.executable, "-m", "benchmarks.run", *child]
        return subprocess.call(command, cwd=snap, env=env)


def _analysis() -> str:
    """The hand-written part of BENCHMARKS.md (profiles, what would help)."""
    return ANALYSIS.read_text() if ANALYSIS.exists() else ""


def _default_json(output: Path) -> Path:
    return DEFAULT_JSON if output == FULL_OUTPUT else output.with_suffix(".json")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.output is None:
        # A quick run must not overwrite the committed results of a full one.
        args.output = QUICK_OUTPUT if args.quick else FULL_OUTPUT
    if args.from_json is not None:
        args.output.write_text(render(json.loads(args.from_json.read_text()), _analysis()))
        return 0
    if not args.no_snapshot and SNAPSHOT_ENV not in os.environ:
        return run_from_snapshot(args, argv)
    config = config_from(args)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - {*SECTIONS, "channel"}
    if unknown:
        print(f"sgxvtpm bench: unknown sections {sorted(unknown)}", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "quick": args.quick,
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": describe(Path(os.environ.get(SNAPSHOT_ENV) or ROOT)),
        "config": {k: v for k, v in vars(config).items()},
    }
    with tempfile.TemporaryDirectory(prefix="sgxvtpm-bench-") as tmp:
        results.update(run_sections(config, sections, Path(tmp)))
    results["duration_s"] = time.perf_counter() - t0
    results["machine"]["load average at end"] = load_average()
    args.output.write_text(render(results, _analysis()))
    json_path = args.json or _default_json(args.output)
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    _say(f"wrote {args.output} and {json_path} in {results['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
