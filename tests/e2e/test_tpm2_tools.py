"""tpm2-tools, unchanged, against our TSS endpoints over each TCTI.

The TCTIs are tpm2-tss's own libraries (tcti-swtpm over unix and TCP,
tcti-mssim). Each runs against two endpoints: ``local``, the local vTPM
(LocalBackend, NOT protected) in its own process, and ``sgx``, the real
``sgxvtpm vm serve`` of an instance enclave created through the manager,
which forwards every command over K2.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers.endpoint import (
    EndpointProcess,
    free_port_pair,
    start_local,
    start_vm_endpoint,
)
from tests.helpers.hostd import Hostd
from tests.helpers.vmtools import create_vm

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("tpm2_startup") is None, reason="needs tpm2-tools"),
]
TCTIS = ["swtpm-unix", "swtpm-tcp", "mssim"]
ENDPOINTS = [f"{backend}-{tcti}" for backend in ("local", "sgx") for tcti in TCTIS]


class Tools:
    def __init__(self, tcti: str, cwd: Path) -> None:
        self.tcti = tcti
        self.cwd = cwd

    def run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            [f"tpm2_{tool}", "-T", self.tcti, *args], cwd=self.cwd, capture_output=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"tpm2_{tool} {' '.join(args)} failed ({proc.returncode}): "
                f"{proc.stderr.decode(errors='replace')}"
            )
        return proc

    def flush(self) -> None:
        self.run("flushcontext", "-t")
        self.run("flushcontext", "-s")


def _start_local(kind: str, work: Path) -> EndpointProcess:
    if kind == "swtpm-unix":
        return start_local(work / "state", swtpm=work / "tpm.sock")
    if kind == "swtpm-tcp":
        return start_local(work / "state", swtpm_tcp=free_port_pair())
    return start_local(work / "state", mssim=free_port_pair())


def _start_sgx(kind: str, work: Path, hostd: Hostd) -> EndpointProcess:
    name = f"tools-{kind}"
    create_vm(hostd, name)
    flag = {"swtpm-unix": "--swtpm", "swtpm-tcp": "--swtpm-tcp", "mssim": "--mssim"}[kind]
    where = str(work / "tpm.sock") if kind == "swtpm-unix" else f"127.0.0.1:{free_port_pair()}"
    return start_vm_endpoint(hostd.state, name, flag, where, log_dir=work)


@pytest.fixture(scope="module", params=ENDPOINTS)
def tools(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Tools]:
    backend, _, kind = str(request.param).partition("-")
    work = tmp_path_factory.mktemp(str(request.param))
    if backend == "local":
        ep = _start_local(kind, work)
    else:
        ep = _start_sgx(kind, work, request.getfixturevalue("sgx_hostd"))
    if kind == "swtpm-unix":
        tcti = f"swtpm:path={ep.address}"
    elif kind == "swtpm-tcp":
        tcti = f"swtpm:host=127.0.0.1,port={ep.port}"
    else:
        tcti = f"mssim:host=127.0.0.1,port={ep.port}"
    t = Tools(tcti, work)
    t.run("startup", "-c")
    yield t
    assert ep.alive(), "the endpoint died during the tests"
    ep.stop()


def test_getrandom(tools: Tools) -> None:
    a = tools.run("getrandom", "16", "--hex").stdout
    b = tools.run("getrandom", "16", "--hex").stdout
    assert len(a) == 32 and int(a, 16) >= 0 and a != b


def test_pcrextend_pcrread(tools: Tools) -> None:
    tools.run("pcrread", "sha256:16", "-o", "pcr16.bin")
    old = (tools.cwd / "pcr16.bin").read_bytes()
    digest = hashlib.sha256(b"measured thing").hexdigest()
    tools.run("pcrextend", f"16:sha256={digest}")
    tools.run("pcrread", "sha256:16", "-o", "pcr16.bin")
    new = (tools.cwd / "pcr16.bin").read_bytes()
    assert new == hashlib.sha256(old + bytes.fromhex(digest)).digest()


def test_create_load_sign_verify(tools: Tools) -> None:
    (tools.cwd / "msg.dat").write_bytes(b"sign me")
    (tools.cwd / "bad.dat").write_bytes(b"sign me!")
    tools.run("createprimary", "-C", "o", "-G", "ecc", "-c", "primary.ctx")
    tools.run("create", "-C", "primary.ctx", "-G", "ecc", "-u", "key.pub", "-r", "key.priv")
    tools.flush()
    tools.run("load", "-C", "primary.ctx", "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx")
    tools.flush()
    tools.run("sign", "-c", "key.ctx", "-g", "sha256", "-o", "sig.bin", "msg.dat")
    tools.flush()
    tools.run("verifysignature", "-c", "key.ctx", "-g", "sha256", "-m", "msg.dat",
              "-s", "sig.bin")
    tools.flush()
    bad = tools.run("verifysignature", "-c", "key.ctx", "-g", "sha256", "-m", "bad.dat",
                    "-s", "sig.bin", check=False)
    assert bad.returncode != 0
    tools.flush()


def test_nv_define_write_read(tools: Tools) -> None:
    data = bytes(range(32))
    (tools.cwd / "nv.in").write_bytes(data)
    tools.run("nvdefine", "0x1500020", "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite")
    tools.run("nvwrite", "0x1500020", "-C", "o", "-i", "nv.in")
    out = tools.run("nvread", "0x1500020", "-C", "o", "-s", "32").stdout
    assert out == data


def test_policy_pcr_sealed_object(tools: Tools) -> None:
    secret = b"only while PCR 23 matches"
    (tools.cwd / "secret.dat").write_bytes(secret)
    tools.run("createprimary", "-C", "o", "-G", "ecc", "-c", "sprimary.ctx")
    tools.run("pcrread", "sha256:23", "-o", "pcr23.bin")
    tools.run("createpolicy", "--policy-pcr", "-l", "sha256:23", "-f", "pcr23.bin",
              "-L", "policy.dat")
    tools.run("create", "-C", "sprimary.ctx", "-L", "policy.dat", "-i", "secret.dat",
              "-u", "seal.pub", "-r", "seal.priv")
    tools.flush()
    tools.run("load", "-C", "sprimary.ctx", "-u", "seal.pub", "-r", "seal.priv", "-c", "seal.ctx")
    tools.flush()
    assert tools.run("unseal", "-c", "seal.ctx", "-p", "pcr:sha256:23").stdout == secret
    tools.flush()
    tools.run("pcrextend", "23:sha256=" + "ab" * 32)
    denied = tools.run("unseal", "-c", "seal.ctx", "-p", "pcr:sha256:23", check=False)
    assert denied.returncode != 0 and secret not in denied.stdout
    tools.flush()
