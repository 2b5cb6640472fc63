"""Disk full and I/O errors under the state directory (RELIABILITY.md scenario 2).

SECURITY.md properties 16 (no acknowledged change lost) and 12 (no plaintext
in the host's log); a failing disk is answered with an error, never a crash.

The whole state directory (sealed state, registry, platform counters) is a
small tmpfs. It is filled to the last block (writes fail with ENOSPC), and
its inodes are exhausted (creating the temp file of a whole-file write fails).
Meanwhile:

- a state-changing TPM command whose sealed state still fits the state file
  is made durable as on a free disk: it is written in place, into the file's
  other slot (util/durable.py), which needs no new block and no new inode;
- one that needs a bigger file (here: 2 KiB NV indices, defined and written
  until the state outgrows its slot) answers a TPM error (libtpms enters
  failure mode and answers TPM_RC_FAILURE until the VM's next power cycle, as
  a TPM does), never a crash, a hang or a torn file; the instance process
  lives on;
- ``vm create`` fails with a clear error and hostd keeps serving;
- an instance killed while the disk is full comes back with its state;
- nothing of the failed command reaches the log (libtpms dumps a failing
  command to stderr unless told otherwise);
- once space returns, a power cycle (INIT + Startup, what a VM reset sends)
  brings the TPM back with every acknowledged change, new writes succeed,
  and everything survives a hostd restart.

Why a power cycle and not a transparent restart: the failed command may have
changed volatile state (PCRs, sessions) that was never made durable. A
transparent engine restart would silently reset PCRs under a running OS,
which would let a compromised guest replay a clean boot's measurements. A
TPM in failure mode needs _TPM_Init (Part 1, 12.3 "Failure mode"), so the
VM's reset is the recovery; VtpmCore's INIT restarts libtpms from the last
durable state (the failed store was rolled back in memory).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers.vmtools import (
    COUNTER_ATTRS,
    NV_ATTRS,
    HostdCtl,
    boot,
    counter,
    nv_read,
    rc_of,
    read_public_or_none,
    retry,
    running,
)

from sgxvtpm.endpoint.k2 import K2Client
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_RC, TPM2_SU
from sgxvtpm.tpm.nv import execute
from sgxvtpm.vmm.client import VmmError

pytestmark = pytest.mark.integration

NV = 0x01500040
CTR = 0x01500041
KEY = 0x81000110
STRESS = bool(os.environ.get("SGXVTPM_STRESS"))


def _sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "state"
    mnt.mkdir()
    done = _sh("mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if _sh("umount", str(mnt)).returncode != 0:
            _sh("umount", "-l", str(mnt))


def fill(mnt: Path) -> Path:
    filler = mnt / "filler"
    _sh("dd", "if=/dev/zero", f"of={filler}", "bs=64k")
    _sh("dd", "if=/dev/zero", f"of={filler}.tail", "bs=512")  # the last partial block
    assert os.statvfs(mnt).f_bavail == 0
    return filler


def free(mnt: Path) -> None:
    for path in mnt.glob("filler*"):
        path.unlink()


def acknowledged_state(ctl: HostdCtl, name: str) -> tuple[bytes, int, bytes]:
    """Define NV data, a counter and a persistent key; return what was acknowledged."""
    marker = os.urandom(16)
    with boot(ctl, name) as c:
        execute(c.transact, wire.nv_define_space(NV, 16, NV_ATTRS))
        execute(c.transact, wire.nv_write(NV, marker))
        execute(c.transact, wire.nv_define_space(CTR, 8, COUNTER_ATTRS))
        for _ in range(3):
            execute(c.transact, wire.nv_increment(CTR))
        primary = wire.parse_create_primary(
            execute(c.transact, wire.create_primary(wire.ecc_p256_template()))
        )
        execute(c.transact, wire.evict_control(primary.handle, KEY))
        public = read_public_or_none(c, KEY)
        assert public is not None
    return marker, 3, public


def check_state(ctl: HostdCtl, name: str, expected: tuple[bytes, int, bytes]) -> None:
    def read() -> tuple[bytes, int, bytes | None]:
        with boot(ctl, name) as c:
            return nv_read(c, NV, 16), counter(c, CTR), read_public_or_none(c, KEY)

    assert retry(read, 60) == expected


def no_plaintext_in_log(ctl: HostdCtl, secret: bytes) -> None:
    log = ctl.log()
    assert "Entered failure mode through command" not in log
    spaced = " ".join(f"{b:02x}" for b in secret[:8])
    assert spaced not in log and secret[:8].hex() not in log


BIG = 0x01500100  # the first of the 2 KiB indices that grow the sealed state


def fits_then_grows(
    ctl: HostdCtl, name: str, c: K2Client, state: tuple[bytes, int, bytes], first: int
) -> tuple[bytes, int, bytes]:
    """On a running TPM over a full disk: changes that fit the state file are made
    durable; then 2 KiB indices (from ``BIG + first``) are defined and written until a
    commit needs a bigger file, which gets a TPM error; the process lives on. Returns
    the state now acknowledged; the indices acknowledged were undefined again."""
    pid = ctl.enclave_pids()[ctl.instance_id(name)]
    marker = os.urandom(16)
    execute(c.transact, wire.nv_write(NV, marker))
    execute(c.transact, wire.nv_increment(CTR))
    defined = []
    for index in range(BIG + first, BIG + first + 16):
        code = rc_of(c.transact(wire.nv_define_space(index, 2048, NV_ATTRS)))
        if code == 0:
            defined.append(index)
            code = rc_of(c.transact(wire.nv_write(index, os.urandom(1024))))
        if code == 0:
            code = rc_of(c.transact(wire.nv_write(index, os.urandom(1024), offset=1024)))
        if code != 0:
            break
    assert code == TPM2_RC.FAILURE, hex(code)  # refused for the disk, not for NV space
    assert 1 <= len(defined) < 16, defined
    # The TPM is in failure mode: every command answers TPM_RC_FAILURE.
    assert rc_of(c.transact(wire.nv_write(NV, os.urandom(16)))) == TPM2_RC.FAILURE
    assert ctl.enclave_pids()[ctl.instance_id(name)] == pid
    os.kill(pid, 0)  # still alive
    c.close()
    return marker, state[1] + 1, state[2]


def undefine_big(ctl: HostdCtl, name: str) -> list[int]:
    """The 2 KiB indices the TPM holds, undefined again (so the next round can grow)."""
    with boot(ctl, name) as c:
        found = [i for i in range(BIG, BIG + 64) if nv_defined(c, i)]
        for index in found:
            execute(c.transact, wire.nv_undefine_space(index))
        execute(c.transact, wire.shutdown(TPM2_SU.CLEAR))
    return found


def nv_defined(c: K2Client, index: int) -> bool:
    return rc_of(c.transact(wire.nv_read_public(index))) == 0


def shows_running(ctl: HostdCtl, name: str) -> None:
    def check() -> None:
        shown = ctl.show(name)
        if shown.state != "running":
            raise VmmError(f"{name}: {shown.state} {shown.reason}")

    retry(check, 60)


def test_disk_full_and_read_only_then_recovery(small_fs: Path) -> None:
    with running(small_fs) as ctl:
        ctl.create_many(["vm1", "vm2"])
        state = {n: acknowledged_state(ctl, n) for n in ("vm1", "vm2")}
        cycles = 10 if STRESS else 1
        for cycle in range(cycles):
            # -- ENOSPC ----------------------------------------------------
            # TPM2_Startup itself writes NV, so the VM's TPM runs before the disk fills.
            c1 = boot(ctl, "vm1")
            fill(small_fs)
            state["vm1"] = fits_then_grows(ctl, "vm1", c1, state["vm1"], 0)
            with pytest.raises(VmmError, match="No space left"):
                ctl.create(f"new{cycle}")
            assert {i.name for i in ctl.list()} >= {"vm1", "vm2"}  # hostd serves
            # An instance killed while the disk is full restarts and accepts its state.
            assert ctl.kill_enclave(ctl.instance_id("vm2"))
            shows_running(ctl, "vm2")
            no_plaintext_in_log(ctl, state["vm1"][0])
            # A power cycle on the full disk: every acknowledged change, no refused one.
            check_state(ctl, "vm1", state["vm1"])
            free(small_fs)
            acknowledged = undefine_big(ctl, "vm1")
            assert acknowledged and all(i < BIG + 16 for i in acknowledged), acknowledged
            check_state(ctl, "vm2", state["vm2"])
            marker = os.urandom(16)
            with boot(ctl, "vm1") as c:
                execute(c.transact, wire.nv_write(NV, marker))
                execute(c.transact, wire.nv_increment(CTR))
            state["vm1"] = (marker, state["vm1"][1] + 1, state["vm1"][2])
            # -- no inode left: a whole-file write cannot create its temp file --
            c2 = boot(ctl, "vm2")
            used = os.statvfs(small_fs).f_files - os.statvfs(small_fs).f_ffree
            assert _sh("mount", "-o", f"remount,nr_inodes={used}", str(small_fs)).returncode == 0
            try:
                state["vm2"] = fits_then_grows(ctl, "vm2", c2, state["vm2"], 16)
            finally:
                assert _sh("mount", "-o", "remount,nr_inodes=65536", str(small_fs)).returncode == 0
            check_state(ctl, "vm2", state["vm2"])
            undefine_big(ctl, "vm2")
        ctl.stop()
        ctl.start()
        ctl.wait_all_running()
        for name in ("vm1", "vm2"):
            check_state(ctl, name, state[name])
        ctl.create("after")  # space is back: creation works again
