"""The sim loader: the untrusted half of the SGX module, in hostd.

``launch`` reads the spec's code files once and sends those bytes, the
spec's SIGSTRUCT and the enclave's stream to the sim CPU (:mod:`.cpu`),
which measures the bytes, checks the SIGSTRUCT (EINIT), has its zygote fork
the enclave, and answers with the measured identity and a pidfd. The child
imports the measured modules from those same bytes and loads measured
libraries from them (:mod:`.codeimport`): the code measured is the code run.
The loader itself never sees a platform secret.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sgxvtpm.platform.base import EnclaveIdentity, EnclaveSpec, LaunchedEnclave, PlatformError
from sgxvtpm.platform.gramine.bootstrap import (
    COLLATERAL_FILE_ARG,
    PUBLIC_COLLATERAL,
    encode_launch_args,
)
from sgxvtpm.platform.sim.measure import CodeFile, read_code
from sgxvtpm.platform.sim.report import parse_report_body
from sgxvtpm.platform.sim.spawn import (
    CLEAN_ENV,
    end_child,
    isolated_command,
    launch_over_pair,
)
from sgxvtpm.platform.sim.zygote_proto import (
    ZygoteGone,
    first_message,
    recv_message,
    send_message,
    wait_readable,
)


class SimEnclaveHandle(LaunchedEnclave):
    """base.EnclaveHandle for one enclave process, held through a pidfd."""

    def __init__(
        self, name: str, identity: EnclaveIdentity, pid: int, pidfd: int, stream: socket.socket
    ) -> None:
        super().__init__(name, identity, pid, stream)
        self._pidfd = pidfd

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
    """base.Loader for the sim platform at ``platform_dir``.

    It holds no platform secret: it starts the sim CPU (:mod:`.cpu`) on the
    platform directory and sends it code bytes, SIGSTRUCTs and streams.
    ``release`` ("module:function", called with :data:`.backend.SIM`): the
    enclaves the platform's vendor key signs, built by the CPU from its own
    installed code (:func:`signed` hands out their SIGSTRUCTs).
    ``presigned`` (hostd --release DIR, :mod:`.release`): the vendor's
    SIGSTRUCTs by enclave name; the CPU then signs nothing and holds no
    vendor key, and these are what :func:`signed` hands out.
    """

    def __init__(
        self,
        platform_dir: Path,
        *,
        preload: Sequence[str] = (),
        python: str = sys.executable,
        release: str = "",
        gramine_sim: bool = False,
        sim_root: Path | None = None,
        presigned: Mapping[str, bytes] | None = None,
    ) -> None:
        self._dir = Path(platform_dir)
        self._lock = threading.Lock()
        self._handles: list[SimEnclaveHandle] = []
        self._proc: subprocess.Popen[bytes] | None = None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = ["--control-fd", str(child.fileno()), "--platform-dir", str(self._dir)]
        args += ["--preload", ",".join(preload)]
        if presigned is not None:
            args += ["--presigned"]
        elif release:
            args += ["--release", release]
        if gramine_sim:
            args += ["--gramine-sim"]
        if sim_root is not None:
            args += ["--sim-root", str(Path(sim_root).resolve())]
        self.gramine_sim = gramine_sim
        try:
            self._proc = subprocess.Popen(
                isolated_command(python, "sgxvtpm.platform.sim.cpu_boot", args),
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                env=CLEAN_ENV,
                cwd="/",
                # Its own session: like the hardware it plays, it outlives a
                # killed hostd (and its process group) while enclaves run.
                start_new_session=True,
            )
        finally:
            child.close()
        self._ctl: socket.socket | None = parent
        ready = first_message(parent, "the sim CPU", self.close)
        if not ready.get("ready"):
            self.close()
            raise PlatformError(f"the sim platform cannot start: {ready.get('error')}")
        self.cpu_pid = int(ready["pid"])
        self.zygote_pid = int(ready["zygote_pid"])
        self.signer_public_key = bytes.fromhex(ready["signer_public_key"])
        self.attestation_root_pem = bytes.fromhex(ready["root_pem"])
        self.platform_id = bytes.fromhex(ready["platform_id"])
        self._sigstructs = (
            dict(presigned)
            if presigned is not None
            else {k: bytes.fromhex(v) for k, v in ready["sigstructs"].items()}
        )
        self._release_code: dict[tuple[Path, ...], list[CodeFile]] = {}

    def signed(self, spec: EnclaveSpec) -> EnclaveSpec:
        """``spec`` with the SIGSTRUCT the platform made for the release enclave of its name.

        Whether it fits ``spec``'s code is EINIT's question, at launch. The
        release's code is read here, once: hostd calls this before it drops
        root, and its user may not be able to read the installed code (every
        relaunch then sends these same bytes).
        """
        try:
            signed = dataclasses.replace(spec, sigstruct=self._sigstructs[spec.name])
        except KeyError:
            raise PlatformError(f"the platform signed no enclave named {spec.name!r}") from None
        self._release_code[tuple(spec.code_files)] = read_code(spec.code_files)
        return signed

    # -- launching ----------------------------------------------------------------
    def launch(self, spec: EnclaveSpec, args: Mapping[str, Any]) -> SimEnclaveHandle:
        code = self._release_code.get(tuple(spec.code_files)) or read_code(spec.code_files)
        header = {
            "op": "launch",
            "name": spec.name,
            "entry": spec.entry,
            "isv_prod_id": spec.isv_prod_id,
            "isv_svn": spec.isv_svn,
            "debug": spec.debug,
            "sigstruct": spec.sigstruct.hex(),
            "config_len": len(spec.config),
            "files": [[f.name, str(f.path), len(f.data)] for f in code],
            "args": dict(args),
        }
        blob = spec.config + b"".join(f.data for f in code)

        def send(enclave_end: int) -> tuple[dict[str, Any], list[int]]:
            reply, _, fds = self._request(header, blob, [enclave_end])
            return reply, fds

        reply, launched = launch_over_pair(send)
        if launched is None:
            raise PlatformError(f"enclave launch failed: {reply.get('error')}")
        host_end, pidfd = launched
        identity = parse_report_body(bytes.fromhex(reply["identity"])).identity
        if self.gramine_sim:
            # The Gramine bootstrap reads its launch arguments as the first stdin frame.
            try:
                public = self._dir.resolve().parent / PUBLIC_COLLATERAL  # as the launcher's
                host_end.sendall(encode_launch_args({COLLATERAL_FILE_ARG: str(public), **args}))
            except OSError as exc:
                os.close(pidfd)
                host_end.close()
                raise PlatformError(f"enclave launch failed: {exc}") from None
        self.zygote_pid = int(reply["zygote_pid"])
        handle = SimEnclaveHandle(spec.name, identity, int(reply["pid"]), pidfd, host_end)
        with self._lock:
            alive = []
            for old in self._handles:
                if old.running():
                    alive.append(old)
                else:
                    old.stop(0)  # the process is gone: release its pidfd and stream
            self._handles = [*alive, handle]
        return handle

    def probe_quote(self, report_data: bytes) -> bytes:
        """The CPU's quote of the platform's probe identity (SimPlatformDir.probe_quote)."""
        reply, _, _ = self._request({"op": "probe_quote"}, report_data)
        if not reply.get("ok"):
            raise PlatformError(f"the platform gives no quote: {reply.get('error')}")
        return bytes.fromhex(reply["quote"])

    def replace_collateral(self, collateral: str) -> None:
        """Hand the platform new collateral for the enclaves it launches from now on;
        PlatformError if it does not verify the platform's quote under its root."""
        reply, _, _ = self._request({"op": "replace_collateral"}, collateral.encode())
        if not reply.get("ok"):
            raise PlatformError(f"the platform refused the collateral: {reply.get('error')}")

    def _request(
        self, header: dict[str, Any], blob: bytes = b"", fds: list[int] | None = None
    ) -> tuple[dict[str, Any], bytearray, list[int]]:
        with self._lock:
            if self._ctl is None or self._proc is None or self._proc.poll() is not None:
                raise PlatformError("the sim CPU process is gone; restart hostd")
            try:
                send_message(self._ctl, header, blob, fds or [])
                return recv_message(self._ctl)
            except ZygoteGone as exc:
                raise PlatformError(f"the sim CPU process is gone: {exc}") from None

    def close(self) -> None:
        """Stop every enclave this loader launched, then the CPU (and its zygote)."""
        with self._lock:
            handles, self._handles = self._handles, []
        for handle in handles:
            handle.stop()
        with self._lock:
            end_child(self._ctl, self._proc, timeout=10)
            self._ctl, self._proc = None, None

    def __enter__(self) -> SimLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
