"""A crash behind a running VM neither resets nor rolls back its TPM (SECURITY.md property 19).

One connected endpoint (a K2Client, as `vm serve` and `vm attach` use) and
real kill -9s of its instance enclave and of hostd: the endpoint reconnects
and resumes by itself, the TPM keeps its PCRs, its sessions and its DA
state, and no TPM2_Startup is sent in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from tests.helpers.hostd import Hostd
from tests.helpers.sealedfiles import sealed_version

from sgxvtpm.endpoint.k2 import K2Client, K2Error
from sgxvtpm.tpm import ek, wire
from sgxvtpm.tpm.constants import (
    TPM2_ALG,
    TPM2_CAP,
    TPM2_CC,
    TPM2_PT,
    TPM2_RC,
    TPM2_RH,
    TPM2_SU,
    TPMA_NV,
)
from sgxvtpm.tpm.nv import execute
from sgxvtpm.tpm.session import digest as session_digest
from sgxvtpm.util import log
from sgxvtpm.wire.resume import REPLAY_MAX_REQUESTS

pytestmark = pytest.mark.integration

#: DA-protected (no TPMA_NV_NO_DA), read and written with its own password.
DA_INDEX = 0x01500030
DA_ATTRS = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD
DA_AUTH = b"da-protected"
COUNTER = 0x01500031
COUNTER_ATTRS = DA_ATTRS | TPMA_NV.NO_DA | TPMA_NV.TPM_NT_COUNTER


def create(h: Hostd, name: str) -> None:
    asyncio.run(h.vmm().create(name))


def instance_pid(h: Hostd, name: str = "vm1", timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            info = asyncio.run(asyncio.wait_for(h.vmm().show(name), 15))
            if info.pid is not None and info.state == "running":
                return int(info.pid)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} has no running instance")
        time.sleep(0.1)


def kill_instance(h: Hostd) -> None:
    pid = instance_pid(h)
    os.kill(pid, signal.SIGKILL)
    # hostd relaunches it; the endpoint finds out at its next request.
    deadline = time.monotonic() + 30
    while instance_pid(h) == pid and time.monotonic() < deadline:
        time.sleep(0.05)


def kill_hostd(h: Hostd) -> None:
    """kill -9 of hostd alone (its instances exit when their stream closes), then a
    new hostd on the same state directory."""
    assert h.proc is not None
    os.kill(h.proc.pid, signal.SIGKILL)
    h.proc.wait(10)
    h.kill()  # what is left of its session (the sim CPU, the zygote)
    h.start()


def lockout_counter(client: K2Client) -> int:
    response = execute(
        client.transact, wire.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
    )
    return wire.parse_tpm_properties(response)[1][TPM2_PT.LOCKOUT_COUNTER]


def pcr16(client: K2Client) -> bytes:
    result = wire.parse_pcr_read(execute(client.transact, wire.pcr_read([16])))
    return result.digests[0]


def read_counter(client: K2Client) -> int:
    data = wire.parse_nv_read(execute(client.transact, wire.nv_read(COUNTER, 8)))
    return int.from_bytes(data, "big")


def prepared(h: Hostd) -> K2Client:
    """vm1's TPM, started once, with PCR16 extended, a DA-protected index and a counter."""
    create(h, "vm1")
    client = K2Client(h.binding("vm1"), label="test_crash_resume")
    client.reconnect_timeout = 90  # a loaded machine relaunches slowly
    client.power_on()
    execute(client.transact, wire.startup(TPM2_SU.CLEAR))
    execute(client.transact, wire.nv_define_space(DA_INDEX, 8, DA_ATTRS, auth=DA_AUTH))
    execute(client.transact, wire.nv_write(DA_INDEX, b"resumed!", auth_handle=DA_INDEX,
                                           auth=DA_AUTH))
    execute(client.transact, wire.nv_define_space(COUNTER, 8, COUNTER_ATTRS))
    execute(client.transact, wire.nv_increment(COUNTER))
    execute(client.transact, wire.pcr_extend(16, hashlib.sha256(b"boot").digest()))
    return client


class StartupWatch:
    """Counts TPM2_Startup commands the client sends (there must be none after the first)."""

    def __init__(self, client: K2Client) -> None:
        self.count = 0
        self._transact = client.transact

        def transact(command: bytes, locality: int = 0) -> bytes:
            if int.from_bytes(command[6:10], "big") == 0x144:  # TPM_CC_Startup
                self.count += 1
            return self._transact(command, locality)

        client.transact = transact  # type: ignore[method-assign]


