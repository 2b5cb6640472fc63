"""One unauthenticated local client cannot slow another VM, nor grow hostd or an enclave.

A VM (the victim) runs GetRandom on its K2 session (handed off to its
instance, as every VM's) while a local process with no credential at all
attacks, from a process of its own (tests/helpers/dos_client.py):

- ``hello``: 400 sessions that each send a TLS ClientHello and never read,
  to the victim's instance and, from a second process, to the manager;
- ``spread``: the same from 200 connections of one session each, all held;
- ``opens``: tens of thousands of OPEN frames at the victim's instance;
- ``pings``: megabytes of CONTROL pings to hostd, replies never read.

Under each, the victim's median latency stays within 2x its quiet median
measured just before (with a floor of quiet + :data:`FLOOR`: two cores are
shared with the attacker, hostd and whatever else runs here), ``vm list``
answers within :data:`LIST_DEADLINE` after the burst, and the resident memory
of hostd, the manager and both instances (VmRSS, sampled every 50 ms) grows
by less than :data:`GROWTH_MIB`. Each attack is checked to have been sent in
full.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.helpers.processes import helper_command, helper_env, stop_process
from tests.helpers.vmtools import TRANSIENT, HostdCtl, Numbers, boot, running

from sgxvtpm.endpoint.k2 import K2Client
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.nv import execute

pytestmark = pytest.mark.integration

QUIET_COMMANDS = 300
WINDOW = 4.0  # seconds of victim commands while an attack runs
COMMAND_TIMEOUT = 5.0  # a stalled instance shows as a timeout, not a hung test
LIST_DEADLINE = 5.0
GROWTH_MIB = 10  # per process; without bounds, "opens" grew an instance by 300 MiB
FLOOR = 0.001  # seconds; quiet is about 0.1 ms here
SEND_DEADLINE = 15.0  # for an attacker to get all of its attack out


@dataclass
class Victim:
    ctl: HostdCtl
    client: K2Client
    other: str

    def command(self) -> float:
        start = time.perf_counter()
        random = wire.parse_get_random(execute(self.client.transact, wire.get_random(8)))
        elapsed = time.perf_counter() - start
        assert len(random) == 8
        return elapsed


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Victim]:
    base = tmp_path_factory.mktemp("dos")
    with running(base / "state") as ctl:
        ctl.create_many(["victim", "other"])
        c = boot(ctl, "victim")
        c.close()
        # The TPM is running; this session only sends commands, with a short timeout.
        c = K2Client(c.binding, timeout=COMMAND_TIMEOUT)
        try:
            yield Victim(ctl, c, ctl.instance_id("other"))
        finally:
            c.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Sampler:
    """The highest VmRSS of each process while it runs, from a thread."""

    pids: dict[str, int]
    base: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Sampler:
        self.base = {name: rss_kib(pid) for name, pid in self.pids.items()}
        self.peak = dict(self.base)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, pid in self.pids.items():
                with contextlib.suppress(OSError):  # died: the test sees that elsewhere
                    self.peak[name] = max(self.peak[name], rss_kib(pid))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def growth_mib(self) -> dict[str, float]:
        return {name: (self.peak[name] - self.base[name]) / 1024 for name in self.pids}


class Attack:
    def __init__(self, socket_path: Path, mode: str, target: str, count: int) -> None:
        self.proc = subprocess.Popen(
            helper_command(
                "dos_client", str(socket_path), mode, target, str(count), str(SEND_DEADLINE)
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=helper_env(),
        )

    def sent(self, timeout: float) -> int:
        """What the attacker got into its sockets (-1 if it is still sending)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return -1
        line = self.proc.stdout.readline().decode().split()
        return int(line[1]) if line else -1

    def stop(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()  # it lets its connections go and exits
        stop_process(self.proc, sig=None)
        self.proc.stdout.close()


def timed_list(ctl: HostdCtl) -> tuple[float, dict[str, str]]:
    """How long ``vm list`` took, and the state it gives each VM (which the
    manager asks each instance for, on a new session)."""
    start = time.perf_counter()
    listed = asyncio.run(asyncio.wait_for(ctl.vmm().list(), LIST_DEADLINE))
    return time.perf_counter() - start, {i.name: i.state for i in listed}


ATTACKS = {
    # mode: (count, targets: "instance" = the victim's, "manager")
    "hello": (400, ("instance", "manager")),
    "spread": (200, ("instance", "manager")),
    "opens": (30_000, ("instance",)),
    "pings": (24 << 20, ("hostd",)),  # bytes
}


@pytest.mark.parametrize("mode", list(ATTACKS))
def test_an_attack_does_not_slow_another_vm(victim: Victim, mode: str) -> None:
    ctl = victim.ctl
    victim.command()  # (re)connected after the previous attack
    quiet = statistics.median(victim.command() for _ in range(QUIET_COMMANDS))
    pids = {"hostd": ctl.pid, **{
        ("manager" if name == "manager" else name[:8]): pid
        for name, pid in ctl.enclave_pids().items()
    }}
    count, targets = ATTACKS[mode]
    names = {"instance": ctl.instance_id("victim"), "manager": "manager", "hostd": "-"}
    latencies: list[float] = []
    failures: list[str] = []
    list_time, states = float("inf"), {}
    with Sampler(pids) as memory:
        attacks = [Attack(ctl.state.socket, mode, names[t], count) for t in targets]
        try:
            end = time.monotonic() + WINDOW
            while time.monotonic() < end:
                try:
                    latencies.append(victim.command())
                except TRANSIENT as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
            try:
                list_time, states = timed_list(ctl)
            except Exception as exc:  # a timeout, a refusal: reported below
                failures.append(f"vm list: {type(exc).__name__}: {exc}")
            sent = [a.sent(SEND_DEADLINE) for a in attacks]
        finally:
            for a in attacks:
                a.stop()
    attacked = statistics.median(latencies) if latencies else float("inf")
    growth = memory.growth_mib()
    Numbers(
        {
            "quiet_ms": quiet * 1e3,
            "attacked_ms": attacked * 1e3,
            "commands": len(latencies),
            "list_s": list_time,
            **{f"sent_{t}": s for t, s in zip(targets, sent, strict=True)},
            **{f"rss_{k}_mib": round(v, 1) for k, v in growth.items()},
        }
    ).show(f"dos {mode}")
    assert not failures, failures
    assert attacked <= max(2 * quiet, quiet + FLOOR), (quiet, attacked)
    assert list_time <= LIST_DEADLINE
    assert states == {"victim": "running", "other": "running"}, states
    assert all(v < GROWTH_MIB for v in growth.values()), growth
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids.values())
    assert all(n >= count for n in sent), sent  # the attack did happen, in full
