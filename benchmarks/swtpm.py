"""Debian's swtpm, the peer: started as libvirt and tcti-swtpm users start it.

``swtpm socket --tpm2 --server type=unixio,path=S --ctrl type=unixio,path=S.ctrl
--tpmstate dir=D --flags not-need-init,startup-clear``. Instances with EK
certificates are made by ``swtpm_setup --tpm2 --create-ek-cert
--create-platform-cert`` with swtpm_localca as the CA, as libvirt does.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from benchmarks.transports import recv_response
from sgxvtpm.tpm import wire

START_TIMEOUT = 20.0


class Swtpm:
    """One swtpm process serving a TPM 2.0 from ``directory/state``."""

    def __init__(self, directory: Path, state: Path | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.path = directory / "swtpm.sock"
        self.ctrl_path = directory / "swtpm.sock.ctrl"
        self.state = state or directory / "state"
        self.state.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--server",
                f"type=unixio,path={self.path}",
                "--ctrl",
                f"type=unixio,path={self.ctrl_path}",
                "--tpmstate",
                f"dir={self.state}",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_answering(self, timeout: float = START_TIMEOUT) -> None:
        wait_answering(self.path, self.proc, timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_answering(
    path: Path, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT
) -> None:
    """Until the raw data socket at ``path`` answers GetRandom(8) (any TPM response)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(path))
                s.sendall(wire.get_random(8))
                wire.response_code(recv_response(s))  # any TPM answer will do
                return
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answers at {path}") from None
            time.sleep(0.002)


class LocalCa:
    """swtpm_localca's configuration in ``workdir``; its CA is made on first use."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        ca = workdir / "localca"
        ca.mkdir(exist_ok=True)
        conf = workdir / "swtpm-localca.conf"
        conf.write_text(
            f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
            f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
        )
        options = workdir / "swtpm-localca.options"
        options.write_text(
            "--platform-manufacturer sgxvtpm-bench\n--platform-version 1.0\n--platform-model QEMU\n"
        )
        self.setup_conf = workdir / "swtpm_setup.conf"
        self.setup_conf.write_text(
            "create_certs_tool = /usr/bin/swtpm_localca\n"
            f"create_certs_tool_config = {conf}\n"
            f"create_certs_tool_options = {options}\n"
            "active_pcr_banks = sha256\n"
        )

    def setup(self, state: Path) -> None:
        """swtpm_setup with an RSA-2048 and an ECC P-256 EK, both certified, and a
        platform certificate (swtpm_setup's defaults for --tpm2 with --create-ek-cert)."""
        state.mkdir(parents=True, exist_ok=True)
        argv = [
            "swtpm_setup",
            "--tpm2",
            "--tpmstate",
            str(state),
            "--config",
            str(self.setup_conf),
            "--create-ek-cert",
            "--create-platform-cert",
            "--overwrite",
        ]
        proc = subprocess.run(argv, capture_output=True, timeout=300, check=False)
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode(errors="replace").strip()
            raise RuntimeError(f"swtpm_setup failed ({proc.returncode}): {out[-300:]}")


def swtpm_version() -> str:
    proc = subprocess.run(["swtpm", "--version"], capture_output=True, text=True, check=False)
    return proc.stdout.strip().splitlines()[0] if proc.stdout else "unknown"
