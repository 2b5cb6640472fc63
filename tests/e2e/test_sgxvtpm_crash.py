"""A real ``vm serve`` across kill -9s, and ``vm destroy`` under a connected endpoint
(SECURITY.md property 19, README "Use").

tpm2-tools drive the endpoint; the instance enclave and hostd are killed -9
between their commands; the endpoint reconnects and resumes by itself, so
the tools see the same PCR 16 and never run tpm2_startup again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers.ek_tools import run_tool
from tests.helpers.endpoint import EndpointProcess, start_vm_endpoint
from tests.helpers.hostd import Hostd, running_hostd
from tests.helpers.vmtools import create_vm, sgxvtpm_cli
from tests.integration.test_crash_resume import instance_pid, kill_hostd

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("tpm2_pcrextend") is None, reason="needs tpm2-tools"),
]
DIGEST = hashlib.sha256(b"measured before the crashes").digest()
EXTENDED = hashlib.sha256(bytes(32) + DIGEST).digest()


@pytest.fixture
def own_hostd(tmp_path: Path) -> Iterator[Hostd]:
    with running_hostd(tmp_path / "state") as h:
        yield h


def pcr16(tcti: str, cwd: Path) -> bytes:
    out = cwd / "pcr16.bin"
    run_tool(tcti, "tpm2_pcrread", "sha256:16", "-o", str(out), cwd=cwd)
    return out.read_bytes()


def served(h: Hostd, name: str, cwd: Path) -> tuple[EndpointProcess, str]:
    create_vm(h, name)
    ep = start_vm_endpoint(h.state, name, "--swtpm", str(cwd / "tpm.sock"), log_dir=cwd)
    tcti = f"swtpm:path={cwd / 'tpm.sock'}"
    run_tool(tcti, "tpm2_startup", "-c", cwd=cwd)
    run_tool(tcti, "tpm2_pcrextend", f"16:sha256={DIGEST.hex()}", cwd=cwd)
    return ep, tcti


def test_vm_serve_resumes_across_instance_and_hostd_kills(
    own_hostd: Hostd, tmp_path: Path
) -> None:
    ep, tcti = served(own_hostd, "crashy", tmp_path)
    try:
        assert pcr16(tcti, tmp_path) == EXTENDED
        os.kill(instance_pid(own_hostd, "crashy"), signal.SIGKILL)
        assert pcr16(tcti, tmp_path) == EXTENDED
        kill_hostd(own_hostd)
        assert pcr16(tcti, tmp_path) == EXTENDED
        assert ep.alive()
    finally:
        ep.stop()
    log = (tmp_path / "crashy-serve.log").read_text()
    assert log.count('"event": "k2.resumed"') == 2, log[-3000:]


def test_destroy_names_the_connected_endpoint_which_exits(
    own_hostd: Hostd, tmp_path: Path
) -> None:
    ep, tcti = served(own_hostd, "doomed", tmp_path)
    try:
        done = sgxvtpm_cli(own_hostd.state, "vm", "destroy", "doomed")
        assert done.returncode == 0, done.stderr
        assert f"pid {ep.proc.pid}" in done.stdout and "vm serve --swtpm" in done.stdout
        assert done.stdout.strip().endswith("destroyed doomed")
        # The endpoint finds out at its next command, and exits with one line.
        run_tool(tcti, "tpm2_pcrread", "sha256:16", cwd=tmp_path, check=False)
        deadline = time.monotonic() + 30
        while ep.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not ep.alive()
        assert ep.proc.returncode != 0
    finally:
        ep.stop()
    lines = (tmp_path / "doomed-serve.log").read_text().strip().splitlines()
    assert lines[-1] == "sgxvtpm: error: VM doomed was destroyed; this endpoint exits"