def test_five_kills_keep_pcrs_da_and_no_startup(hostd: Hostd) -> None:
    """The issue's test: instance x3, hostd x2, one endpoint, no TPM2_Startup between."""
    client = prepared(hostd)
    watch = StartupWatch(client)
    expected = pcr16(client)
    assert lockout_counter(client) == 0
    with log.capture() as events:
        for round_, victim in enumerate(("instance", "instance", "instance", "hostd", "hostd")):
            if victim == "instance":
                kill_instance(hostd)
            else:
                kill_hostd(hostd)
            assert pcr16(client) == expected, f"PCR16 changed after kill {round_ + 1} ({victim})"
            data = wire.parse_nv_read(execute(
                client.transact, wire.nv_read(DA_INDEX, 8, auth_handle=DA_INDEX, auth=DA_AUTH)))
            assert data == b"resumed!"
            assert lockout_counter(client) == 0, f"DA counter moved after kill {round_ + 1}"
            # The TPM goes on from where it was: one more measurement, one more count.
            execute(client.transact, wire.pcr_extend(16, hashlib.sha256(b"%d" % round_).digest()))
            expected = pcr16(client)
            assert read_counter(client) == 1 + round_
            execute(client.transact, wire.nv_increment(COUNTER))
    assert watch.count == 0
    resumed = [e for e in events if e["event"] == "k2.resumed"]
    assert len(resumed) == 5, [e for e in events if e["event"].startswith("k2.")]
    assert not [e for e in events if e["event"] == "k2.resume_refused"]
    client.close()


def test_a_request_in_flight_at_a_kill_runs_exactly_once(hostd: Hostd) -> None:
    """NV_Increment sent to a stopped instance that is then killed: it never ran, so the
    endpoint resends it (counter + 1, once); and increments racing random kills are all
    acknowledged, each counted once."""
    client = prepared(hostd)
    before = read_counter(client)
    pid = instance_pid(hostd)
    os.kill(pid, signal.SIGSTOP)
    answer: list[bytes] = []
    sender = threading.Thread(
        target=lambda: answer.append(execute(client.transact, wire.nv_increment(COUNTER))))
    sender.start()
    time.sleep(0.3)  # the request is in the instance's socket, unread
    assert sender.is_alive()
    os.kill(pid, signal.SIGKILL)
    sender.join(60)
    assert answer and wire.response_code(answer[0]) == TPM2_RC.SUCCESS
    assert read_counter(client) == before + 1

    import random
    rng = random.Random(16)
    acknowledged = read_counter(client)
    for _ in range(4):
        threading.Timer(rng.uniform(0, 0.05), os.kill,
                        (instance_pid(hostd), signal.SIGKILL)).start()
        for _ in range(rng.randint(3, 12)):
            execute(client.transact, wire.nv_increment(COUNTER))  # no error tolerated
            acknowledged += 1
        time.sleep(0.1)
    assert read_counter(client) == acknowledged
    client.close()


def test_an_older_slot_put_back_is_refused(hostd: Hostd) -> None:
    """Attacker H copies a resume record, lets the TPM move on, puts the copy back and
    kills the instance: no resume (PCR16 is not rolled back), the endpoint says why."""
    client = prepared(hostd)
    execute(client.transact, wire.pcr_extend(16, hashlib.sha256(b"saved").digest()))
    instance_dir = _instance_dir(hostd)
    saved = {p.name: p.read_bytes() for p in instance_dir.glob("resume.*")}
    assert saved
    # More extends than the instance leaves unrecorded: it records again.
    for i in range(REPLAY_MAX_REQUESTS + 4):
        execute(client.transact, wire.pcr_extend(16, hashlib.sha256(b"later %d" % i).digest()))
    assert _slots(hostd) != saved
    after = pcr16(client)
    for _ in range(3):  # quiet: the endpoint's token still names the last extend's record
        execute(client.transact, wire.get_random(8))
    pid = instance_pid(hostd)
    os.kill(pid, signal.SIGSTOP)
    for name, data in saved.items():
        (instance_dir / name).write_bytes(data)
    os.kill(pid, signal.SIGKILL)
    _wait_gone(hostd, pid)
    with log.capture() as events, pytest.raises((K2Error, wire.TpmResponseError)) as caught:
        pcr16(client)
    if isinstance(caught.value, wire.TpmResponseError):
        assert caught.value.rc == TPM2_RC.FAILURE
    refused = [e for e in events if e["event"] == "k2.resume_refused"]
    assert refused and "rollback refused" in refused[0]["reason"]
    # Never a rolled-back TPM: it is not running (TPM_RC_FAILURE), as after a power loss.
    response = client.transact(wire.pcr_read([16]))
    assert wire.response_code(response) == TPM2_RC.FAILURE
    assert after != b""
    client.close()


