"""The zygote: a pre-imported Python that forks one process per enclave.

Run by :class:`~sgxvtpm.platform.sim.loader.SimLoader` as
``python -m sgxvtpm.platform.sim.zygote --control-fd N --platform-dir D
[--preload a,b]``. It imports the heavy modules once (cryptography, ssl,
ctypes and the caller's list), runs the ``zygote_warm_up(platform_for,
verifier)`` function of each pre-imported module that has one (so that
lazily built library tables are built once, here), freezes the GC so that
forked children keep sharing those pages, then serves launch requests on the control socket. Each
launch gets the enclave's stream end by SCM_RIGHTS and answers with a pidfd
of the new process (so the loader can signal and wait for it without pid
reuse races). It reaps its children, and exits when the loader goes away;
running enclaves are left to end when their stream closes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import logging
import os
import resource
import signal
import socket
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sgxvtpm.platform.sim import codeimport
from sgxvtpm.platform.sim.measure import CodeFile, identity_of
from sgxvtpm.platform.sim.platform_dir import SimPlatformDir
from sgxvtpm.platform.sim.zygote_proto import (
    ZygoteGone,
    recv_message,
    send_message,
    wait_readable,
)

DEFAULT_PRELOAD = ("cryptography", "ssl", "ctypes", "sgxvtpm.platform.sim")
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15

log = logging.getLogger(__name__)



def main(argv: list[str] | None = None) -> int:
    opts = _parse_args(argv)
    ctl = socket.socket(fileno=opts.control_fd)
    os.set_inheritable(ctl.fileno(), False)
    modules = [
        importlib.import_module(name)
        for name in (*DEFAULT_PRELOAD, *filter(None, opts.preload.split(",")))
    ]
    platform = SimPlatformDir(opts.platform_dir)
    platform.quoting_enclave  # noqa: B018 - unwrap the attestation key once, before forking
    platform.counters  # noqa: B018
    for module in modules:
        warm_up = getattr(module, "zygote_warm_up", None)
        if warm_up is not None:
            warm_up(platform.enclave_platform, platform.verifier())
    digests = codeimport.source_digests()
    gc.collect()
    gc.freeze()  # keep refcount/GC writes from un-sharing pre-imported pages
    send_message(ctl, {"ready": True, "pid": os.getpid()})
    while True:
        _reap()
        if not wait_readable(ctl.fileno(), 0.5):
            continue
        try:
            header, blob, fds = recv_message(ctl)
        except ZygoteGone:
            return 0
        _serve(ctl, platform, digests, header, blob, fds)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sgxvtpm-sim-zygote")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--platform-dir", required=True)
    p.add_argument("--preload", default="")
    return p.parse_args(argv)


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
    platform: SimPlatformDir,
    digests: Mapping[str, bytes],
    header: dict[str, Any],
    blob: bytearray,
    fds: list[int],
) -> None:
    if len(fds) != 1 or header.get("op") != "launch":
        for fd in fds:
            os.close(fd)
        send_message(ctl, {"ok": False, "error": "bad request"})
        return
    stream_fd = fds[0]
    try:
        code, config = _unpack_code(header, blob)
        stale = codeimport.stale_preloads(code, digests)
        if stale:
            send_message(ctl, {"ok": False, "stale": stale, "error": "stale pre-imports"})
            return
        pid = os.fork()
        if pid == 0:
            _child(ctl, platform, header, code, config, stream_fd, blob)
        pidfd = os.pidfd_open(pid)
        try:
            send_message(ctl, {"ok": True, "pid": pid}, fds=[pidfd])
        finally:
            os.close(pidfd)
    except (ValueError, KeyError, OSError) as exc:
        send_message(ctl, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        os.close(stream_fd)


def _unpack_code(header: Mapping[str, Any], blob: bytearray) -> tuple[list[CodeFile], bytes]:
    offset = int(header["config_len"])
    with memoryview(blob) as view:
        config = bytes(view[:offset])
        code = []
        for name, path, size in header["files"]:
            code.append(CodeFile(str(name), Path(path), bytes(view[offset : offset + int(size)])))
            offset += int(size)
    if offset != len(blob):
        raise ValueError("launch blob length does not match its file list")
    return code, config


def _child(
    ctl: socket.socket,
    platform: SimPlatformDir,
    header: Mapping[str, Any],
    code: list[CodeFile],
    config: bytes,
    stream_fd: int,
    blob: bytearray,
) -> None:
    """In the forked enclave process: harden, build the platform, run the entry."""
    status = 1
    try:
        ctl.detach()
        _harden(str(header["name"]), stream_fd)
        # The enclave measures the bytes it is about to run itself.
        identity = identity_of(
            str(header["entry"]),
            code,
            config,
            bytes.fromhex(header["signer_public_key"]),
            int(header["isv_prod_id"]),
            int(header["isv_svn"]),
        )
        enclave = platform.enclave_platform(identity, config=config)
        codeimport.check_data_files(code)
        codeimport.install(code)
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
    _malloc_trim()


def _malloc_trim() -> None:
    with contextlib.suppress(AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


def _harden(name: str, keep_fd: int) -> None:
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    libc = ctypes.CDLL(None, use_errno=True)
    # Non-dumpable: no core dumps, and other same-uid processes cannot ptrace
    # it or read /proc/PID/mem (the closest a process gets to EPC isolation).
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(f"enclave:{name}".encode()[:15]), 0, 0, 0)
    sys.argv = [f"sgxvtpm-enclave:{name}"]
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, os.sysconf("SC_OPEN_MAX"))


if __name__ == "__main__":
    sys.exit(main())
