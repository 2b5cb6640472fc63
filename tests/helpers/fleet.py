"""Hosts of one fleet on this machine (docs/ARCHITECTURE.md, "Many hosts"): each a real
hostd with its own state directory and loopback fleet port, all under one sim root."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.helpers.hostd import Hostd, running_hostd

from sgxvtpm.platform import init_sim_root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(h: Hostd, *args: str) -> subprocess.CompletedProcess[str]:
    """``sgxvtpm --state-dir <h> ARGS`` as the operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "sgxvtpm.cli", "--state-dir", str(h.state.root), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def vm_state(h: Hostd, name: str) -> str:
    return str(json.loads(ok(cli(h, "vm", "show", name, "--json")))["state"])


def wait_vm_state(h: Hostd, name: str, wanted: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := vm_state(h, name)) != wanted:
        assert time.monotonic() < deadline, f"{name} on {h.state.root} is {now}, not {wanted}"
        time.sleep(0.2)


@contextmanager
def fleet_of(
    base: Path, count: int, launcher: Callable[[int], Sequence[str]] | None = None
) -> Iterator[list[Hostd]]:
    """``count`` hostds under one new sim root; the first invites, the others join.

    ``launcher(i)``: the command host ``i``'s hostd runs under (HostdProcess), if any.
    """
    init_sim_root(base / "root")
    ports = [free_port() for _ in range(count)]
    with ExitStack() as stack:
        hosts = [
            stack.enter_context(running_hostd(base / f"host{i}", args=[
                "--sim-root", str(base / "root"), "--fleet-listen", f"127.0.0.1:{port}"],
                launcher=launcher(i) if launcher else ()))
            for i, port in enumerate(ports)
        ]  # fmt: skip
        address = f"127.0.0.1:{ports[0]}"
        for host, port in zip(hosts[1:], ports[1:], strict=True):
            invite = ok(cli(hosts[0], "fleet", "invite", "--json", "--address", address))
            ok(cli(host, "fleet", "join", address, "--token", json.loads(invite)["token"],
                   "--address", f"127.0.0.1:{port}"))  # fmt: skip
        yield hosts
