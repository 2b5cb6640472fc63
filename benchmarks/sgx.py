"""sgxvtpm under test: one hostd, its instances, and their ``vm serve`` endpoints.

Everything goes through the public faces an operator uses: ``sgxvtpm hostd``,
the VMM API (:class:`sgxvtpm.vmm.client.VmmClient`, what ``sgxvtpm vm create``
calls), ``sgxvtpm vm serve NAME --swtpm PATH`` and the K2 client.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.swtpm import wait_answering
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.testing import HostdProcess, terminate
from sgxvtpm.vmm.credentials import ENV as CREDENTIALS_ENV
from sgxvtpm.vmm.credentials import Credentials
from sgxvtpm.wire.k1 import InstanceInfo

READY_TIMEOUT = 90.0


def unavailable_reason() -> str | None:
    """Why sgxvtpm instances cannot serve TPM commands here, or None if they can.

    The instance enclave imports its vTPM core and the vTPM request codec;
    without them ``vm create`` fails, so say that instead of timing a failure.
    """
    import importlib

    for module in ("sgxvtpm.enclaves.vtpm_core", "sgxvtpm.wire.vtpm", "sgxvtpm.enclaves.instance"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module} does not import ({exc})"
    return None


def serve_unavailable_reason() -> str | None:
    """Why ``vm serve --swtpm`` cannot run here, or None."""
    import importlib

    try:
        module = importlib.import_module("sgxvtpm.endpoint.serve")
    except ImportError as exc:
        return f"sgxvtpm.endpoint.serve does not import ({exc})"
    if not hasattr(module, "serve_tss"):
        return "sgxvtpm.endpoint.serve has no serve_tss"
    return None


@dataclass
class Created:
    name: str
    pid: int
    seconds: float  # the VMM call, as seen by the caller
    started_at: float  # time.time() at the call (to match hostd's log)
    finished_at: float


@dataclass
class Fleet:
    """A hostd in ``root`` and the VMs created on it."""

    root: Path
    hostd: HostdProcess | None = None
    vms: dict[str, Created] = field(default_factory=dict)
    serves: dict[str, tuple[subprocess.Popen[bytes], Path]] = field(default_factory=dict)

    @property
    def state(self) -> StateDir:
        return StateDir(self.root / "state")

    @property
    def credentials(self) -> Credentials:
        """The operator's and the VMs' credentials for this fleet (never the user's own)."""
        return Credentials(self.root / "credentials")

    def env(self) -> dict[str, str]:
        return {**os.environ, CREDENTIALS_ENV: str(self.credentials.root)}

    def k2_target(self, name: str) -> dict[str, Any]:
        """A worker's target spec for VM ``name`` over in-process K2 (benchmarks/worker.py)."""
        return {"kind": "k2", "state_dir": str(self.state.root),
                "credentials": str(self.credentials.root), "name": name}

    @property
    def log_path(self) -> Path:
        return self.root / "hostd.log"

    def start(self) -> float:
        """Start hostd; seconds until its manager is ready."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.hostd = HostdProcess(self.state, credentials=self.credentials, log_path=self.log_path)
        return self.hostd.start(READY_TIMEOUT)

    def log_tail(self, n: int = 600) -> str:
        return self.hostd.log_tail(n) if self.hostd is not None else ""

    @property
    def hostd_pid(self) -> int:
        assert self.hostd is not None
        return self.hostd.pid

    def create(self, name: str, ek: list[str] | None = None) -> Created:
        """``VmmClient.create`` (what ``sgxvtpm vm create`` runs), timed."""
        from sgxvtpm.vmm.client import VmmClient

        client = VmmClient(self.state, credentials=self.credentials)
        started = time.time()
        t0 = time.perf_counter()
        info = asyncio.run(client.create(name, ek=ek))
        seconds = time.perf_counter() - t0
        created = Created(name, info.pid or 0, seconds, started, time.time())
        self.vms[name] = created
        return created

    def create_cli(self, name: str) -> float:
        """Wall time of the ``sgxvtpm vm create`` command line (interpreter start included)."""
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "sgxvtpm.cli",
                "vm",
                "create",
                name,
                "--state-dir",
                str(self.state.root),
            ],
            capture_output=True,
            timeout=300,
            check=False,
            env=self.env(),
        )
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"sgxvtpm vm create failed: {proc.stderr.decode().strip()}")
        pid = self.show(name).pid or 0
        self.vms[name] = Created(name, pid, seconds, 0.0, 0.0)
        return seconds

    def show(self, name: str) -> InstanceInfo:
        from sgxvtpm.vmm.client import VmmClient

        return asyncio.run(VmmClient(self.state, credentials=self.credentials).show(name))

    def instance_pids(self) -> list[int]:
        return [vm.pid for vm in self.vms.values() if vm.pid]

    def serve(self, name: str, timeout: float = 60.0) -> Path:
        """Start ``sgxvtpm vm serve NAME --swtpm PATH``; PATH once it answers."""
        path = self.root / "serve" / f"{name}.sock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.root / "serve" / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sgxvtpm.cli",
                    "vm",
                    "serve",
                    name,
                    "--swtpm",
                    str(path),
                    "--state-dir",
                    str(self.state.root),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
            )
        self.serves[name] = (proc, path)
        wait_answering(path, proc, timeout)
        return path

    def stop_serve(self, name: str) -> None:
        entry = self.serves.pop(name, None)
        if entry is not None:
            terminate(entry[0], timeout=10)

    def serve_pid(self, name: str) -> int:
        return self.serves[name][0].pid

    def stop(self) -> None:
        for proc, _ in self.serves.values():
            terminate(proc, timeout=10)
        self.serves.clear()
        if self.hostd is not None:
            self.hostd.stop(timeout=60)
            self.hostd = None

    def log_events(self) -> list[dict[str, Any]]:
        """hostd's (and its enclaves') structured log lines."""
        events = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events


def creation_phases(events: list[dict[str, Any]], created: Created) -> dict[str, float] | None:
    """Where one ``vm create`` spent its time, from hostd's log (ms resolution).

    launch: call -> hostd.enclave_launched (K1 session, manager's launch
    request, zygote fork); manufacture: -> instance.provisioned (EKs in
    libtpms, certificates from the manager CA, sealed state written);
    registry: -> the caller has its answer (registry sealed, VM certificate).
    """
    launched = provisioned = None
    for event in events:
        ts = event.get("ts")
        if not isinstance(ts, int | float) or not (
            created.started_at - 0.002 <= ts <= created.finished_at + 0.002
        ):
            continue
        if event.get("event") == "hostd.enclave_launched" and launched is None:
            launched = float(ts)
        elif event.get("event") == "instance.provisioned" and provisioned is None:
            provisioned = float(ts)
    if launched is None or provisioned is None:
        return None
    return {
        "launch_ms": (launched - created.started_at) * 1000,
        "manufacture_ms": (provisioned - launched) * 1000,
        "registry_ms": (created.finished_at - provisioned) * 1000,
    }
