"""The patent's method end to end, with real processes (docs/ARCHITECTURE.md, "Flows").

hostd (the SGX module) launches the manager enclave; the VMM creates
instance enclaves over K1; VMs talk TPM 2.0 over K2; state is sealed at rest,
survives restarts, and is refused when tampered, foreign or rolled back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.helpers.hostd import Hostd
from tests.helpers.sealedfiles import newest_record

from sgxvtpm.channel import ChannelError, ClientCredential
from sgxvtpm.endpoint.k2 import K2Client, K2Error, VmBinding
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU, TPMA_NV
from sgxvtpm.tpm.nv import execute
from sgxvtpm.vmm.client import VmmClient, VmmError
from sgxvtpm.wire.k1 import InstanceInfo

pytestmark = pytest.mark.integration

NV_ATTRS = (
    TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | (TPMA_NV.NO_DA)
)
# The first bytes of libtpms' serialized permanent and volatile state (version + magic):
# a file holding either in the clear would contain them.
LIBTPMS_MAGICS = (bytes.fromhex("0003ab364723"), bytes.fromhex("000445637889"))


def vmm(h: Hostd) -> VmmClient:
    return VmmClient(h.state)


def create(h: Hostd, name: str, **kw: object) -> InstanceInfo:
    return asyncio.run(vmm(h).create(name, **kw))  # type: ignore[arg-type]


def tpm(h: Hostd, name: str) -> K2Client:
    return K2Client(VmBinding.load(h.state, name))


def started(client: K2Client) -> K2Client:
    client.power_on()
    execute(client.transact, wire.startup(TPM2_SU.CLEAR))
    return client


def cli(h: Hostd, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sgxvtpm.cli", *args, "--state-dir", str(h.state.root)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_whole_flow(hostd: Hostd) -> None:
    info = create(hostd, "vm1")
    assert info.state == "running" and isinstance(info.pid, int)
    shown = json.loads(cli(hostd, "vm", "show", "vm1", "--json").stdout)
    for key in ("name", "instance_id", "state", "mrenclave", "mrsigner", "pid"):
        assert key in shown
    assert os.path.exists(f"/proc/{shown['pid']}")

    marker = os.urandom(32)
    with started(tpm(hostd, "vm1")) as t:
        assert len(wire.parse_get_random(execute(t.transact, wire.get_random(32)))) == 32
        digest = hashlib.sha256(b"m").digest()
        execute(t.transact, wire.pcr_extend(16, digest))
        execute(t.transact, wire.pcr_extend(16, digest))
        pcr = wire.parse_pcr_read(execute(t.transact, wire.pcr_read([16]))).digests[0]
        once = hashlib.sha256(bytes(32) + digest).digest()
        assert pcr == hashlib.sha256(once + digest).digest()
        execute(t.transact, wire.nv_define_space(0x01500001, 32, NV_ATTRS))
        execute(t.transact, wire.nv_write(0x01500001, marker))
        primary = wire.parse_create_primary(
            execute(t.transact, wire.create_primary(wire.ecc_p256_template()))
        )
        execute(t.transact, wire.evict_control(primary.handle, 0x81000001))
        public = wire.parse_read_public(execute(t.transact, wire.read_public(0x81000001)))
        execute(t.transact, wire.shutdown(TPM2_SU.STATE))

    # Ciphertext at rest (SECURITY.md property 12): no file under the state directory
    # holds the NV marker or libtpms state.
    for path in hostd.state.root.rglob("*"):
        if path.is_file() and not path.is_socket():
            data = path.read_bytes()
            assert marker not in data, path
            assert not any(m in data for m in LIBTPMS_MAGICS), path

    assert hostd.stop() == 0
    hostd.start()
    with started(tpm(hostd, "vm1")) as t:
        assert wire.parse_nv_read(execute(t.transact, wire.nv_read(0x01500001, 32))) == marker
        again = wire.parse_read_public(execute(t.transact, wire.read_public(0x81000001)))
        assert again.public == public.public

    instance_dir = hostd.state.instance(info.instance_id)
    assert (instance_dir / "state.sealed").exists()
    assert cli(hostd, "vm", "destroy", "vm1").returncode == 0
    assert not instance_dir.exists()
    assert asyncio.run(vmm(hostd).list()) == []


def test_vm_key_of_vm2_cannot_open_vm1(hostd: Hostd) -> None:
    create(hostd, "vm1")
    create(hostd, "vm2")
    vm1 = VmBinding.load(hostd.state, "vm1")
    vm2 = VmBinding.load(hostd.state, "vm2")
    crossed = VmBinding(vm1.socket_path, vm1.instance_id, vm2.credential, vm1.verifier, vm1.policy)
    with pytest.raises((ChannelError, K2Error)), K2Client(crossed) as t:
        t.power_on()
    with started(tpm(hostd, "vm1")) as t:  # vm1 itself still works
        assert len(wire.parse_get_random(execute(t.transact, wire.get_random(8)))) == 8


def test_k2_through_the_relay_and_on_the_handed_off_connection(hostd: Hostd) -> None:
    """The same session twice: in relay frames through hostd (handoff=False)
    and, after the handoff, as raw TLS on the connection the instance took."""
    create(hostd, "vm1")
    binding = VmBinding.load(hostd.state, "vm1")
    for handoff in (False, True):
        with K2Client(binding, handoff=handoff) as t:
            if not handoff:
                started(t)
            first = wire.parse_get_random(execute(t.transact, wire.get_random(32)))
            assert t.direct is handoff
            second = wire.parse_get_random(execute(t.transact, wire.get_random(32)))
            assert len(first) == len(second) == 32 and first != second
        assert not t.direct  # closed


def test_wrong_operator_key_cannot_create_or_destroy(hostd: Hostd) -> None:
    create(hostd, "vm1")
    intruder = ClientCredential.self_signed(ec.generate_private_key(ec.SECP256R1()), "x")
    client = VmmClient(hostd.state, operator=intruder)
    with pytest.raises((ChannelError, VmmError, EOFError)):
        asyncio.run(client.create("evil"))
    with pytest.raises((ChannelError, VmmError, EOFError)):
        asyncio.run(client.destroy("vm1"))
    assert [i.name for i in asyncio.run(vmm(hostd).list())] == ["vm1"]


def _refuses(h: Hostd, name: str, reason: str) -> None:
    shown = asyncio.run(vmm(h).show(name))
    assert shown.state == "error", shown
    assert reason in shown.reason, shown
    assert reason in h.log()
    with pytest.raises((ChannelError, K2Error)), K2Client(VmBinding.load(h.state, name)) as t:
        t.power_on()


def _sealed(h: Hostd, name: str) -> Path:
    info = json.loads((h.vm_dir(name) / "instance.json").read_text())
    return h.state.instance(info["instance_id"]) / "state.sealed"


def _write_nv(h: Hostd, name: str, data: bytes, define: bool = False) -> None:
    with started(tpm(h, name)) as t:
        if define:
            execute(t.transact, wire.nv_define_space(0x01500002, len(data), NV_ATTRS))
        execute(t.transact, wire.nv_write(0x01500002, data))
        execute(t.transact, wire.shutdown(TPM2_SU.CLEAR))


def test_tampered_foreign_and_old_state_are_refused(hostd: Hostd) -> None:
    for name in ("vm1", "vm2", "vm3", "vm4"):
        create(hostd, name)
    _write_nv(hostd, "vm3", b"old", define=True)
    old = _sealed(hostd, "vm3").read_bytes()
    _write_nv(hostd, "vm3", b"new")
    hostd.stop()

    flipped = bytearray(_sealed(hostd, "vm1").read_bytes())
    start, end = newest_record(_sealed(hostd, "vm1"))
    flipped[(start + end) // 2] ^= 0x10  # the current version, not an unused slot
    _sealed(hostd, "vm1").write_bytes(bytes(flipped))
    shutil.copy(_sealed(hostd, "vm4"), _sealed(hostd, "vm2"))
    _sealed(hostd, "vm3").write_bytes(old)

    hostd.start()
    _refuses(hostd, "vm1", "failed authentication")
    _refuses(hostd, "vm2", "another instance")
    _refuses(hostd, "vm3", "rollback")
    with started(tpm(hostd, "vm4")) as t:  # the others keep running
        assert len(wire.parse_get_random(execute(t.transact, wire.get_random(8)))) == 8


def test_twenty_vms_concurrently(hostd: Hostd) -> None:
    names = [f"vm{i:02d}" for i in range(20)]

    async def create_all() -> None:
        client = vmm(hostd)
        await asyncio.gather(*(client.create(n) for n in names))

    asyncio.run(create_all())
    markers = {n: os.urandom(16) for n in names}

    def use(name: str) -> bytes:
        with started(tpm(hostd, name)) as t:
            execute(t.transact, wire.nv_define_space(0x01500003, 16, NV_ATTRS))
            execute(t.transact, wire.nv_write(0x01500003, markers[name]))
            data = wire.parse_nv_read(execute(t.transact, wire.nv_read(0x01500003, 16)))
            execute(t.transact, wire.shutdown(TPM2_SU.CLEAR))
            return data

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip(names, pool.map(use, names), strict=True))
    assert results == markers
    pids = {i.pid for i in asyncio.run(vmm(hostd).list())}
    assert len(pids) == 20


def _counter_value(h: Hostd, index: int) -> int:
    with started_or_running(tpm(h, "vm1")) as t:
        return int.from_bytes(
            wire.parse_nv_read(execute(t.transact, wire.nv_read(index, 8))), "big"
        )


def started_or_running(client: K2Client) -> K2Client:
    """Power on and Startup, accepting a TPM that is already started."""
    try:
        client.power_on()
        response = client.transact(wire.startup(TPM2_SU.CLEAR))
    except BaseException:
        client.close()
        raise
    if wire.response_code(response) not in (0, TPM2_RC_INITIALIZE):
        raise AssertionError(f"Startup failed: {wire.response_code(response):#x}")
    return client


TPM2_RC_INITIALIZE = 0x100


def _instance_pid(h: Hostd) -> int:
    """The instance's pid; the manager may itself be coming back from a kill."""
    import time

    deadline = time.monotonic() + 60
    while True:
        if h.proc is not None and h.proc.poll() is not None:
            # Killed by the previous round; with the handoff its VM's session
            # can outlive it for a few commands, so nothing else noticed yet.
            h.kill()
            h.start()
        try:
            pid = asyncio.run(asyncio.wait_for(vmm(h).show("vm1"), 15)).pid
            if pid is None:
                raise ValueError("vm1 has no instance process yet")
            return pid
        except (ChannelError, VmmError, OSError, TypeError, ValueError, EOFError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_no_acknowledged_increment_is_lost_across_kill_9(hostd: Hostd) -> None:
    """SECURITY.md properties 16 and 17: 500 NV increments; hostd and the instance are
    killed -9 at random moments. The client reconnects and resumes by itself: every
    increment is acknowledged (no error, no TPM_RC_FAILURE) and counted exactly once."""
    import random
    import signal
    import threading

    create(hostd, "vm1")
    index = 0x01500010
    attrs = NV_ATTRS | TPMA_NV.TPM_NT_COUNTER
    client = started(tpm(hostd, "vm1"))
    client.reconnect_timeout = 120  # a new hostd on a loaded machine takes a while
    execute(client.transact, wire.nv_define_space(index, 8, attrs))
    execute(client.transact, wire.nv_increment(index))
    acknowledged, kills = 1, 0
    rng = random.Random(20261127)
    next_kill = rng.randint(5, 40)
    restarts: list[threading.Thread] = []

    def kill_hostd(pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        hostd.proc.wait(10)  # type: ignore[union-attr]
        hostd.kill()  # the rest of its session
        hostd.start()  # on the same state directory

    while acknowledged < 500:
        if acknowledged >= next_kill:
            next_kill = acknowledged + rng.randint(5, 40)
            for thread in restarts:
                thread.join(120)
            victim = "hostd" if rng.random() < 0.3 else "instance"
            delay = rng.uniform(0, 0.01)
            if victim == "hostd":
                restart = threading.Timer(delay, kill_hostd, (hostd.proc.pid,))  # type: ignore[union-attr]
                restarts.append(restart)
                restart.start()
            else:
                threading.Timer(delay, os.kill, (_instance_pid(hostd), signal.SIGKILL)).start()
            kills += 1
        execute(client.transact, wire.nv_increment(index))
        acknowledged += 1
    for thread in restarts:
        thread.join(120)
    assert _read_counter(client, index) == acknowledged
    client.close()
    assert kills >= 10
    assert _counter_value(hostd, index) == acknowledged


def _read_counter(client: K2Client, index: int) -> int:
    return int.from_bytes(
        wire.parse_nv_read(execute(client.transact, wire.nv_read(index, 8))), "big"
    )


def test_state_blobs_leave_the_enclave_sealed(hostd: Hostd) -> None:
    """GET/SET_STATEBLOB (QEMU migration, savevm): the host sees only sealed blobs."""
    from sgxvtpm.wire.vtpm import BlobType, VtpmOp, VtpmRequest

    create(hostd, "vm1")
    create(hostd, "vm2")
    digest = hashlib.sha256(b"before migration").digest()
    with started(tpm(hostd, "vm1")) as t:
        execute(t.transact, wire.pcr_extend(16, digest))
        before = wire.parse_pcr_read(execute(t.transact, wire.pcr_read([16]))).digests[0]
        blobs = {}
        for kind in (BlobType.PERMANENT, BlobType.VOLATILE):
            response = t.call(VtpmRequest.get_stateblob(kind))
            assert response.success and response.payload
            assert not any(m in response.payload for m in LIBTPMS_MAGICS)
            blobs[kind] = response.payload
        assert t.call(VtpmRequest(VtpmOp.STOP)).success
        damaged = bytearray(blobs[BlobType.VOLATILE])
        damaged[-5] ^= 1
        assert not t.call(VtpmRequest.set_stateblob(BlobType.VOLATILE, bytes(damaged))).success
        # A permanent blob offered as the volatile one is refused too.
        swapped = VtpmRequest.set_stateblob(BlobType.VOLATILE, blobs[BlobType.PERMANENT])
        assert not t.call(swapped).success
        for kind, blob in blobs.items():
            assert t.call(VtpmRequest.set_stateblob(kind, blob)).success
        t.power_on(flags=1)  # INIT(1), as QEMU does on the migration target
        after = wire.parse_pcr_read(execute(t.transact, wire.pcr_read([16]))).digests[0]
        assert after == before
    with tpm(hostd, "vm2") as other:  # vm2's instance cannot open vm1's blobs
        assert other.call(VtpmRequest(VtpmOp.STOP)).success
        refused = other.call(VtpmRequest.set_stateblob(BlobType.VOLATILE, blobs[BlobType.VOLATILE]))
        assert not refused.success
