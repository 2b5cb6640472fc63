"""tpm2-tools, unchanged, against the real ``sgxvtpm vm serve`` over each TCTI.

The test bodies are test_tpm2_tools.py's (imported below); the ``tools``
fixture here gives each TCTI (tcti-swtpm unix, tcti-swtpm TCP, tcti-mssim)
its own instance enclave, created through the manager, behind a real
``sgxvtpm vm serve`` process that forwards every command over K2.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from test_tpm2_tools import (
    TCTIS,
    Tools,
    test_create_load_sign_verify,
    test_getrandom,
    test_nv_define_write_read,
    test_pcrextend_pcrread,
    test_policy_pcr_sealed_object,
)

from conftest import create_vm, start_vm_endpoint
from helpers.endpoint import free_port_pair
from helpers.hostd import Hostd

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("tpm2_startup") is None, reason="needs tpm2-tools"),
]
__all__ = [  # collected here again, with the fixture below
    "test_create_load_sign_verify",
    "test_getrandom",
    "test_nv_define_write_read",
    "test_pcrextend_pcrread",
    "test_policy_pcr_sealed_object",
]


@pytest.fixture(scope="module", params=TCTIS)
def tools(request: pytest.FixtureRequest, sgx_hostd: Hostd,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tools]:
    kind = str(request.param)
    work = tmp_path_factory.mktemp(f"sgx-{kind}")
    name = f"tools-{kind}"
    create_vm(sgx_hostd, name)
    if kind == "swtpm-unix":
        ep = start_vm_endpoint(sgx_hostd.state, name, "--swtpm", str(work / "tpm.sock"),
                               log_dir=work)
        tcti = f"swtpm:path={ep.address}"
    elif kind == "swtpm-tcp":
        ep = start_vm_endpoint(sgx_hostd.state, name, "--swtpm-tcp",
                               f"127.0.0.1:{free_port_pair()}", log_dir=work)
        tcti = f"swtpm:host=127.0.0.1,port={ep.port}"
    else:
        ep = start_vm_endpoint(sgx_hostd.state, name, "--mssim",
                               f"127.0.0.1:{free_port_pair()}", log_dir=work)
        tcti = f"mssim:host=127.0.0.1,port={ep.port}"
    t = Tools(tcti, work)
    t.run("startup", "-c")
    yield t
    assert ep.alive(), "vm serve died during the tests"
    ep.stop()
