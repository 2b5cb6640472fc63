"""Fixtures for the QEMU / tpm2-tools end-to-end tests.

``vtpm_ctrl_factory`` yields a function ``make(workdir) -> ctrl socket path``
that starts a QEMU-facing vTPM endpoint. By default it is the local endpoint
over a LocalBackend (NOT protected); the real ``sgxvtpm vm attach`` can be
swapped in by overriding this fixture (e.g. in a conftest next to a test).

``sgx_hostd`` (one per test module), :func:`create_vm` and
:func:`start_vm_endpoint` run the same scenarios on the real system: hostd,
the manager enclave, instance enclaves, and the ``sgxvtpm vm attach`` /
``vm serve`` endpoint processes over K2.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers.endpoint import EndpointProcess, first_line, start_local, swtpm_available
from helpers.guest import build_initramfs, missing_tools
from helpers.hostd import Hostd, running_hostd
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.vmm.client import VmmClient
from sgxvtpm.wire.k1 import InstanceInfo

CtrlFactory = Callable[[Path], Path]


@pytest.fixture(scope="session")
def qemu_ready() -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(f"QEMU guest tests need: {', '.join(missing)}")
    if not swtpm_available():
        pytest.skip("the golden comparison needs Debian's swtpm")


@pytest.fixture(scope="session")
def initrd(qemu_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(tmp_path_factory.mktemp("initramfs"))


@pytest.fixture
def vtpm_ctrl_factory() -> Iterator[CtrlFactory]:
    started: list[EndpointProcess] = []

    def make(workdir: Path) -> Path:
        workdir.mkdir(parents=True, exist_ok=True)
        ep = start_local(workdir / "state", ctrl=workdir / "vtpm.ctrl")
        started.append(ep)
        return Path(ep.address)

    yield make
    for ep in started:
        ep.stop()


# ---------------------------------------------------------------- the real system
# One hostd (the SGX module, with its manager enclave) per test module; VMs are
# instance enclaves created through the manager over K1, and their endpoints are
# the real ``sgxvtpm vm attach`` / ``vm serve`` processes, talking K2.

ENDPOINT_READY_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def sgx_hostd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostd]:
    with running_hostd(tmp_path_factory.mktemp("sgx") / "state") as hostd:
        yield hostd
        assert hostd.proc is not None and hostd.proc.poll() is None, (
            f"hostd died during the module; log:\n{hostd.log()[-3000:]}"
        )


def create_vm(hostd: Hostd, name: str, **kw: object) -> InstanceInfo:
    """``vm create`` through the manager enclave (K1); writes the VM's binding to the
    session's credentials directory (tests/conftest.py)."""
    return asyncio.run(VmmClient(hostd.state).create(name, **kw))  # type: ignore[arg-type]


def sgxvtpm_cli(state: StateDir, *args: str, timeout: float = 120.0
                ) -> subprocess.CompletedProcess[str]:
    """``python -m sgxvtpm.cli ARGS --state-dir STATE``."""
    return subprocess.run(
        [sys.executable, "-m", "sgxvtpm.cli", *args, "--state-dir", str(state.root)],
        capture_output=True, text=True, timeout=timeout,
    )


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