def test_quiet_requests_write_no_record_and_a_kill_resumes_from_the_last_one(
    hostd: Hostd,
) -> None:
    """Read-only commands without sessions (resume.QuietCommands) leave the resume
    records as they are (their answers say so); a kill -9 after them, or with one
    of them in flight, resumes from the last record: same PCRs, the in-flight one
    answered, and the TPM goes on recording."""
    client = prepared(hostd)
    expected = pcr16(client)
    instance_dir = _instance_dir(hostd)
    slots = {p.name: p.read_bytes() for p in instance_dir.glob("resume.*")}
    for _ in range(5):
        execute(client.transact, wire.get_random(16))
        assert pcr16(client) == expected
    assert {p.name: p.read_bytes() for p in instance_dir.glob("resume.*")} == slots
    kill_instance(hostd)
    with log.capture() as events:
        assert pcr16(client) == expected
    resumed = [e for e in events if e["event"] == "k2.resumed"]
    assert len(resumed) == 1 and not resumed[0]["replayed"]
    # A quiet request in flight at a kill: never recorded, so resent and answered.
    pid = instance_pid(hostd)
    os.kill(pid, signal.SIGSTOP)
    answer: list[bytes] = []
    sender = threading.Thread(target=lambda: answer.append(
        execute(client.transact, wire.get_random(16))))
    sender.start()
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    sender.join(60)
    assert answer and len(wire.parse_get_random(answer[0])) == 16
    execute(client.transact, wire.pcr_extend(16, hashlib.sha256(b"after").digest()))
    expected = pcr16(client)
    assert {p.name: p.read_bytes() for p in instance_dir.glob("resume.*")} != slots
    kill_instance(hostd)
    assert pcr16(client) == expected
    assert lockout_counter(client) == 0
    client.close()


def _wait_gone(h: Hostd, pid: int) -> None:
    deadline = time.monotonic() + 30
    while instance_pid(h) == pid and time.monotonic() < deadline:
        time.sleep(0.05)


def _instance_dir(h: Hostd) -> Path:
    dirs = [p for p in (h.state.root / "instances").iterdir() if p.is_dir()]
    assert len(dirs) == 1
    return dirs[0]


def _audit_digest(client: K2Client) -> tuple[int, bytes]:
    """TPM2_GetCommandAuditDigest, unsigned (signHandle TPM_RH_NULL): the audit
    hash algorithm and digest."""
    command = wire.build_command(
        TPM2_CC.GetCommandAuditDigest,
        wire.tpm2b(b"") + wire.u16(TPM2_ALG.NULL),
        [TPM2_RH.ENDORSEMENT, TPM2_RH.NULL],
        [wire.password_session(), wire.password_session()],
    )
    _, reader = wire.response_parameters(execute(client.transact, command))
    attest = wire.Reader(reader.tpm2b())
    attest.u32(), attest.u16(), attest.tpm2b(), attest.tpm2b()  # magic, type, signer, extra
    attest.u64(), attest.u32(), attest.u32(), attest.u8(), attest.u64()  # clock, firmware
    attest.u64()  # auditCounter
    return attest.u16(), attest.tpm2b()


def test_an_audited_quiet_command_stays_in_the_audit_digest_across_a_kill(
    hostd: Hostd,
) -> None:
    """A GetRandom needs no fresh VOLATILE state in its resume record (resume.QuietCommands)
    unless it is audited: then its extension of the command audit digest must
    survive a kill -9 of the instance right after its answer."""
    create(hostd, "vm1")
    client = K2Client(hostd.binding("vm1"), label="test_crash_resume")
    client.reconnect_timeout = 90
    client.power_on()
    execute(client.transact, wire.startup(TPM2_SU.CLEAR))
    set_audit = wire.build_command(
        TPM2_CC.SetCommandCodeAuditStatus,
        wire.u16(TPM2_ALG.NULL) + wire.u32(1) + wire.u32(TPM2_CC.GetRandom) + wire.u32(0),
        [TPM2_RH.OWNER],
        [wire.password_session()],
    )
    execute(client.transact, set_audit)
    alg, before = _audit_digest(client)
    answers = [execute(client.transact, wire.get_random(8)) for _ in range(3)]
    kill_instance(hostd)
    assert _audit_digest(client) == (alg, _extended(alg, before, answers))
    client.close()


def _extended(alg: int, value: bytes, answers: list[bytes]) -> bytes:
    """The command audit digest ``value`` after GetRandom(8)s answered ``answers``
    (each one: H(digest || cpHash || rpHash), Part 1, 33.3)."""
    cp_hash = session_digest(alg, wire.u32(TPM2_CC.GetRandom) + wire.u16(8))
    for answer in answers:
        rp_hash = session_digest(alg, wire.u32(0) + wire.u32(TPM2_CC.GetRandom) + answer[10:])
        value = session_digest(alg, value + cp_hash + rp_hash)
    return value


