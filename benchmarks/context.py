"""What the sections of one run share: the work directory, the swtpm processes,
and the sgxvtpm hostd with its VMs (each started once and grown as needed)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.config import Config
from benchmarks.sgx import Fleet, serve_unavailable_reason, unavailable_reason
from benchmarks.swtpm import Swtpm


@dataclass
class SwtpmPool:
    """Idle swtpm processes, each on fresh state (libtpms manufactures at start)."""

    root: Path
    procs: list[Swtpm] = field(default_factory=list)

    def grow_to(self, n: int) -> float:
        """Start swtpm processes until ``n`` answer; seconds per new instance."""
        t0 = time.perf_counter()
        added = 0
        while len(self.procs) < n:
            tpm = Swtpm(self.root / f"swtpm{len(self.procs):03d}")
            self.procs.append(tpm)
            tpm.wait_answering()
            added += 1
        return (time.perf_counter() - t0) / added if added else 0.0

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for tpm in self.procs:
            tpm.close()
        self.procs.clear()


class Context:
    def __init__(self, workdir: Path, config: Config) -> None:
        self.workdir = workdir
        self.config = config
        self.swtpm = SwtpmPool(workdir / "swtpm-pool")
        self._fleet: Fleet | None = None
        self._fleet_error: str | None = None
        if not config.sgxvtpm:
            self._fleet_error = "sgxvtpm not measured in this run (--no-sgxvtpm)"
        else:
            self._fleet_error = unavailable_reason()
        self.serve_reason = serve_unavailable_reason()
        self.vm_names: list[str] = []
        self.create_seconds: list[float] = []

    @property
    def sgx_reason(self) -> str | None:
        """Why sgxvtpm cannot be measured, or None."""
        return self._fleet_error

    def fleet(self) -> Fleet:
        """The running hostd (started on first use); raises if it cannot run."""
        if self._fleet_error is not None:
            raise RuntimeError(self._fleet_error)
        if self._fleet is None:
            fleet = Fleet(self.workdir / "sgxvtpm")
            try:
                fleet.start()
            except Exception as exc:
                fleet.stop()
                self._fleet_error = f"hostd did not start: {exc}"
                raise RuntimeError(self._fleet_error) from exc
            self._fleet = fleet
        return self._fleet

    def grow_vms_to(self, n: int, deadline: float | None = None) -> None:
        """Create sgxvtpm VMs (vm000, vm001, ...) until ``n`` exist or the deadline."""
        fleet = self.fleet()
        while len(self.vm_names) < n:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"time budget spent at {len(self.vm_names)} instances")
            name = f"vm{len(self.vm_names):03d}"
            created = fleet.create(name)
            self.vm_names.append(name)
            self.create_seconds.append(created.seconds)

    def close(self) -> None:
        self.swtpm.close()
        if self._fleet is not None:
            self._fleet.stop()
            self._fleet = None
