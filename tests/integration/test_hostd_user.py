"""hostd --user: started as root, it runs as an unprivileged user (real processes).

A process with hostd's uid and gid reads everything in hostd's state
directory it can and finds no private key, cannot read the platform's
secrets or hostd's memory, and opens neither K1 as the operator nor K2 as a
VM with anything it found; the same attempts with the real credentials
succeed (so the refusals are the enclaves').
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tests.helpers.attacker import cli_in_child, in_child, loot_and_use
from tests.helpers.hostd import Hostd

from sgxvtpm.channel import ClientCredential

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="hostd --user is for a hostd started as root"),
]

USER = "nobody"
UID, GID = pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory the unprivileged user can traverse (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="sgxvtpm-user-"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def ids_of(pid: int) -> tuple[int, int]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


def pems(credential: ClientCredential) -> tuple[str, str]:
    key = credential.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key.decode(), credential.cert_pem.decode()


def test_hostd_uid_can_read_and_use_no_key(shared_tmp: Path) -> None:
    h = Hostd(shared_tmp / "state", args=["--user", USER])
    h.start()
    try:
        for name in ("vm1", "vm2"):
            asyncio.run(h.vmm().create(name))
        h.stop()
        h.start()  # hands what the enclaves wrote meanwhile to the user as well
        assert h.proc is not None
        assert ids_of(h.proc.pid) == (UID, GID)
        assert stat.S_IMODE(h.state.socket.stat().st_mode) == 0o660
        platform = h.state.platform.stat()
        assert (platform.st_uid, stat.S_IMODE(platform.st_mode)) == (0, 0o700)

        attacker = shared_tmp / "attacker"
        attacker.mkdir(mode=0o700)
        os.chown(attacker, UID, GID)
        controls = {"operator": pems(h.credentials.operator()),
                    "vm1": pems(h.binding("vm1").credential)}
        root_pem = (h.state.platform / "root_ca.pem").read_bytes()
        found = in_child(loot_and_use, h.state.root, root_pem, attacker, controls, h.proc.pid,
                         uid=UID, gid=GID)
        vm1 = h.binding("vm1").instance_id
    finally:
        h.stop()
    assert len(found["instances"]) == 2 and found["read"], found
    assert str(h.state.platform) in found["unreadable"]
    assert not [p for p in found["read"] if p.startswith(str(h.state.platform))]
    assert found["hostd_memory_readable"] is False
    # What it found, and what that opened: all three empty.
    assert (found["private_key_files"], found["k1_opened"], found["k2_opened"]) == ([], [], [])
    assert found["controls"] == {"operator": {"k1": True, "k2": []},
                                 "vm1": {"k1": False, "k2": [vm1]}}


def test_user_given_to_a_hostd_not_started_as_root_is_one_clear_line(shared_tmp: Path) -> None:
    status, stderr = cli_in_child(
        ["hostd", "--user", USER, "--state-dir", str(shared_tmp / "state")], UID, GID
    )
    assert status == 1
    assert stderr == (f"sgxvtpm: error: --user {USER} needs hostd to start as root "
                      f"(it runs as uid {UID})\n")
    assert not (shared_tmp / "state").exists()


def test_unknown_user_is_one_clear_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sgxvtpm.cli", "hostd", "--user", "no-such-user-x",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60,
    )
    assert (done.returncode, done.stderr) == (1, "sgxvtpm: error: --user: no such user "
                                                 "'no-such-user-x'\n")
    assert not (tmp_path / "state").exists()
