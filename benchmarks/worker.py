"""Benchmark worker: one measurement in its own process, JSON on stdout.

libtpms holds one TPM per process (engine.py), and a client that shares a
process with the orchestrator would pay for its threads, so every target is
measured from a fresh worker:

    python -m benchmarks.worker '{"job": "latency", "target": {...}, "cheap": 2000}'
    python -m benchmarks.worker '{"job": "load", "paths": [...], "duration": 3.0}'

The last stdout line is the JSON result: ``{"ok": true, ...}`` or
``{"ok": false, "reason": "..."}``.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.latency import Iterations, Transport, measure, startup
from benchmarks.transports import EngineTransport, K2Transport, SocketTransport, recv_response
from sgxvtpm.tpm import wire


def open_target(target: dict[str, Any]) -> Transport:
    kind = target["kind"]
    if kind == "engine":
        return EngineTransport()
    if kind == "socket":
        return SocketTransport(target["path"])
    if kind == "k2":
        return K2Transport(Path(target["state_dir"]), target["name"], Path(target["credentials"]))
    raise ValueError(f"unknown target kind {kind!r}")


def latency_job(config: dict[str, Any]) -> dict[str, Any]:
    iterations = Iterations.scaled(int(config["cheap"]))
    transport = open_target(config["target"])
    try:
        results = measure(transport, iterations)
    finally:
        transport.close()
    return {"ok": True, "commands": {name: s.as_dict() for name, s in results.items()}}


def probe_job(config: dict[str, Any]) -> dict[str, Any]:
    """Median GetRandom(32) latency over a few commands (the scale phase's probe)."""
    transport = open_target(config["target"])
    try:
        startup(transport)
        command = wire.get_random(32)
        samples = []
        for _ in range(int(config.get("n", 50))):
            t0 = time.perf_counter_ns()
            wire.check_success(transport.transact(command))
            samples.append(time.perf_counter_ns() - t0)
    finally:
        transport.close()
    samples.sort()
    return {"ok": True, "median_us": samples[len(samples) // 2] / 1000, "n": len(samples)}


@dataclass(frozen=True)
class _Cpu:
    on_cpu_ns: int  # all threads, from /proc/PID/task/*/schedstat (nanoseconds)
    user_ticks: int  # proc(5) stat fields 14 and 15, in clock ticks
    sys_ticks: int


def _cpu(pid: int) -> _Cpu:
    on_cpu = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            on_cpu += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return _Cpu(on_cpu, int(fields[11]), int(fields[12]))


def _cpu_per_command(before: _Cpu, after: _Cpu, n: int) -> tuple[float, float | None]:
    """(CPU µs per command, of which user µs or None if too few ticks to tell)."""
    total = (after.on_cpu_ns - before.on_cpu_ns) / n / 1000
    user, system = after.user_ticks - before.user_ticks, after.sys_ticks - before.sys_ticks
    if user + system < 20:  # clock ticks are 10 ms: the split would be noise
        return total, None
    return total, total * user / (user + system)


def cpu_job(config: dict[str, Any]) -> dict[str, Any]:
    """Wall time and CPU time per GetRandom(32), per process on the path.

    ``pids`` names the server-side processes (swtpm; or hostd, the instance
    enclave and the endpoint); the client is this worker. Where the time of
    a cheap command goes: CPU in each hop (user: Python and libtpms; system:
    the kernel, mostly socket I/O and waking the next process), and the rest
    is waiting.
    """
    transport = open_target(config["target"])
    pids: dict[str, int] = config.get("pids", {})
    n = int(config.get("n", 2000))
    command = wire.get_random(32)
    try:
        startup(transport)
        for _ in range(max(50, n // 10)):
            transport.transact(command)
        pids = {**pids, "client": os.getpid()}
        before = {name: _cpu(pid) for name, pid in pids.items()}
        wall0 = time.perf_counter()
        for _ in range(n):
            transport.transact(command)
        wall1 = time.perf_counter()
        after = {name: _cpu(pid) for name, pid in pids.items()}
    finally:
        transport.close()
    per = {name: _cpu_per_command(before[name], after[name], n) for name in pids}
    return {
        "ok": True,
        "n": n,
        "wall_us": (wall1 - wall0) / n * 1e6,
        "cpu_us": {name: total for name, (total, _) in per.items()},
        "user_us": {name: user for name, (_, user) in per.items() if user is not None},
    }


def ping_all_job(config: dict[str, Any]) -> dict[str, Any]:
    """Ask every target for GetRandom(8) on a new connection; how many answered."""
    answered, failures = 0, []
    for target in config["targets"]:
        try:
            transport = open_target(target)
            try:
                startup(transport)
                wire.check_success(transport.transact(wire.get_random(8)))
                answered += 1
            finally:
                transport.close()
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
    return {
        "ok": True,
        "answered": answered,
        "total": len(config["targets"]),
        "first_failure": failures[0] if failures else "",
    }


class _Conn:
    """One VM's closed loop: send a command, wait for its answer, send the next."""

    def __init__(self, path: str, commands: list[bytes]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.commands = commands
        self.next = 0
        self.done = 0

    def send(self) -> None:
        self.sock.sendall(self.commands[self.next])
        self.next = (self.next + 1) % len(self.commands)

    def receive(self) -> None:
        response = recv_response(self.sock)
        if response[6:10] != b"\0\0\0\0":
            raise RuntimeError(f"TPM error {response[6:10].hex()} under load")
        self.done += 1


def load_job(config: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop GetRandom(32)/PCR_Extend mix on every path for ``duration`` s.

    All connections share one selector in this process; a command is
    counted when its response has arrived. Commands in flight when the time
    is up are drained and not counted.
    """
    digest = bytes(range(32))
    commands = [wire.get_random(32), wire.pcr_extend(16, digest)]
    conns = [_Conn(path, commands) for path in config["paths"]]
    for conn in conns:
        startup(SocketLike(conn.sock))
    start_at = float(config.get("start_at", 0.0))
    while time.time() < start_at:  # several load workers start together
        time.sleep(0.001)
    selector = selectors.DefaultSelector()
    for conn in conns:
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        conn.send()
    warmup_end = time.perf_counter() + float(config.get("warmup", 0.5))
    counted_from: dict[int, int] = {}
    end = warmup_end + float(config["duration"])
    while True:
        now = time.perf_counter()
        if now >= warmup_end and not counted_from:
            counted_from = {id(c): c.done for c in conns}
        if now >= end:
            break
        for key, _ in selector.select(timeout=1.0):
            conn = key.data
            conn.receive()
            conn.send()
    completed = sum(c.done - counted_from[id(c)] for c in conns)
    for key in list(selector.get_map().values()):
        key.data.receive()  # the last command of each connection
        key.data.sock.close()
    return {"ok": True, "completed": completed, "seconds": float(config["duration"])}


class SocketLike:
    """A :class:`Transport` over an already connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def transact(self, command: bytes) -> bytes:
        self.sock.sendall(command)
        return recv_response(self.sock)

    def close(self) -> None:
        self.sock.close()


JOBS = {
    "latency": latency_job,
    "probe": probe_job,
    "load": load_job,
    "ping_all": ping_all_job,
    "cpu": cpu_job,
}


def main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    try:
        result = JOBS[config["job"]](config)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        result = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
