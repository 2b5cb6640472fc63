"""hostd's state directory holds no client key; clients pin the platform root (real processes).

The operator's and the VMs' private keys live in the clients' credentials
directory (sgxvtpm/vmm/credentials.py), never with hostd, the untrusted
relay: whatever is readable in its state directory opens neither K1 nor K2.
A client pins the platform's attestation root at first contact and refuses
a host that later presents another one.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.helpers.attacker import in_child, loot_and_use
from tests.helpers.hostd import running_hostd

from sgxvtpm.vmm.client import VmmClient

pytestmark = pytest.mark.integration


def cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sgxvtpm.cli", *args, "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=120,
    )


def test_state_dir_holds_no_usable_client_key(tmp_path: Path) -> None:
    with running_hostd(tmp_path / "state") as h:
        for name in ("vm1", "vm2"):
            asyncio.run(VmmClient(h.state).create(name))
        root_pem = (h.state.platform / "root_ca.pem").read_bytes()
        found = in_child(loot_and_use, h.state.root, root_pem, tmp_path / "attacker")
    assert len(found["instances"]) == 2 and found["read"], found
    # What it found, and what that opened: all three empty.
    assert (found["private_key_files"], found["k1_opened"], found["k2_opened"]) == ([], [], [])


def test_a_replaced_platform_is_refused_by_the_pinned_root(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with running_hostd(state):
        assert cli(state, "vm", "create", "vm1").returncode == 0
    state.rename(tmp_path / "first")
    with running_hostd(state):  # a new platform (another attestation root) at the same place
        listed = cli(state, "vm", "list")
        attested = cli(state, "attest", "verify", "vm1")
        for done in (listed, attested):
            assert done.returncode == 1, done.stdout + done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and "another platform attestation root" in lines[0], lines
        # The way out the message names: remove the pin, and the new root is trusted.
        pin = re.search(r"remove (\S+) to trust", listed.stderr)
        assert pin is not None, listed.stderr
        Path(pin.group(1)).unlink()
        again = cli(state, "vm", "list")
        assert again.returncode == 0, again.stderr


def test_a_binding_written_for_another_endpoint_is_only_there(tmp_path: Path) -> None:
    state, theirs = tmp_path / "state", tmp_path / "endpoint-credentials"
    with running_hostd(state):
        created = cli(state, "vm", "create", "vm1", "--credentials", str(theirs))
        assert created.returncode == 0, created.stderr
        keys = sorted(p.relative_to(theirs).parts[-2:] for p in theirs.rglob("*.key"))
        assert keys == [("vm1", "vm.key")]  # the VM's key, never the operator's
        assert len(list(theirs.rglob("root_ca.pem"))) == 1  # the operator's pin travels along
        assert stat.S_IMODE(theirs.stat().st_mode) == 0o700
        mine = cli(state, "attest", "verify", "vm1")  # the operator kept no binding of vm1
        assert mine.returncode == 1, mine.stderr
        assert "no VM named 'vm1' has credentials in" in mine.stderr
        assert "--credentials DIR" in mine.stderr
        assert len(mine.stderr.splitlines()) == 1
        used = cli(state, "attest", "verify", "vm1", "--credentials", str(theirs))
        assert used.returncode == 0, used.stdout + used.stderr


def test_hostd_refuses_a_state_dir_with_client_keys_of_older_versions(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "vms" / "vm1").mkdir(parents=True)
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for path in (state / "operator.key", state / "vms" / "vm1" / "vm.key"):
        path.write_bytes(pem)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sgxvtpm.cli", "hostd", "--state-dir", str(state)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for part in ("operator.key", "vms/vm1/vm.key", "move operator.key and operator.crt to"):
        assert part in lines[0], lines[0]
    assert not (state / "platform").exists()  # refused before anything was created