def _slots(h: Hostd) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in _instance_dir(h).glob("resume.*")}


def test_replayed_commands_write_no_record_and_run_again_after_a_kill(hostd: Hostd) -> None:
    """PCR_Extend, CreatePrimary, Sign, FlushContext and NV_Read with password sessions leave the
    resume records as they are (resume.REPLAYED_COMMANDS); after a kill -9 the new
    instance runs them again from the endpoint's token: the extends are there once,
    the primary key is loaded under its handle with its name, the flushed one is gone."""
    client = prepared(hostd)
    slots = _slots(hostd)
    template = wire.ecc_p256_template(signing=True)
    kept = wire.parse_create_primary(execute(client.transact, wire.create_primary(template)))
    flushed = wire.parse_create_primary(execute(client.transact, wire.create_primary(template)))
    execute(client.transact, wire.flush_context(flushed.handle))
    for i in range(5):
        execute(client.transact, wire.pcr_extend(16, hashlib.sha256(b"run %d" % i).digest()))
    signature = execute(client.transact, wire.sign(kept.handle, bytes(32)))
    read = wire.nv_read(DA_INDEX, 8, auth_handle=DA_INDEX, auth=DA_AUTH)  # DA-protected
    assert wire.parse_nv_read(execute(client.transact, read)) == b"resumed!"
    kept_requests = len(client._unrecorded)
    for _ in range(REPLAY_MAX_REQUESTS + 8):  # quiet ones: neither kept nor recorded
        expected = pcr16(client)
    assert _slots(hostd) == slots, "a replayed command wrote a resume record"
    assert client._recorded < client._seq and len(client._unrecorded) == kept_requests >= 10
    with log.capture() as events:
        kill_instance(hostd)
        assert pcr16(client) == expected
    resumed = [e for e in events if e["event"] == "k2.resumed"]
    assert len(resumed) == 1 and not [e for e in events if e["event"] == "k2.resume_refused"]
    public = wire.parse_read_public(execute(client.transact, wire.read_public(kept.handle)))
    assert public.name == kept.name
    gone = client.transact(wire.read_public(flushed.handle))
    assert wire.response_code(gone) != TPM2_RC.SUCCESS
    assert wire.parse_sign(execute(client.transact, wire.sign(kept.handle, bytes(32))))
    assert wire.parse_nv_read(execute(client.transact, read)) == b"resumed!"
    assert signature and lockout_counter(client) == 0
    client.close()


def test_a_request_that_runs_again_differently_ends_the_resume(hostd: Hostd) -> None:
    """The endpoint's token says what each unrecorded request answered; a resume whose
    rerun answers otherwise is refused and the TPM stays off (never a TPM that is
    neither the old one nor off)."""
    client = prepared(hostd)
    execute(client.transact, wire.pcr_extend(16, hashlib.sha256(b"one").digest()))
    assert client._unrecorded
    seq, request, answer = client._unrecorded[-1]
    client._unrecorded[-1] = (seq, request, answer[:-1] + bytes([answer[-1] ^ 1]))
    kill_instance(hostd)
    with log.capture() as events, pytest.raises((K2Error, wire.TpmResponseError)):
        pcr16(client)
    refused = [e for e in events if e["event"] == "k2.resume_refused"]
    assert refused and "answered other bytes" in refused[0]["reason"]
    response = client.transact(wire.pcr_read([16]))
    assert wire.response_code(response) == TPM2_RC.FAILURE
    client.close()


def test_manufacturing_is_one_commit_and_a_kill_right_after_keeps_all_of_it(
    hostd: Hostd,
) -> None:
    """vm create seals the new TPM (EKs, their certificates, the platform certificate,
    the PCR banks) in one commit after the first version, not one per NV write; a
    kill -9 right after it loses none of that (the manager's answer came after it)."""
    create(hostd, "vm1")
    sealed = _instance_dir(hostd) / "state.sealed"
    first = sealed_version(sealed)
    kill_instance(hostd)
    client = K2Client(hostd.binding("vm1"), label="test_crash_resume")
    client.reconnect_timeout = 90
    client.power_on()
    execute(client.transact, wire.startup(TPM2_SU.CLEAR))
    for alg in ("rsa2048", "ecc-p256"):
        assert x509.load_der_x509_certificate(ek.read_ek_certificate(client.transact, alg))
    # The counter's first value is the creation's (state.py: SealedFile.create), one
    # commit writes the bundle, one more the manufactured TPM (one per NV write made 16).
    assert first <= 3, f"manufacturing wrote {first} versions"
    client.close()
