"""One endpoint per VM: a second session cannot reset (or use) a running TPM.

Real hostd, manager and instance enclaves; real ``sgxvtpm vm serve``
processes driven by tpm2-tools; tpm2-pytss through ``K2Tcti``. A VM's TPM
has one platform at a time: a second ``vm serve`` or ``K2Tcti.open`` is
refused while the first holds the VM (the instance enclave enforces it, so a
client that skips the endpoint is refused too), a takeover must be asked
for, and no endpoint start resets a running TPM: PCR 16, extended through
the first endpoint, keeps its value through all of it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers.ek_tools import run_tool
from tests.helpers.endpoint import EndpointProcess, first_line, start_vm_endpoint
from tests.helpers.hostd import Hostd
from tests.helpers.vmtools import create_vm

from sgxvtpm.endpoint.k2 import K2Client, K2Error, VmBinding
from sgxvtpm.tpm import wire

tpm2_pytss = pytest.importorskip("tpm2_pytss")

from tpm2_pytss import ESAPI  # noqa: E402

from sgxvtpm.endpoint.tcti import K2Tcti  # noqa: E402

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("tpm2_pcrextend") is None, reason="needs tpm2-tools"),
]
DIGEST = hashlib.sha256(b"measured by the VM's first endpoint").digest()
EXTENDED = hashlib.sha256(bytes(32) + DIGEST).digest()  # PCR 16 after one extend from reset


def serve(h: Hostd, name: str, sock: Path, *extra: str) -> tuple[EndpointProcess, str]:
    ep = start_vm_endpoint(h.state, name, "--swtpm", str(sock), *extra, log_dir=sock.parent)
    return ep, f"swtpm:path={sock}"


def pcr16(tcti: str, cwd: Path) -> bytes:
    out = cwd / "pcr16.bin"
    run_tool(tcti, "tpm2_pcrread", "sha256:16", "-o", str(out), cwd=cwd)
    return out.read_bytes()


def booted(h: Hostd, name: str, cwd: Path) -> tuple[EndpointProcess, str]:
    """A VM whose first endpoint started its TPM and extended PCR 16 once."""
    create_vm(h, name)
    ep, tcti = serve(h, name, cwd / "first.sock")
    run_tool(tcti, "tpm2_startup", "-c", cwd=cwd)
    run_tool(tcti, "tpm2_pcrextend", f"16:sha256={DIGEST.hex()}", cwd=cwd)
    assert pcr16(tcti, cwd) == EXTENDED
    return ep, tcti


def esapi_pcr16(tcti: K2Tcti) -> bytes:
    esapi = ESAPI(tcti)
    try:
        return bytes(esapi.pcr_read("sha256:16")[2][0])
    finally:
        esapi.close()


def refused_serve(h: Hostd, name: str, sock: Path) -> subprocess.CompletedProcess[str]:
    """A second ``vm serve``, which must exit at once (it never prints its serving line)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sgxvtpm.cli", "vm", "serve", name, "--swtpm", str(sock),
         "--state-dir", str(h.state.root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        line = first_line(proc, 60.0)
        assert not line.startswith("serving"), f"a second endpoint started: {line}"
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, line, err.decode())


def test_second_vm_serve_is_refused_and_pcrs_survive(sgx_hostd: Hostd, tmp_path: Path) -> None:
    first, tcti = booted(sgx_hostd, "one-serve", tmp_path)
    try:
        second = refused_serve(sgx_hostd, "one-serve", tmp_path / "second.sock")
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith("sgxvtpm: error: one-serve already has a connected endpoint")
        assert f"pid {first.proc.pid}" in lines[0] and "use --takeover to replace it" in lines[0]
        assert not (tmp_path / "second.sock").exists()
        assert pcr16(tcti, tmp_path) == EXTENDED
        assert first.alive()
    finally:
        first.stop()


def test_k2tcti_is_refused_then_opens_without_a_reset(sgx_hostd: Hostd, tmp_path: Path) -> None:
    first, _ = booted(sgx_hostd, "one-tcti", tmp_path)
    try:
        with pytest.raises(K2Error, match="one-tcti already has a connected endpoint") as busy:
            K2Tcti.open("one-tcti", sgx_hostd.state.root).finalize()
        assert "takeover=True" in str(busy.value)
    finally:
        first.stop()
    tcti = K2Tcti.open("one-tcti", sgx_hostd.state.root)  # the default starts, never resets
    try:
        assert esapi_pcr16(tcti) == EXTENDED
    finally:
        tcti.finalize()


def test_takeover_replaces_the_endpoint_without_a_reset(sgx_hostd: Hostd, tmp_path: Path) -> None:
    first, first_tcti = booted(sgx_hostd, "one-takeover", tmp_path)
    third: EndpointProcess | None = None
    try:
        tcti = K2Tcti.open("one-takeover", sgx_hostd.state.root, takeover=True)
        try:
            assert esapi_pcr16(tcti) == EXTENDED
            # The first endpoint lost its session and is refused a new one meanwhile.
            lost = run_tool(first_tcti, "tpm2_pcrread", "sha256:16", cwd=tmp_path, check=False)
            assert lost.returncode != 0
        finally:
            tcti.finalize()
        # Its own session gone, the first endpoint attaches again on its next command.
        assert pcr16(first_tcti, tmp_path) == EXTENDED
        third, third_tcti = serve(sgx_hostd, "one-takeover", tmp_path / "third.sock",
                                  "--takeover")
        assert pcr16(third_tcti, tmp_path) == EXTENDED
        assert run_tool(first_tcti, "tpm2_getrandom", "8", cwd=tmp_path,
                        check=False).returncode != 0
    finally:
        first.stop()
        if third is not None:
            third.stop()


class _SkipsAttach(K2Client):
    """A client with the VM's key that skips the endpoint's attach step, as a
    hostile process that bypasses ``vm serve`` would."""

    def _attach(self) -> None:
        return


def test_a_session_that_does_not_attach_reaches_no_tpm(sgx_hostd: Hostd, tmp_path: Path) -> None:
    first, tcti = booted(sgx_hostd, "one-bypass", tmp_path)
    try:
        with _SkipsAttach(VmBinding.load(sgx_hostd.state, "one-bypass")) as rogue:
            with pytest.raises(K2Error, match="0x15"):  # TPM_RESOURCES: the VM is held
                rogue.power_on()
            with pytest.raises(K2Error, match="0x15"):
                rogue.transact(wire.pcr_read([16]))
        assert pcr16(tcti, tmp_path) == EXTENDED
    finally:
        first.stop()
    rogue = _SkipsAttach(VmBinding.load(sgx_hostd.state, "one-bypass"))
    with rogue, pytest.raises(K2Error, match="0xa"):  # TPM_BAD_ORDINAL: attach first
        rogue.power_on()


def test_a_dead_endpoint_does_not_hold_the_vm(sgx_hostd: Hostd, tmp_path: Path) -> None:
    first, _ = booted(sgx_hostd, "one-dead", tmp_path)
    os.kill(first.proc.pid, signal.SIGKILL)  # no goodbye: the instance sees the close
    first.stop()
    again, tcti = serve(sgx_hostd, "one-dead", tmp_path / "again.sock")
    try:
        assert pcr16(tcti, tmp_path) == EXTENDED  # started again, not reset
    finally:
        again.stop()
