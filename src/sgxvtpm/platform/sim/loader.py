"""The sim loader: measures enclaves and launches them from a zygote.

``launch`` reads the spec's code files once, computes the identity from those
bytes (MRENCLAVE over entry, files and config; MRSIGNER from the signer key;
ISVPRODID/ISVSVN from the spec) and sends the very same bytes to the zygote,
whose child re-measures them, imports the measured modules from them and runs
the entry: the code measured is the code run (see :mod:`.codeimport`).

The zygote is restarted if it has died (or holds stale pre-imports of
measured modules) and the launch is retried once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sgxvtpm.platform.base import EnclaveIdentity, EnclaveSpec, PlatformError
from sgxvtpm.platform.sim.measure import CodeFile, identity_of, read_code
from sgxvtpm.platform.sim.zygote_proto import (
    ZygoteGone,
    recv_message,
    send_message,
    wait_readable,
)

log = logging.getLogger(__name__)

_READY_TIMEOUT = 60.0




class SimEnclaveHandle:
    """base.EnclaveHandle for one enclave process, held through a pidfd."""

    def __init__(
        self, name: str, identity: EnclaveIdentity, pid: int, pidfd: int, stream: socket.socket
    ) -> None:
        self._name = name
        self._identity = identity
        self._pid = pid
        self._pidfd = pidfd
        self._stream = stream

    @property
    def name(self) -> str:
        return self._name

    @property
    def identity(self) -> EnclaveIdentity:
        return self._identity

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def stream(self) -> socket.socket:
        return self._stream

    def running(self) -> bool:
        return self._pidfd >= 0 and not self.wait(0)

    def wait(self, timeout: float) -> bool:
        """True once the enclave process has exited (within ``timeout`` seconds)."""
        if self._pidfd < 0:
            return True
        readable = wait_readable(self._pidfd, timeout)
        return bool(readable)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; closes the stream."""
        if self._pidfd >= 0:
            try:
                if not self.wait(0):
                    self._signal(signal.SIGTERM)
                    if not self.wait(timeout):
                        self._signal(signal.SIGKILL)
                        self.wait(timeout)
            finally:
                os.close(self._pidfd)
                self._pidfd = -1
        self._stream.close()

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)


class SimLoader:
    """base.Loader for the sim platform at ``platform_dir``."""

    def __init__(
        self,
        platform_dir: Path,
        *,
        preload: Sequence[str] = (),
        python: str = sys.executable,
    ) -> None:
        self._dir = Path(platform_dir)
        self._preload = list(preload)
        self._python = python
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._handles: list[SimEnclaveHandle] = []
        self.zygote_pid = 0
        with self._lock:
            self._start_zygote()

    def launch(self, spec: EnclaveSpec, args: Mapping[str, Any]) -> SimEnclaveHandle:
        code = read_code(spec.code_files)
        identity = identity_of(
            spec.entry, code, spec.config, spec.signer_public_key, spec.isv_prod_id, spec.isv_svn
        )
        header = {
            "op": "launch",
            "name": spec.name,
            "entry": spec.entry,
            "signer_public_key": spec.signer_public_key.hex(),
            "isv_prod_id": spec.isv_prod_id,
            "isv_svn": spec.isv_svn,
            "config_len": len(spec.config),
            "files": [[f.name, str(f.path), len(f.data)] for f in code],
            "args": dict(args),
        }
        blob = spec.config + b"".join(f.data for f in code)
        host_end, enclave_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid, pidfd = self._launch(header, blob, enclave_end, code)
        except BaseException:
            host_end.close()
            raise
        finally:
            enclave_end.close()
        handle = SimEnclaveHandle(spec.name, identity, pid, pidfd, host_end)
        with self._lock:
            alive = []
            for old in self._handles:
                if old.running():
                    alive.append(old)
                else:
                    old.stop(0)  # the process is gone: release its pidfd and stream
            self._handles = [*alive, handle]
        log.debug("launched enclave %s pid %d", spec.name, pid)
        return handle

    def _launch(
        self, header: dict[str, Any], blob: bytes, enclave_end: socket.socket, code: list[CodeFile]
    ) -> tuple[int, int]:
        with self._lock:
            for attempt in (1, 2):
                if self._ctl is None or self._proc is None or self._proc.poll() is not None:
                    self._restart_zygote()
                assert self._ctl is not None
                try:
                    send_message(self._ctl, header, blob, [enclave_end.fileno()])
                    reply, _, fds = recv_message(self._ctl)
                except ZygoteGone:
                    log.warning("enclave zygote died; restarting it")
                    self._restart_zygote()
                    continue
                if reply.get("ok") and len(fds) == 1:
                    return int(reply["pid"]), fds[0]
                for fd in fds:
                    os.close(fd)
                if reply.get("stale") and attempt == 1:
                    log.info("zygote pre-imported outdated %s; restarting it", reply["stale"])
                    self._restart_zygote()
                    continue
                raise PlatformError(f"enclave launch failed: {reply.get('error')}")
        raise PlatformError("enclave launch failed: the zygote keeps dying")

    def _start_zygote(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        cmd = [
            self._python,
            "-m",
            "sgxvtpm.platform.sim.zygote",
            "--control-fd",
            str(child.fileno()),
            "--platform-dir",
            str(self._dir),
            "--preload",
            ",".join(self._preload),
        ]
        try:
            self._proc = subprocess.Popen(
                cmd, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, env=env
            )
        finally:
            child.close()
        self._ctl = parent
        if not wait_readable(parent.fileno(), _READY_TIMEOUT):
            self._stop_zygote()
            raise PlatformError("the enclave zygote did not start in time")
        try:
            reply, _, _ = recv_message(parent)
        except ZygoteGone as exc:
            self._stop_zygote()
            raise PlatformError("the enclave zygote failed to start (see its stderr)") from exc
        self.zygote_pid = int(reply["pid"])

    def _restart_zygote(self) -> None:
        self._stop_zygote()
        self._start_zygote()

    def _stop_zygote(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """Stop every enclave this loader launched, then the zygote."""
        with self._lock:
            handles, self._handles = self._handles, []
        for handle in handles:
            handle.stop()
        with self._lock:
            self._stop_zygote()

    def __enter__(self) -> SimLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
