"""Debian's swtpm, the golden peer, started exactly as tcti-swtpm expects it.

``swtpm socket --tpm2 --server type=unixio,path=S --ctrl type=unixio,path=S.ctrl
--tpmstate dir=D --flags not-need-init,startup-clear``: commands work at once
(swtpm has sent TPM2_Startup(CLEAR) itself), tpm2-tools reach it with
``-T swtpm:path=S`` (tcti-swtpm derives the control socket S.ctrl), and
:meth:`Swtpm.transact` opens one data connection per command, as tcti-swtpm
does, so that our code and tpm2-tools can take turns. A test that looks at
swtpm's stream framing holds one data connection itself (:meth:`Swtpm.connect`).
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.helpers.processes import stop_process
from tests.helpers.sockets import recv_tpm_response

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_RC, TPM2_SU
from sgxvtpm.tpm.nv import execute
from sgxvtpm.wire.swtpm_ctrl import CtrlCmd


def swtpm_available() -> bool:
    return shutil.which("swtpm") is not None


class Swtpm:
    """A fresh swtpm TPM 2.0 in ``directory`` (state in directory/state)."""

    def __init__(self, directory: Path, state: Path | None = None) -> None:
        self.path = directory / "tpm.sock"
        self.ctrl_path = directory / "tpm.sock.ctrl"
        self.state = state or directory / "state"
        self.state.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "swtpm", "socket", "--tpm2",
                "--server", f"type=unixio,path={self.path}",
                "--ctrl", f"type=unixio,path={self.ctrl_path}",
                "--tpmstate", f"dir={self.state}",
                "--flags", "not-need-init,startup-clear",
                "--log", f"file={directory / 'swtpm.log'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not (self.path.exists() and self.ctrl_path.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"swtpm did not start (exit {self.proc.poll()})")
            time.sleep(0.01)

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.path}"

    def __enter__(self) -> Swtpm:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(self, timeout: float = 30.0) -> socket.socket:
        """A data connection of the caller's own."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(self.path))
        return s

    def transact(self, command: bytes) -> bytes:
        """One command on a new data connection; the complete response."""
        with self.connect() as s:
            s.sendall(command)
            return recv_tpm_response(s)

    def ctrl(self, code: int, body: bytes = b"") -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.ctrl_path))
            s.sendall(struct.pack(">I", code) + body)
            return s.recv(64)

    def reset(self) -> None:
        """TPM2_Shutdown, _TPM_Init (CMD_INIT), TPM2_Startup(CLEAR): a TPM reset.

        PCR_Allocate takes effect only now.
        """
        wire.check_success(self.transact(wire.shutdown(TPM2_SU.CLEAR)))
        result = self.ctrl(CtrlCmd.INIT, struct.pack(">I", 0))
        if result[:4] != bytes(4):
            raise RuntimeError(f"swtpm CMD_INIT failed: {result.hex()}")
        rc = wire.response_code(self.transact(wire.startup(TPM2_SU.CLEAR)))
        if rc not in (TPM2_RC.SUCCESS, TPM2_RC.INITIALIZE):  # startup-clear may have done it
            raise RuntimeError(f"TPM2_Startup failed: {rc:#x}")

    def persistent_primary(self, template: bytes, hierarchy: int, handle: int) -> int:
        """A primary key made persistent at ``handle`` (as an EK at 0x81010001 is)."""
        command = wire.create_primary(template, hierarchy)
        transient = wire.parse_create_primary(execute(self.transact, command)).handle
        execute(self.transact, wire.evict_control(transient, handle))
        execute(self.transact, wire.flush_context(transient))
        return handle

    def close(self) -> None:
        stop_process(self.proc, timeout=5)


def swtpm_setup(state: Path, workdir: Path, *extra: str) -> float:
    """Run ``swtpm_setup --tpm2 --create-ek-cert --create-platform-cert`` with a local CA.

    The CA (swtpm_localca) lives in ``workdir/localca`` and is created by the
    first run; returns the wall time in seconds.
    """
    localca = workdir / "localca"
    localca.mkdir(parents=True, exist_ok=True)
    conf = workdir / "swtpm-localca.conf"
    conf.write_text(
        f"statedir = {localca}\nsigningkey = {localca}/signkey.pem\n"
        f"issuercert = {localca}/issuercert.pem\ncertserial = {localca}/certserial\n"
    )
    opts = workdir / "swtpm-localca.options"
    opts.write_text(
        "--platform-manufacturer sgxvtpm\n--platform-version 1.0\n--platform-model QEMU\n"
    )
    setup_conf = workdir / "swtpm_setup.conf"
    setup_conf.write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {conf}\ncreate_certs_tool_options = {opts}\n"
        "active_pcr_banks = sha256\n"
    )
    state.mkdir(parents=True, exist_ok=True)
    argv = [
        "swtpm_setup", "--tpm2", "--tpmstate", str(state), "--config", str(setup_conf),
        "--create-ek-cert", "--create-platform-cert", "--overwrite", *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, timeout=120)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"swtpm_setup failed: {proc.stdout.decode()} {proc.stderr.decode()}")
    return elapsed
