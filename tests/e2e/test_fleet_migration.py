"""A VM's TPM moves between two hosts of one fleet, as QEMU moves it (docs/ARCHITECTURE.md,
"Many hosts").

Two hostd processes under one sim root, in one fleet, each with its own
``vm attach`` endpoint, driven through the swtpm control channel exactly as
QEMU drives it (tests/e2e/test_stateblob_rollback.py): the source's QEMU
saves (GET_STATEBLOB 1-3), the destination's QEMU (``-incoming``) loads
(STOP, SET_STATEBLOB, INIT). The destination's instance was created with
``vm create --incoming``. The last test does it with a real QEMU guest
(TCG): it boots on A, QEMU migrates it to a file, a QEMU ``-incoming`` on B
resumes it; PCR 0-7 as the boot on A measured them and the EK certificate in
NV are the same on B, A refuses the VM afterwards, and the stream replayed
into B later is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers.endpoint import CtrlClient, start_vm_endpoint
from tests.helpers.fleet import cli, fleet_of, ok, vm_state, wait_vm_state
from tests.helpers.guest import Guest, wait_loaded
from tests.helpers.hostd import Hostd
from tests.helpers.qemu_ctrl import (
    attached,
    ctrl,
    loadvm,
    new_qemu,
    nv_counter,
    savevm,
    startup_state,
    tpm_ok,
)
from tests.helpers.vmtools import COUNTER_ATTRS, NV_ATTRS

from sgxvtpm.endpoint.k2 import K2Client, VmBinding
from sgxvtpm.tpm import ek, wire
from sgxvtpm.tpm.constants import TPM2_SU
from sgxvtpm.tpm.nv import execute
from sgxvtpm.wire.swtpm_ctrl import CtrlCmd
from sgxvtpm.wire.vtpm import TpmResult

pytestmark = pytest.mark.e2e

COUNTER = 0x01500041
MARKER_INDEX = 0x01500042
MARKER = b"FLEET-PLAINTEXT-MARKER-7c1e9a2f"
# The first bytes of libtpms' serialized state (as tests/integration/test_flow.py).
LIBTPMS_MAGICS = (bytes.fromhex("0003ab364723"), bytes.fromhex("000445637889"))


def assert_no_plaintext(where: list[Path], blobs: dict[int, bytes]) -> None:
    """Neither the migration stream nor any file of either host holds the TPM in the clear."""
    for blob in blobs.values():
        assert MARKER not in blob and not any(m in blob for m in LIBTPMS_MAGICS)
    for root in where:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_socket():
                data = path.read_bytes()
                assert MARKER not in data, path
                assert not any(m in data for m in LIBTPMS_MAGICS), path


def counter(c: CtrlClient) -> int:
    return nv_counter(c, COUNTER)


def pcrs(c: CtrlClient) -> list[bytes]:
    return list(wire.parse_pcr_read(tpm_ok(c, wire.pcr_read(range(8)))).digests)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hostd, Hostd]]:
    with fleet_of(tmp_path_factory.mktemp("fleet-migration"), 2) as (a, b):
        yield a, b


def test_a_vm_tpm_moves_to_another_host_and_not_back(
    two_hosts: tuple[Hostd, Hostd], tmp_path: Path
) -> None:
    a, b = two_hosts
    ok(cli(a, "vm", "create", "mover"))
    ok(cli(b, "vm", "create", "mover", "--incoming"))
    assert vm_state(b, "mover") == "incoming"
    with attached(tmp_path, (a.state, "mover"), (b.state, "mover")) as (ep_a, ep_b):
        # On A: the VM boots, measures, counts to 3; QEMU migrates it away.
        q = new_qemu(ep_a.address)
        tpm_ok(q, wire.startup(TPM2_SU.CLEAR))
        for pcr in range(8):
            tpm_ok(q, wire.pcr_extend(pcr, bytes([pcr + 1]) * 32))
        tpm_ok(q, wire.nv_define_space(COUNTER, 8, COUNTER_ATTRS))
        for _ in range(3):
            tpm_ok(q, wire.nv_increment(COUNTER))
        tpm_ok(q, wire.nv_define_space(MARKER_INDEX, len(MARKER), NV_ATTRS))
        tpm_ok(q, wire.nv_write(MARKER_INDEX, MARKER))
        before = pcrs(q)
        ek_before = ek.read_ek_certificate(q.transact, "rsa2048")
        blobs = savevm(q)
        q.close()

        # On B: QEMU -incoming loads the stream and the VM resumes.
        q = new_qemu(ep_b.address)
        assert loadvm(q, blobs) == [0] * len([d for d in blobs.values() if d])
        assert ctrl(q, CtrlCmd.INIT, flags=1).result == 0
        assert pcrs(q) == before
        assert ek.read_ek_certificate(q.transact, "rsa2048") == ek_before
        assert counter(q) == 3
        marker = tpm_ok(q, wire.nv_read(MARKER_INDEX, len(MARKER)))
        assert wire.parse_nv_read(marker) == MARKER
        assert_no_plaintext([a.state.root, b.state.root], blobs)
        tpm_ok(q, wire.nv_increment(COUNTER))
        assert counter(q) == 4
        q.close()

        # B's manager tells A's: A refuses to run the VM (no two live copies).
        wait_vm_state(a, "mover", "migrated")
        wait_vm_state(b, "mover", "running")
        old = new_qemu(ep_a.address, init=False)
        assert ctrl(old, CtrlCmd.INIT).result == TpmResult.FAIL
        assert old.transact(wire.get_random(8))[6:10] != bytes(4)
        old.close()

        # A blob captured from the stream, replayed on B later: refused (B ran on).
        replay = new_qemu(ep_b.address, init=False)
        assert loadvm(replay, blobs)[0] == TpmResult.BAD_PARAMETER
        assert ctrl(replay, CtrlCmd.INIT).result == 0
        startup_state(replay)
        assert counter(replay) == 4
        replay.close()

        # The operator's explicit override: A runs its (older) copy again.
        ok(cli(a, "vm", "migrate-cancel", "mover"))
        assert vm_state(a, "mover") == "running"
        back = new_qemu(ep_a.address)
        back.close()
    assert "rollback refused" in b.log()
    assert '"manager.migrated_out"' in a.log()


def test_incoming_needs_a_fleet_and_blobs_are_bound_to_the_vm(
    two_hosts: tuple[Hostd, Hostd], tmp_path: Path
) -> None:
    a, b = two_hosts
    ok(cli(a, "vm", "create", "one"))
    ok(cli(b, "vm", "create", "two", "--incoming"))
    with attached(tmp_path, (a.state, "one"), (b.state, "two")) as (ep_a, ep_b):
        q = new_qemu(ep_a.address)
        tpm_ok(q, wire.startup(TPM2_SU.CLEAR))
        blobs = savevm(q)
        q.close()
        # Another VM's state: refused, and "two" still waits.
        q = new_qemu(ep_b.address)
        assert loadvm(q, blobs)[0] == TpmResult.BAD_PARAMETER
        q.close()
    assert vm_state(b, "two") == "incoming"
    assert "not of 'two'" in b.log()


def test_a_qemu_guest_migrates_with_its_tpm(
    two_hosts: tuple[Hostd, Hostd], initrd: Path, tmp_path: Path
) -> None:
    a, b = two_hosts
    ok(cli(a, "vm", "create", "guest"))
    ek_cert_a = bytes.fromhex(
        json.loads(ok(cli(a, "vm", "show", "guest", "--json")))["ek_certificates"]["rsa2048"]
    )
    ok(cli(b, "vm", "create", "guest", "--incoming"))
    ctrl_a, ctrl_b = tmp_path / "a.ctrl", tmp_path / "b.ctrl"
    ep_a = start_vm_endpoint(a.state, "guest", "--ctrl", str(ctrl_a), log_dir=tmp_path)
    ep_b = start_vm_endpoint(b.state, "guest", "--ctrl", str(ctrl_b), log_dir=tmp_path)
    guests: list[Guest] = []
    stream = tmp_path / "migration.stream"
    try:
        on_a = Guest(tmp_path, initrd, ctrl_a, "on-a")
        guests.append(on_a)
        boot = on_a.wait_for_boots(1, 180)[0]
        assert boot.tpm_version == "2" and len(boot.pcrs) == 8, boot.console[-2000:]
        on_a.save(stream)
        on_a.stop()

        on_b = Guest(tmp_path, initrd, ctrl_b, "on-b", incoming=stream)
        guests.append(on_b)
        wait_loaded(on_b)
        on_b.monitor("cont")
        assert "VM status: running" in on_b.monitor("info status")
        # The TPM the guest runs on at B is the one it booted on at A: read it
        # beside the guest (taking the endpoint's seat; the guest is idle).
        with K2Client(VmBinding.load(b.state, "guest"), takeover=True) as tpm:
            result = wire.parse_pcr_read(execute(tpm.transact, wire.pcr_read(range(8))))
            pcrs_b = {i: d.hex() for i, d in enumerate(result.digests)}
            assert ek.read_ek_certificate(tpm.transact, "rsa2048") == ek_cert_a
        assert pcrs_b == boot.pcrs
        assert any(v != "00" * 32 for v in pcrs_b.values())  # the boot measured something
        on_b.stop()

        # B's manager told A's: a QEMU on A cannot start the VM's TPM any more.
        wait_vm_state(a, "guest", "migrated")
        again_a = Guest(tmp_path, initrd, ctrl_a, "again-a")
        guests.append(again_a)
        assert again_a.proc.wait(60) != 0, again_a.console()[-2000:]
        assert "tpm-emulator: TPM result for CMD_STOP: 0x9 operation failed" in (
            again_a.console())  # fmt: skip
        assert "TPMVER" not in again_a.console()

        # The stream replayed into B later (the VM ran on B since): refused.
        ep_b.stop()
        ep_b = start_vm_endpoint(b.state, "guest", "--ctrl", str(ctrl_b), log_dir=tmp_path)
        replay = Guest(tmp_path, initrd, ctrl_b, "replay", incoming=stream)
        guests.append(replay)
        assert replay.proc.wait(60) != 0
        assert "Setting the stateblob (type 1) failed" in replay.console()
    finally:
        for guest in guests:
            guest.stop()
        ep_a.stop()
        ep_b.stop()
    assert vm_state(b, "guest") == "running"
    assert "rollback refused" in b.log()


def fleet_address(of: Hostd, member: Hostd) -> str:
    """``member``'s fleet address, as ``of``'s manager lists it."""
    mine = json.loads(ok(cli(member, "fleet", "show", "--json")))["self_id"]
    listed = json.loads(ok(cli(of, "fleet", "show", "--json")))["members"]
    (address,) = [m["address"] for m in listed if m["platform_id"] == mine]
    return str(address)


def test_a_stopped_vm_moves_cold_without_qemu(
    two_hosts: tuple[Hostd, Hostd], tmp_path: Path
) -> None:
    a, b = two_hosts
    to_b = fleet_address(a, b)
    ok(cli(a, "vm", "create", "cold"))
    ok(cli(a, "vm", "create", "hot"))
    ep = start_vm_endpoint(a.state, "cold", "--ctrl", str(tmp_path / "a.ctrl"), log_dir=tmp_path)
    hot = start_vm_endpoint(a.state, "hot", "--ctrl", str(tmp_path / "hot.ctrl"),
                            log_dir=tmp_path)  # fmt: skip
    try:
        q = new_qemu(ep.address)
        tpm_ok(q, wire.startup(TPM2_SU.CLEAR))
        tpm_ok(q, wire.nv_define_space(COUNTER, 8, COUNTER_ATTRS))
        for _ in range(5):
            tpm_ok(q, wire.nv_increment(COUNTER))
        ek_before = ek.read_ek_certificate(q.transact, "rsa2048")
        assert ctrl(q, CtrlCmd.SHUTDOWN).result == 0  # QEMU exits: the TPM is stopped
        q.close()
        # A running TPM is not moved cold.
        h = new_qemu(hot.address)
        refused = cli(a, "vm", "migrate", "hot", "--to", to_b)
        assert refused.returncode == 1 and "the VM's TPM is running" in refused.stderr
        h.close()
    finally:
        ep.stop()
        hot.stop()
    # No incoming instance on B yet: B refuses, A keeps the VM.
    early = cli(a, "vm", "migrate", "cold", "--to", to_b)
    assert early.returncode == 1 and "no incoming VM named 'cold'" in early.stderr
    assert vm_state(a, "cold") == "running"

    ok(cli(b, "vm", "create", "cold", "--incoming"))
    ok(cli(a, "vm", "migrate", "cold", "--to", to_b))
    assert vm_state(a, "cold") == "migrated"
    assert vm_state(b, "cold") == "running"
    again = cli(a, "vm", "migrate", "cold", "--to", to_b)
    assert again.returncode == 1 and "nothing to move" in again.stderr

    ep = start_vm_endpoint(b.state, "cold", "--ctrl", str(tmp_path / "b.ctrl"), log_dir=tmp_path)
    try:
        q = new_qemu(ep.address)
        startup_state(q)
        assert counter(q) == 5
        assert ek.read_ek_certificate(q.transact, "rsa2048") == ek_before
        q.close()
    finally:
        ep.stop()
