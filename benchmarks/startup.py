"""Section: the control socket up after exec, as libvirt waits for it (at most 1000 ms).

libvirt 9.0 starts ``swtpm socket --ctrl type=unixio,path=S ...`` and waits
one second for S to exist before it gives up on the domain. Timed here: exec
of the process until S exists, polled every millisecond, for Debian's swtpm
and for sgxvtpm's libvirt executable (``python -m
sgxvtpm.endpoint.libvirt.swtpm socket``, which binds before its heavy
imports), each on an
idle machine and with every CPU kept busy by a spinning process (a loaded
host). sgxvtpm's target: 300 ms under load. sgxvtpm's is the ``swtpm`` script
``sgxvtpm libvirt path`` writes (``python -IS``: what libvirt runs).

The TPM state directory given to sgxvtpm holds no binding: the socket is up
before the binding is read, and the process then ends (that part is not
timed).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.context import Context
from sgxvtpm.endpoint.libvirt import bindir

TARGET_MS = 300.0
TIMEOUT_S = 10.0


@contextlib.contextmanager
def _busy_cpus() -> Iterator[None]:
    spinners = [subprocess.Popen(["sh", "-c", "while :; do :; done"])
                for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.2)
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def _socket_up(argv: list[str], sock: Path) -> float:
    """Seconds from exec of ``argv`` until ``sock`` exists; the process is then ended."""
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while not sock.exists():
            if time.perf_counter() - t0 > TIMEOUT_S:
                raise TimeoutError(f"{argv[0]}: no socket after {TIMEOUT_S:g} s")
            if proc.poll() is not None and not sock.exists():
                raise RuntimeError(f"{argv[0]} exited ({proc.returncode}) before its socket")
            time.sleep(0.001)
        return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait()


def _argv(kind: str, root: Path, sock: Path) -> list[str]:
    state = root / f"{kind}-state"
    state.mkdir(parents=True, exist_ok=True)
    tail = ["--ctrl", f"type=unixio,path={sock},mode=0600", "--tpmstate",
            f"dir={state},mode=0600", "--log", f"file={root / (kind + '.log')}", "--tpm2"]
    if kind == "swtpm":
        return ["swtpm", "socket", *tail]
    return [str(bindir.ensure(root / "bin") / "swtpm"), "socket", *tail]


def _series(kind: str, root: Path, runs: int) -> dict[str, Any]:
    sock = root / f"{kind}.sock"
    argv = _argv(kind, root, sock)
    times = sorted(_socket_up(argv, sock) * 1000 for _ in range(runs))
    return {"median_ms": statistics.median(times), "p90_ms": times[-(-len(times) * 9 // 10) - 1],
            "max_ms": times[-1], "runs": runs}


def run(ctx: Context) -> dict[str, Any]:
    root = ctx.workdir / "startup"
    root.mkdir(parents=True, exist_ok=True)
    runs = ctx.config.startup_runs
    results: dict[str, Any] = {"ok": True, "target_ms": TARGET_MS}
    for kind in ("swtpm", "sgxvtpm"):
        try:
            idle = _series(kind, root, runs)
            with _busy_cpus():
                loaded = _series(kind, root, runs)
            results[kind] = {"ok": True, "idle": idle, "loaded": loaded}
        except (OSError, RuntimeError) as exc:
            results[kind] = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
    return results


if __name__ == "__main__":  # only this measurement: python -m benchmarks.startup
    import json
    import tempfile

    from benchmarks.config import FULL

    with tempfile.TemporaryDirectory(prefix="sgxvtpm-bench-startup-") as tmp:
        context = Context(Path(tmp), FULL)
        try:
            print(json.dumps(run(context), indent=1))
        finally:
            context.close()
