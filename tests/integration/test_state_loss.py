"""Lost or removed state is refused, never silently replaced (real hostd, real enclaves).

- a missing manager registry whose platform counter exists: hostd refuses to
  start with one line; only ``hostd --reset-manager`` starts a new registry,
  above the old counter;
- a missing ``state.sealed`` of a provisioned instance: that VM is in error
  (tampering), not "unprovisioned";
- an existing but incomplete platform directory: hostd refuses to start
  instead of provisioning a new platform over it;
- VM names: one safe path component, short enough for the certificate CN.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from tests.helpers.hostd import running_hostd, wait_ready
from tests.helpers.processes import stop_process
from tests.helpers.sealedfiles import sealed_version

from sgxvtpm.channel import ChannelError
from sgxvtpm.endpoint.k2 import K2Client, K2Error, VmBinding
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.vmm.client import VmmClient, VmmError
from sgxvtpm.vmm.credentials import Credentials

pytestmark = pytest.mark.integration


def hostd_argv(state: StateDir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sgxvtpm.cli", "hostd", "--state-dir", str(state.root), *extra]


def hostd_refuses(state: StateDir, *extra: str, timeout: float = 60.0) -> str:
    """Run hostd, which must exit non-zero by itself; its one ``sgxvtpm: error:`` line."""
    proc = subprocess.Popen(
        hostd_argv(state, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(['hostd', *extra])} kept running instead of refusing to start")
    assert proc.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("sgxvtpm: error:")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def registry_version(state: StateDir) -> int:
    return sealed_version(state.manager / "registry.sealed")


def vm_list(state: StateDir) -> list[str]:
    return [i.name for i in asyncio.run(VmmClient(state).list())]


def test_missing_registry_is_refused_until_the_operator_resets(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    with running_hostd(state.root):
        asyncio.run(VmmClient(state).create("vm1"))
    old_version = registry_version(state)
    # What the attack did: remove the registry (the operator's identity is not
    # in hostd's directory to remove any more).
    (state.manager / "registry.sealed").unlink()

    line = hostd_refuses(state)
    assert "manager enclave refused to start" in line
    assert "registry.sealed is missing" in line and "tampering" in line
    assert "--reset-manager" in line
    assert not (state.manager / "registry.sealed").exists()  # no fresh registry, nothing pinned
    with pytest.raises(VmmError, match="cannot reach hostd"):
        vm_list(state)

    # The explicit fresh start: says what is lost, starts above the old counter.
    log_path = tmp_path / "reset.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            hostd_argv(state, "--reset-manager"), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(state.socket, 60, proc)
        assert vm_list(state) == []
        assert registry_version(state) > old_version
    finally:
        assert stop_process(proc, timeout=30, group=True) == 0
    text = log_path.read_text()
    assert "every VM registered on this host becomes unrecoverable" in text
    assert '"manager.registry_reset"' in text

    # Done once: an intact registry is never reset, and a plain start opens it.
    assert "registry is intact" in hostd_refuses(state, "--reset-manager")
    with running_hostd(state.root):
        asyncio.run(VmmClient(state).create("vm2"))
        assert vm_list(state) == ["vm2"]


def test_missing_instance_state_is_tampering_not_unprovisioned(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    with running_hostd(state.root):
        info = asyncio.run(VmmClient(state).create("gone"))
        asyncio.run(VmmClient(state).create("kept"))
    (state.instance(info.instance_id) / "state.sealed").unlink()
    with running_hostd(state.root) as hostd:
        shown = asyncio.run(VmmClient(state).show("gone"))
        assert shown.state == "error", shown
        assert "missing" in shown.reason and "tampering" in shown.reason, shown
        assert asyncio.run(VmmClient(state).show("kept")).state == "running"
        assert '"instance.state_refused"' in hostd.log()
        with pytest.raises((ChannelError, K2Error)):
            client = K2Client(VmBinding.load(state, "gone"), timeout=30)
            try:
                client.power_on()
            finally:
                client.close()


def test_hostd_refuses_an_incomplete_platform_instead_of_provisioning_anew(
    tmp_path: Path,
) -> None:
    state = StateDir(tmp_path / "state")
    with running_hostd(state.root):  # an absent platform directory is provisioned
        pass
    platform = state.platform
    for name in ("platform.json", "fuse.key"):
        saved = (platform / name).read_bytes()
        (platform / name).unlink()
        before = {p.name: p.read_bytes() for p in platform.iterdir() if p.is_file()}
        line = hostd_refuses(state, timeout=30)
        assert f"the sim platform at {platform} is incomplete or damaged" in line, line
        assert {p.name: p.read_bytes() for p in platform.iterdir() if p.is_file()} == before
        (platform / name).write_bytes(saved)
        (platform / name).chmod(0o600)


BAD_NAMES = [".", "..", ".hidden", "-rf", "a/b", "../vms", "a b", "", "x" * 62]


def test_vm_names_are_one_safe_component_that_fits_the_certificate(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    with running_hostd(state.root):
        vmm = VmmClient(state)
        for bad in BAD_NAMES:
            with pytest.raises(VmmError, match="bad VM name"):
                asyncio.run(vmm.create(bad))
        longest = "n" * 61
        asyncio.run(vmm.create(longest))
        assert vm_list(state) == [longest]
    host = Credentials.at(None).host(state)
    cert = x509.load_pem_x509_certificate((host.vm(longest) / "vm.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"vm:{longest}"
    # Nothing of a refused name reached the credentials directory.
    assert sorted(p.name for p in host.vm(longest).parent.iterdir()) == [longest]
    assert not (host.root / "vm.key").exists() and not (host.root / "vm.crt").exists()
