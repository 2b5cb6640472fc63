"""How big a run is: the full run (``make bench``) and ``--quick`` (seconds)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Config:
    cheap_iterations: int  # per cheap command; heavy ones get a tenth
    creation_runs: int  # instance creations timed per system
    memory_instances: int  # instances alive when idle memory is read
    load_vms: tuple[int, ...]  # aggregate throughput with this many VMs at once
    load_seconds: float  # measured seconds per throughput point (after a warm-up)
    scale_points: tuple[int, ...]  # instance counts where latency and memory are read
    scale_budget_s: float  # per system; the scale phase stops when it is spent
    channel_iterations: int  # benchmarks/bench_channel.py
    cpu_commands: int = 3000  # GetRandoms timed for the CPU-per-process breakdown
    latency_passes: int = 3  # targets forwards, backwards, forwards (drift evens out)
    sgxvtpm: bool = True  # measure sgxvtpm at all (c, d, and its other figures)
    startup_runs: int = 10  # control socket up after exec, per system and load (startup.py)

    def with_overrides(self, **changes: object) -> Config:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]


FULL = Config(
    cheap_iterations=2000,
    creation_runs=5,
    memory_instances=10,
    load_vms=(1, 8, 32),
    load_seconds=4.0,
    scale_points=(1, 10, 50, 100, 200, 300, 400, 500),
    scale_budget_s=330.0,
    channel_iterations=300,
)

QUICK = Config(
    cheap_iterations=200,
    creation_runs=1,
    memory_instances=3,
    load_vms=(1, 2),
    load_seconds=0.5,
    scale_points=(1, 5, 10),
    scale_budget_s=8.0,
    channel_iterations=50,
    latency_passes=1,
    cpu_commands=300,
    startup_runs=3,
)
