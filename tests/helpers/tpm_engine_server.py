"""Child process holding one LibtpmsEngine, driven by tests/helpers/tpm.py.

libtpms keeps one TPM per process, so every test that needs a fresh engine
talks to one of these. Protocol on stdin/stdout: u32 length + pickle of
``(op, args)``; the answer is u32 length + pickle of ``("ok", value)`` or
``("err", type name, message, cause type name)``. Test-only code: the peer is
the test process itself.

Usage: python -m tests.helpers.tpm_engine_server [STATE_DIR]   (no dir: state in memory)
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers.sockets import read_exact

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.engine import LibtpmsEngine, MemoryStateStore, StateType


class DirStateStore:
    """Blobs as files, written atomically (temp, fsync, rename, fsync dir)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self, name: str) -> bytes | None:
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            return None

    def store(self, name: str, data: bytes) -> None:
        tmp = self.directory / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / name)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)


class FaultyStore:
    """Wraps a store; raises OSError(ENOSPC/EIO) on demand, counts calls."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.fail_store = False
        self.fail_load = False
        self.calls: list[tuple[str, str]] = []

    def load(self, name: str) -> bytes | None:
        self.calls.append(("load", name))
        if self.fail_load:
            raise OSError(errno.EIO, "injected read error")
        data: bytes | None = self.inner.load(name)
        return data

    def store(self, name: str, data: bytes) -> None:
        self.calls.append(("store", name))
        if self.fail_store:
            raise OSError(errno.ENOSPC, "injected: no space left on device")
        self.inner.store(name, data)

    def delete(self, name: str) -> None:
        self.calls.append(("delete", name))
        self.inner.delete(name)


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def getrandom_loop(engine: LibtpmsEngine, count: int) -> tuple[int, int, int]:
    """RSS (KiB) after a warm-up and after ``count`` GetRandom(32); bad answers."""
    cmd = wire.get_random(32)
    for _ in range(2000):
        engine.process(cmd)
    before = rss_kib()
    bad = 0
    for _ in range(count):
        if len(engine.process(cmd)) != 44:
            bad += 1
    return before, rss_kib(), bad


def state_loop(engine: LibtpmsEngine, count: int) -> tuple[int, int]:
    """RSS (KiB) before and after ``count`` get_state(VOLATILE) (~9 KB blobs)."""
    for _ in range(50):
        engine.get_state(StateType.VOLATILE)
    before = rss_kib()
    for _ in range(count):
        engine.get_state(StateType.VOLATILE)
    return before, rss_kib()


def _median_us(fn: Any, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000


def bench(engine: LibtpmsEngine, n: int) -> dict[str, float]:
    """Median in-process latency (us) of a few commands; engine started up."""
    rand = wire.get_random(32)
    ext = wire.pcr_extend(16, hashlib.sha256(b"bench").digest())
    create = wire.create_primary(wire.ecc_p256_template())

    def create_flush() -> None:
        handle = wire.parse_create_primary(engine.process(create)).handle
        engine.process(wire.flush_context(handle))

    # flush is timed too; measure it alone and subtract
    flush_only = wire.flush_context(0x80FFFFFF)
    return {
        "GetRandom(32)": _median_us(lambda: engine.process(rand), n),
        "PCR_Extend": _median_us(lambda: engine.process(ext), n),
        "CreatePrimary P-256 (+FlushContext)": _median_us(create_flush, max(20, n // 50)),
        "FlushContext (bad handle)": _median_us(lambda: engine.process(flush_only), n),
    }


class Server:
    def __init__(self, state_dir: Path | None) -> None:
        inner = DirStateStore(state_dir) if state_dir else MemoryStateStore()
        self.store = FaultyStore(inner)
        self.engine = LibtpmsEngine(self.store)

    def dispatch(self, op: str, args: tuple[Any, ...]) -> Any:
        e = self.engine
        simple: dict[str, Callable[..., Any]] = {
            "start": e.start,
            "stop": e.stop,
            "process": e.process,
            "get_state": lambda kind: e.get_state(StateType(kind)),
            "set_state": lambda kind, data: e.set_state(StateType(kind), data),
            "set_buffer_size": e.set_buffer_size,
            "established": e.established,
            "reset_established": e.reset_established,
            "store_volatile": e.store_volatile,
            "ensure_orderly_shutdown": e.ensure_orderly_shutdown,
            "running": lambda: e.running,
            "get_info": e.get_info,
        }
        if op in simple:
            return simple[op](*args)
        if op == "process_many":
            return [e.process(c) for c in args[0]]
        if op == "store_error":
            err = e.store_error
            return None if err is None else (type(err).__name__, getattr(err, "errno", None))
        if op == "fail":
            self.store.fail_store, self.store.fail_load = args
            return None
        if op == "store_calls":
            calls, self.store.calls = self.store.calls, []
            return calls
        if op == "second_engine_start":
            LibtpmsEngine().start()
            return None
        if op == "getrandom_loop":
            return getrandom_loop(e, *args)
        if op == "state_loop":
            return state_loop(e, *args)
        if op == "bench":
            return bench(e, *args)
        raise ValueError(f"unknown op {op!r}")


def main() -> None:
    server = Server(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    rx, tx = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            (length,) = struct.unpack(">I", read_exact(rx.read, 4))
        except ConnectionError:  # the parent closed our stdin
            return
        op, args = pickle.loads(read_exact(rx.read, length))
        try:
            reply: tuple[Any, ...] = ("ok", server.dispatch(op, args))
        except Exception as exc:
            cause = exc.__cause__
            reply = ("err", type(exc).__name__, str(exc), type(cause).__name__ if cause else None)
        out = pickle.dumps(reply)
        tx.write(struct.pack(">I", len(out)) + out)
        tx.flush()


if __name__ == "__main__":
    main()
