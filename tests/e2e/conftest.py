"""Fixtures of the end-to-end tests: QEMU, tpm2-tools, tpm2-pytss on real endpoints.

``sgx_hostd`` is the real system, one per test module: hostd, the manager
enclave, and instance enclaves created through it over K1
(tests/helpers/vmtools.py: ``create_vm``); their endpoints are the real
``sgxvtpm vm attach`` / ``vm serve`` processes, talking K2
(tests/helpers/endpoint.py: ``start_vm_endpoint``).

``vtpm_ctrl_factory`` yields ``make(workdir) -> ctrl socket path``, a
QEMU-facing vTPM endpoint, once for each kind: ``local`` (the local endpoint
over a LocalBackend, NOT protected) and ``sgx`` (a new VM on ``sgx_hostd``
behind ``sgxvtpm vm attach``). A test that takes it runs against both.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers.endpoint import CtrlFactory, EndpointProcess, start_local, start_vm_endpoint
from tests.helpers.guest import build_initramfs, missing_tools
from tests.helpers.hostd import Hostd, running_hostd
from tests.helpers.swtpm import swtpm_available
from tests.helpers.vmtools import create_vm

_vm_names = itertools.count(1)


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


@pytest.fixture(scope="module")
def sgx_hostd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostd]:
    with running_hostd(tmp_path_factory.mktemp("sgx") / "state") as hostd:
        yield hostd
        assert hostd.proc is not None and hostd.proc.poll() is None, (
            f"hostd died during the module; log:\n{hostd.log()[-3000:]}"
        )


@pytest.fixture(params=["local", "sgx"])
def vtpm_ctrl_factory(request: pytest.FixtureRequest) -> Iterator[CtrlFactory]:
    sgx: Hostd | None = request.getfixturevalue("sgx_hostd") if request.param == "sgx" else None
    started: list[EndpointProcess] = []

    def make(workdir: Path) -> Path:
        workdir.mkdir(parents=True, exist_ok=True)
        ctrl = workdir / "vtpm.ctrl"
        if sgx is None:
            ep = start_local(workdir / "state", ctrl=ctrl)
        else:
            name = f"qemu-vm{next(_vm_names)}"
            create_vm(sgx, name)
            ep = start_vm_endpoint(sgx.state, name, "--ctrl", str(ctrl), log_dir=workdir)
        started.append(ep)
        return Path(ep.address)

    yield make
    for ep in started:
        assert ep.alive(), "the endpoint died while QEMU used it"
        ep.stop()
