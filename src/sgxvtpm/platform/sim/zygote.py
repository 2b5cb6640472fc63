"""The zygote: a pre-imported Python that forks one process per enclave.

Forked by the sim CPU's process before it reads the platform (:mod:`.cpu_boot`),
or started by the CPU as an isolated interpreter when it restarts one; it
holds no platform secret. It imports the heavy modules once (cryptography, ssl,
ctypes and the caller's list), runs the ``zygote_warm_up(platform_for,
verifier)`` function of each pre-imported module that has one on a throwaway
in-memory platform (so that lazily built library tables are built once,
here), and freezes the GC so that forked children keep sharing those pages
(the GC stays off until then, so no collection leaves freed holes in shared
pages for children to fill), then
serves launch requests on the control socket. Each launch brings the
enclave's stream to the host and its ENCLU socket to the CPU (SCM_RIGHTS),
and is answered with a pidfd of the new process. It reaps its children, and
exits when the CPU goes away; running enclaves end when their stream closes.

Measured shared libraries (libtpms) are staged once per distinct content in a
sealed memfd (:class:`.codeimport.SharedLibraries`, from the first launch
that carries them) and handed down to each enclave that measures the same
bytes, which checks it before use: idle instances share libtpms' pages.

The zygote is made non-dumpable first thing, so that another process of its
user (hostd, when it runs as the same unprivileged user) cannot ptrace it and
inject code that every later enclave would inherit.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import resource
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sgxvtpm.platform.base import EnclaveIdentity, EnclavePlatform, QuoteVerifier
from sgxvtpm.platform.sim import codeimport
from sgxvtpm.platform.sim.enclu import SimEnclaveClient
from sgxvtpm.platform.sim.measure import CodeFile
from sgxvtpm.platform.sim.spawn import set_dumpable, set_process_name
from sgxvtpm.platform.sim.zygote_proto import (
    ZygoteGone,
    recv_message,
    send_message,
    unpack_code,
    wait_readable,
)
from sgxvtpm.util import heap

DEFAULT_PRELOAD = ("cryptography", "ssl", "ctypes", "sgxvtpm.platform.sim")


def main(argv: list[str] | None = None) -> int:
    opts = _parse_args(argv)
    gc.disable()
    set_dumpable(False)
    heap.keep_large_blocks_mapped()  # launch messages (util/heap.py)
    ctl = socket.socket(fileno=opts.control_fd)
    os.set_inheritable(ctl.fileno(), False)
    modules = [
        importlib.import_module(name)
        for name in (*DEFAULT_PRELOAD, *filter(None, opts.preload.split(",")))
    ]
    platform_for, verifier = _throwaway_platform()
    for module in modules:
        warm_up = getattr(module, "zygote_warm_up", None)
        if warm_up is not None:
            warm_up(platform_for, verifier)
    del platform_for, verifier
    digests = codeimport.source_digests()
    libraries = codeimport.SharedLibraries()
    gc.freeze()  # keep refcount/GC writes from un-sharing pre-imported pages
    gc.enable()  # for what the zygote allocates from here on (frozen objects stay put)
    try:
        send_message(ctl, {"ready": True, "pid": os.getpid()})
    except ZygoteGone:  # the CPU ended while this started (its platform would not open)
        return 0
    while True:
        _reap()
        if not wait_readable(ctl.fileno(), 0.5):
            continue
        try:
            header, blob, fds = recv_message(ctl)
        except ZygoteGone:
            return 0
        _serve(ctl, digests, libraries, header, blob, fds)
        # The launch's bytes (~1.5 MB of measured code) go now, not when the
        # next request replaces them; the child has its own copy.
        del header, blob, fds
        heap.release_free_memory()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sgxvtpm-sim-zygote")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--preload", default="")
    return p.parse_args(argv)


def _throwaway_platform() -> tuple[Callable[[EnclaveIdentity], EnclavePlatform], QuoteVerifier]:
    """A platform made up in memory for the warm-up session, then dropped.

    Its keys are random and certify nothing anyone trusts; it exists so the
    warm-up can run a real attested handshake without any platform secret.
    """
    import datetime

    from sgxvtpm.platform.sim import egetkey, provision
    from sgxvtpm.platform.sim.counters import CounterStore
    from sgxvtpm.platform.sim.enclave import SimEnclavePlatform, dcap_verifier
    from sgxvtpm.platform.sim.quote import QuotingEnclave

    keys = provision.PlatformKeys.generate()
    platform_id = os.urandom(16)
    now = datetime.datetime.now(datetime.UTC)
    certification = provision.certify(keys, platform_id, now)
    collateral = provision.collateral(keys.root_ca, certification.root_pem, now)
    base_key = egetkey.derive_base_key(os.urandom(32))
    qe = QuotingEnclave(base_key, keys.attestation, certification, platform_id)
    counters = CounterStore(Path("/nonexistent"), bytes(32))  # never used by the warm-up
    report_key_id = os.urandom(32)

    def platform_for(identity: EnclaveIdentity) -> EnclavePlatform:
        return SimEnclavePlatform(
            identity,
            base_key=base_key,
            quoting_enclave=qe,
            counters=counters,
            report_key_id=report_key_id,
            collateral=collateral,
        )

    return platform_for, dcap_verifier(certification.root_pem, collateral)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _serve(
    ctl: socket.socket,
    digests: Mapping[str, bytes],
    libraries: codeimport.SharedLibraries,
    header: dict[str, Any],
    blob: bytearray,
    fds: list[int],
) -> None:
    if len(fds) != 2 or header.get("op") != "launch":
        for fd in fds:
            os.close(fd)
        send_message(ctl, {"ok": False, "error": "bad request"})
        return
    stream_fd, enclu_fd = fds
    try:
        code, config = unpack_code(header, blob)
        stale = codeimport.stale_preloads(code, digests)
        if stale:
            send_message(ctl, {"ok": False, "stale": stale, "error": "stale pre-imports"})
            return
        staged = libraries.for_launch(code)
        pid = os.fork()
        if pid == 0:
            _child(ctl, header, code, config, stream_fd, enclu_fd, blob, staged)
        pidfd = os.pidfd_open(pid)
        try:
            send_message(ctl, {"ok": True, "pid": pid}, fds=[pidfd])
        finally:
            os.close(pidfd)
    except (ValueError, KeyError, OSError) as exc:
        send_message(ctl, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        os.close(stream_fd)
        os.close(enclu_fd)


def _child(
    ctl: socket.socket,
    header: Mapping[str, Any],
    code: list[CodeFile],
    config: bytes,
    stream_fd: int,
    enclu_fd: int,
    blob: bytearray,
    staged: Mapping[str, int],
) -> None:
    """In the forked enclave process: harden, reach the CPU, run the measured entry."""
    status = 1
    try:
        ctl.detach()
        # Only our own staged libraries stay open (the zygote's others close).
        _harden(str(header["name"]), (stream_fd, enclu_fd, *staged.values()))
        # The CPU measured these bytes and bound that identity to our ENCLU
        # socket; from here on only they run (codeimport), and the platform
        # answers for that identity alone.
        enclave = SimEnclaveClient(socket.socket(fileno=enclu_fd), config=config)
        codeimport.install(code, staged)
        _release_launch_data(code, blob)
        module_name, _, func_name = str(header["entry"]).partition(":")
        entry = getattr(importlib.import_module(module_name), func_name)
        stream = socket.socket(fileno=stream_fd)
        entry(enclave, stream, header.get("args", {}))
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def _release_launch_data(code: list[CodeFile], blob: bytearray) -> None:
    """Free the measured bytes once measured and installed.

    The launch message (~1.5 MB: libtpms and the sources) would otherwise stay
    referenced by this process's frames for its whole life, and its pages
    become private to the enclave as soon as the zygote reuses its copy.
    """
    code.clear()
    blob.clear()
    heap.release_free_memory()


def _harden(name: str, keep_fds: tuple[int, ...]) -> None:
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    # Non-dumpable: no core dumps, and other same-uid processes cannot ptrace
    # it or read /proc/PID/mem (the closest a process gets to EPC isolation).
    set_dumpable(False)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    set_process_name(f"enclave:{name}")
    sys.argv = [f"sgxvtpm-enclave:{name}"]
    low = 3
    for fd in sorted(keep_fds):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


if __name__ == "__main__":
    sys.exit(main())
