"""Start vTPM endpoint processes for tests: the local one (NOT protected), the real
``sgxvtpm vm attach``/``vm serve`` (over K2 to an instance enclave), and Debian's swtpm.

All yield the same kind of address (a control socket for QEMU, a tcti-swtpm
path or port, an mssim port) in an :class:`EndpointProcess`, so a test can
run one scenario against each and compare.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.processes import stop_process
from tests.helpers.sockets import recv_tpm_response

from sgxvtpm.host.statedir import StateDir

#: ``make(workdir) -> control socket``: starts a QEMU-facing endpoint in ``workdir``.
CtrlFactory = Callable[[Path], Path]
ENDPOINT_READY_TIMEOUT = 30.0


@dataclass
class EndpointProcess:
    """A running endpoint: its process and where it listens."""

    proc: subprocess.Popen[bytes]
    address: str  # ctrl/unix path, or TCP port as text

    @property
    def port(self) -> int:
        return int(self.address)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        code = stop_process(self.proc, timeout=timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


def free_port_pair() -> int:
    """A TCP port P on 127.0.0.1 with P+1 free too (at the time of asking)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def first_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line a process prints on stdout (stripped), read without blocking past
    ``timeout``; what it printed so far if it ends or the time runs out."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 1)
            if not chunk:
                break
            line += chunk
    return line.decode(errors="replace").strip()


def _read_ready(proc: subprocess.Popen[bytes], timeout: float) -> str:
    text = first_line(proc, timeout)
    if not text.startswith("READY "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"endpoint did not become ready (got {text!r}, rc={proc.returncode})")
    return text.split(" ", 1)[1]


def start_local(
    state_dir: Path, *, ctrl: Path | None = None, swtpm: Path | None = None,
    swtpm_tcp: int | None = None, mssim: int | None = None, frame_timeout: float = 5.0,
) -> EndpointProcess:
    """``python -m sgxvtpm.endpoint.local`` with one listening mode."""
    argv = [sys.executable, "-m", "sgxvtpm.endpoint.local", "--state-dir", str(state_dir),
            "--frame-timeout", str(frame_timeout)]
    if ctrl is not None:
        argv += ["--ctrl", str(ctrl)]
    elif swtpm is not None:
        argv += ["--swtpm", str(swtpm)]
    elif swtpm_tcp is not None:
        argv += ["--swtpm-tcp", f"127.0.0.1:{swtpm_tcp}"]
    elif mssim is not None:
        argv += ["--mssim", f"127.0.0.1:{mssim}"]
    else:
        raise ValueError("choose a mode")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return EndpointProcess(proc, _read_ready(proc, 30.0))


def start_vm_endpoint(state: StateDir, name: str, *mode: str, log_dir: Path) -> EndpointProcess:
    """``sgxvtpm vm attach NAME --ctrl P`` or ``vm serve NAME --swtpm P|--swtpm-tcp|--mssim``.

    Waits for the line the command prints once its socket listens; the
    address is the socket path, or the TCP port.
    """
    command = "attach" if mode[0] == "--ctrl" else "serve"
    # TCP lets every local user in: the tests accept that for their loopback ports.
    consent = ["--allow-any-local-user"] if mode[0] in ("--swtpm-tcp", "--mssim") else []
    log_path = log_dir / f"{name}-{command}.log"
    with open(log_path, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sgxvtpm.cli", "vm", command, name, *mode, *consent,
             "--state-dir", str(state.root)],
            stdout=subprocess.PIPE, stderr=err,
        )
    line = first_line(proc, ENDPOINT_READY_TIMEOUT)
    if not line.startswith(("attached ", "serving ")):
        proc.kill()
        proc.wait()
        raise RuntimeError(
            f"vm {command} did not start (got {line!r}); stderr:\n{log_path.read_text()[-2000:]}"
        )
    address = mode[1]
    if mode[0] in ("--swtpm-tcp", "--mssim"):
        address = address.rpartition(":")[2]
    return EndpointProcess(proc, address)


def start_swtpm_ctrl(state_dir: Path, ctrl: Path) -> EndpointProcess:
    """Debian's swtpm with only a control socket, as libvirt starts it for QEMU."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        ctrl.unlink()
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--ctrl", f"type=unixio,path={ctrl}",
         "--tpmstate", f"dir={state_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not ctrl.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("swtpm did not create its control socket")
        time.sleep(0.02)
    return EndpointProcess(proc, str(ctrl))


def start_libvirt_swtpm(executable: str, tpm_state: Path, ctrl: Path, log: Path, *,
                        env: dict[str, str] | None = None) -> EndpointProcess:
    """``EXECUTABLE socket`` with the arguments libvirt 9.0 gives swtpm for a TPM 2.0
    domain (less ``--daemon``/``--pid``: the test keeps the process as its child).
    Debian's swtpm, or the ``swtpm`` of ``sgxvtpm libvirt path``."""
    with contextlib.suppress(FileNotFoundError):
        ctrl.unlink()
    proc = subprocess.Popen(
        [executable, "socket", "--ctrl", f"type=unixio,path={ctrl},mode=0600",
         "--tpmstate", f"dir={tpm_state},mode=0600", "--log", f"file={log}",
         "--terminate", "--tpm2"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not ctrl.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{executable} did not create its control socket")
        time.sleep(0.01)
    return EndpointProcess(proc, str(ctrl))


class CtrlClient:
    """A blocking swtpm control-channel client built on the sans-IO codec (tests only)."""

    def __init__(self, path: Path | str, *, short_errors: bool, locality_body: int = 4,
                 timeout: float = 10.0) -> None:
        from sgxvtpm.wire import swtpm_ctrl

        self._codec = swtpm_ctrl
        self.short_errors = short_errors
        self.locality_body = locality_body
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.data: socket.socket | None = None

    def request(self, req: object, fds: list[int] | None = None) -> object:
        codec = self._codec
        assert isinstance(req, codec.CtrlRequest)
        raw = codec.encode_request(req, locality_body=self.locality_body)
        if fds:
            socket.send_fds(self.sock, [raw], fds)
        else:
            self.sock.sendall(raw)
        decoder = codec.CtrlResponseDecoder(req.code, short_errors=self.short_errors)
        while True:
            resp = decoder.next_response()
            if resp is not None:
                return resp
            chunk = self.sock.recv(65536)
            decoder.receive_data(chunk)
            if not chunk:
                resp = decoder.next_response()
                if resp is None:
                    raise ConnectionError("control channel closed")
                return resp

    def attach_data(self) -> socket.socket:
        """Create a socketpair and pass one end with SET_DATAFD, as QEMU does."""
        codec = self._codec
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            resp = self.request(codec.CtrlRequest(codec.CtrlCmd.SET_DATAFD), [theirs.fileno()])
        finally:
            theirs.close()
        if not (isinstance(resp, codec.CtrlResponse) and resp.result == 0):
            mine.close()  # refused (another data channel is in use)
            raise AssertionError(resp)
        mine.settimeout(self.sock.gettimeout())
        self.data = mine
        return mine

    def transact(self, command: bytes) -> bytes:
        """One raw TPM command on the data channel; reads header then body."""
        assert self.data is not None
        self.data.sendall(command)
        return recv_tpm_response(self.data)

    def close(self) -> None:
        if self.data is not None:
            self.data.close()
        self.sock.close()
