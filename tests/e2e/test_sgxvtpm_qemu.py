"""The QEMU golden test on the real system: the guest's TPM is ``sgxvtpm vm attach``.

Same scenario as test_qemu_boot.py (imported below, so one body serves
both), but the ``vtpm_ctrl_factory`` here creates an instance enclave through
the manager and starts the real ``sgxvtpm vm attach`` process, which forwards
QEMU's control and data channels over K2 to the enclave. The guest must
find tpm0 and read PCR 0-7 equal to a swtpm boot of the same guest in the same
run; ``system_reset`` must reset the PCRs; a second QEMU must attach after the
first one quits.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_qemu_boot import test_pcrs_match_swtpm_reset_and_reattach

from conftest import CtrlFactory, create_vm, start_vm_endpoint
from helpers.endpoint import EndpointProcess
from helpers.hostd import Hostd

pytestmark = pytest.mark.e2e
__all__ = ["test_pcrs_match_swtpm_reset_and_reattach"]  # collected here with our factory

_names = itertools.count(1)


@pytest.fixture
def vtpm_ctrl_factory(sgx_hostd: Hostd) -> Iterator[CtrlFactory]:
    started: list[EndpointProcess] = []

    def make(workdir: Path) -> Path:
        workdir.mkdir(parents=True, exist_ok=True)
        name = f"qemu-vm{next(_names)}"
        create_vm(sgx_hostd, name)
        ep = start_vm_endpoint(sgx_hostd.state, name, "--ctrl", str(workdir / "vtpm.ctrl"),
                               log_dir=workdir)
        started.append(ep)
        return Path(ep.address)

    yield make
    for ep in started:
        assert ep.alive(), "vm attach died while QEMU used it"
        ep.stop()
