"""Resume records, the resume decision, the ATTACH token codec and the endpoint's
resend-or-replay choice (SECURITY.md property 19), without processes."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgxvtpm.enclaves.instance import InstanceEnclave
from sgxvtpm.enclaves.resume import (
    QUIET,
    RECORD,
    REPLAYED,
    QuietCommands,
    ResumeRecord,
    ResumeSlots,
    decide,
    new_epoch,
    password_sessions_only,
    quiet_command,
    replay_check,
)
from sgxvtpm.enclaves.sealing import SealError
from sgxvtpm.enclaves.state import Bundle
from sgxvtpm.enclaves.vtpm_core import VtpmCore
from sgxvtpm.endpoint.k2 import K2Client, K2Error
from sgxvtpm.platform.base import EnclaveIdentity
from sgxvtpm.platform.sim.platform_dir import SimPlatformDir
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import (
    TPM2_ALG,
    TPM2_CAP,
    TPM2_CC,
    TPM2_PT,
    TPM2_RC,
    TPM2_RH,
    TPM2_SU,
    TPMA_NV,
    TPMA_SESSION,
)
from sgxvtpm.tpm.engine import LibtpmsEngine, MemoryStateStore
from sgxvtpm.tpm.nv import execute
from sgxvtpm.tpm.session import parse_start_auth_session, start_auth_session
from sgxvtpm.wire.resume import (
    DIGEST_SIZE,
    REPLAY_MAX_BYTES,
    REPLAY_MAX_REQUESTS,
    AttachReply,
    ResumeToken,
    Unrecorded,
    answer_digest,
    attach_info,
    decode_attach_reply,
    encode_attach_reply,
    token_of,
)
from sgxvtpm.wire.vtpm import (
    VtpmProtocolError,
    VtpmRequest,
    decode_request,
    encode_request,
    encode_tpm_command,
    encode_tpm_response,
    tpm_response_of,
    unrecorded,
)

E1, E2 = "11" * 16, "22" * 16

records = st.builds(
    ResumeRecord,
    epoch=st.binary(min_size=16, max_size=16).map(bytes.hex),
    seq=st.integers(0, 2**63 - 1),
    state_version=st.integers(0, 2**64 - 1),
    running=st.booleans(),
    volatile=st.binary(max_size=64),
    last_code=st.none() | st.integers(0, 2**32 - 1),
    response=st.binary(max_size=64),
)


@given(records)
def test_record_round_trip(record: ResumeRecord) -> None:
    assert ResumeRecord.decode(record.encode()) == record


@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_record_or_seal_error(data: bytes) -> None:
    try:
        record = ResumeRecord.decode(data)
    except SealError:
        return
    assert record.encode() == data


def rec(seq: int, epoch: str = E1, version: int = 7, response: bytes = b"") -> ResumeRecord:
    return ResumeRecord(epoch, seq, version, True, b"vol%d" % seq, 0x17E, response)


def test_in_flight_request_that_ran_is_replayed() -> None:
    found = decide(ResumeToken(E1, 4, True), 7, [rec(4), rec(5, response=b"R5")])
    assert isinstance(found, ResumeRecord) and found.seq == 5 and found.response == b"R5"


def test_in_flight_request_that_never_ran_is_resent() -> None:
    found = decide(ResumeToken(E1, 4, True), 7, [rec(3), rec(4)])
    assert isinstance(found, ResumeRecord) and found.seq == 4


def test_idle_session_resumes_at_its_count_only() -> None:
    found = decide(ResumeToken(E1, 4, False), 7, [rec(4), rec(5)])
    assert isinstance(found, ResumeRecord) and found.seq == 4


def test_older_record_is_a_rollback() -> None:
    found = decide(ResumeToken(E1, 9, True), 7, [rec(3), rec(4)])
    assert isinstance(found, str) and "rollback refused" in found


def test_other_epoch_is_refused() -> None:
    found = decide(ResumeToken(E1, 4, False), 7, [rec(4, E2)])
    assert isinstance(found, str) and "another epoch" in found


def test_record_older_than_the_nv_commit_is_refused() -> None:
    # Slot 4 was written before request 5 committed NV (version 8): it describes
    # a TPM that no longer exists, even though the endpoint is at 4 (5 in flight).
    found = decide(ResumeToken(E1, 4, True), 8, [rec(4, version=7)])
    assert isinstance(found, str) and "version 8" in found


def test_quiet_requests_after_the_last_record_resume_from_it() -> None:
    # Requests 5..9 were quiet (answered UNRECORDED): the endpoint names record 4.
    found = decide(ResumeToken(E1, 9, False, recorded=4), 7, [rec(3), rec(4)])
    assert isinstance(found, ResumeRecord) and found.seq == 4
    found = decide(ResumeToken(E1, 9, True, recorded=4), 7, [rec(4), rec(10, response=b"R")])
    assert isinstance(found, ResumeRecord) and found.seq == 10  # request 10 ran: replayed


def test_a_record_before_the_last_recorded_request_is_a_rollback() -> None:
    found = decide(ResumeToken(E1, 9, True, recorded=4), 7, [rec(2), rec(3)])
    assert isinstance(found, str) and "rollback refused" in found
    # A record after the one the endpoint names (not its in-flight one) is no match either.
    found = decide(ResumeToken(E1, 9, False, recorded=4), 7, [rec(5)])
    assert isinstance(found, str) and "not at the endpoint's" in found


def test_a_token_cannot_name_a_record_after_its_count() -> None:
    with pytest.raises(VtpmProtocolError):
        ResumeToken(E1, 3, False, recorded=4)
    with pytest.raises(VtpmProtocolError):
        token_of(json.dumps({"resume": {"epoch": E1, "seq": 3, "recorded": 4}}).encode())


tokens = st.builds(
    lambda epoch, seq, in_flight, gap: ResumeToken(
        epoch, seq, in_flight, None if gap is None else max(0, seq - gap)),
    st.sampled_from([E1, E2]), st.integers(0, 8), st.booleans(), st.none() | st.integers(0, 8),
)


@settings(max_examples=300)
@given(st.lists(records, max_size=4), tokens, st.integers(0, 3))
def test_decide_only_ever_returns_a_record_the_token_allows(
    candidates: list[ResumeRecord], token: ResumeToken, version: int
) -> None:
    found = decide(token, version, candidates)
    if isinstance(found, ResumeRecord):
        assert found in candidates
        assert found.epoch == token.epoch and found.state_version == version
        assert found.seq == token.base or (token.in_flight and found.seq == token.seq + 1)


@given(tokens)
def test_tokens_round_trip(token: ResumeToken) -> None:
    assert token_of(json.dumps({"resume": token.to_json()}).encode()) == token


def test_new_epochs_differ() -> None:
    assert len({new_epoch() for _ in range(100)}) == 100


# ---------------------------------------------------------------- slot files


def slots(pd: SimPlatformDir, directory: Path, owner: str = "a" * 32) -> ResumeSlots:
    platform = pd.enclave_platform(EnclaveIdentity(b"\x01" * 32, bytes(range(32)), 2, 1))
    return ResumeSlots(platform, owner, directory)


def test_slots_round_trip_alternate_and_hold_no_plaintext(
    sim_platform: SimPlatformDir, tmp_path: Path
) -> None:
    s = slots(sim_platform, tmp_path)
    for seq in range(5):
        s.write(rec(seq, response=b"SECRET-RESPONSE-%d" % seq))
    assert sorted(r.seq for r in s.read()) == [3, 4]
    for path in tmp_path.glob("resume.*"):
        assert b"SECRET" not in path.read_bytes() and b"vol" not in path.read_bytes()


def test_slots_alternate_by_write_not_by_sequence(
    sim_platform: SimPlatformDir, tmp_path: Path
) -> None:
    """Records skip the quiet requests' numbers: two in a row of the same parity
    still go to both slots, so tearing the newer one leaves the older whole."""
    s = slots(sim_platform, tmp_path)
    s.write(rec(2))
    s.write(rec(4))
    assert sorted(r.seq for r in s.read()) == [2, 4]
    # A new process that resumed from 4 writes its next record over 2, not over 4.
    again = slots(sim_platform, tmp_path)
    found = next(r for r in again.read() if r.seq == 4)
    again.resumed_from(found)
    again.write(rec(8))
    assert sorted(r.seq for r in again.read()) == [4, 8]


def test_torn_and_tampered_slots_are_skipped(sim_platform: SimPlatformDir, tmp_path: Path) -> None:
    s = slots(sim_platform, tmp_path)
    s.write(rec(6))
    s.write(rec(7))
    torn = tmp_path / "resume.1"
    torn.write_bytes(torn.read_bytes()[:-10])
    assert [r.seq for r in s.read()] == [6]
    data = bytearray((tmp_path / "resume.0").read_bytes())
    data[-1] ^= 1
    (tmp_path / "resume.0").write_bytes(bytes(data))
    assert s.read() == []


def test_another_instances_slot_is_skipped(sim_platform: SimPlatformDir, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    slots(sim_platform, other, "b" * 32).write(rec(2))
    ours = slots(sim_platform, tmp_path)
    (tmp_path / "resume.0").write_bytes((other / "resume.0").read_bytes())
    assert ours.read() == []


def test_bundle_carries_its_resume_record_and_reads_older_bundles() -> None:
    record = rec(3).encode()
    for exported in (0, 5):
        bundle = Bundle({"instance_id": "x"}, {"permall": b"P"}, exported, record)
        assert Bundle.decode(bundle.encode()) == bundle
    old = Bundle({"instance_id": "x"}, {"permall": b"P"}, 5)
    assert Bundle.decode(old.encode()).resume == b""


# ---------------------------------------------------------------- ATTACH codec


@given(st.binary(min_size=16, max_size=16), st.integers(0, 2**63 - 1), st.booleans(),
       st.none() | st.binary(max_size=100), st.text(max_size=40))
def test_attach_reply_round_trip(
    epoch: bytes, seq: int, resumed: bool, response: bytes | None, reason: str
) -> None:
    reply = AttachReply(epoch.hex(), seq, resumed, reason, response)
    assert decode_attach_reply(encode_attach_reply(reply)) == reply


@given(st.binary(max_size=120))
def test_any_attach_payload_decodes_or_raises_the_protocol_error(data: bytes) -> None:
    try:
        reply = decode_attach_reply(data)
    except VtpmProtocolError:
        return
    assert (reply is None) == (data == b"")
    if reply is not None:  # what decodes is a reply this side could have sent
        assert decode_attach_reply(encode_attach_reply(reply)) == reply


@pytest.mark.parametrize("token", [
    {"epoch": "xyz", "seq": 1}, {"epoch": E1, "seq": -1}, {"epoch": E1, "seq": True},
    {"epoch": E1, "seq": 1, "in_flight": "yes"}, [E1, 1],
])
def test_invalid_tokens_are_protocol_errors(token: Any) -> None:
    with pytest.raises(VtpmProtocolError):
        token_of(json.dumps({"pid": 1, "resume": token}).encode())


def test_descriptions_without_a_token_are_fresh_attaches() -> None:
    assert token_of(b"") is None and token_of(b'{"pid": 3}') is None and token_of(b"\xff") is None
    token = ResumeToken(E1, 3, True)
    assert token_of(json.dumps({"resume": token.to_json()}).encode()) == token


# ---------------------------------------------------------------- the core


def test_core_resumes_pcrs_and_da_without_startup_and_stirs_its_drbg() -> None:
    store = MemoryStateStore()
    core = VtpmCore(lambda: LibtpmsEngine(store))
    core.handle(VtpmRequest.init())
    run = core.engine.process
    execute(run, wire.startup(TPM2_SU.CLEAR))
    attrs = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD
    execute(run, wire.nv_define_space(0x01500040, 4, attrs, auth=b"pw"))
    execute(run, wire.pcr_extend(16, hashlib.sha256(b"m").digest()))
    pcr = wire.parse_pcr_read(execute(run, wire.pcr_read([16]))).digests
    snapshot = core.snapshot()
    assert snapshot[0] and snapshot[1]
    randoms = []
    for _ in range(2):  # two crashes resumed from the same record
        core.engine.stop()  # the process died: no Shutdown
        core = VtpmCore(lambda: LibtpmsEngine(store))
        core.resume(*snapshot)
        run = core.engine.process
        assert wire.parse_pcr_read(execute(run, wire.pcr_read([16]))).digests == pcr
        execute(run, wire.nv_write(0x01500040, b"abcd", auth_handle=0x01500040, auth=b"pw"))
        props = wire.parse_tpm_properties(execute(
            run, wire.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)))[1]
        assert props[TPM2_PT.LOCKOUT_COUNTER] == 0
        randoms.append(wire.parse_get_random(execute(run, wire.get_random(16))))
    assert randoms[0] != randoms[1]  # the same DRBG state, stirred differently
    core.engine.stop()


def test_core_resumes_a_tpm_powered_on_and_awaiting_startup() -> None:
    """A kill between the platform's power-on (INIT) and the guest's TPM2_Startup
    (a VM resuming after Shutdown(STATE)): the record holds a TPM that answers
    TPM_RC_INITIALIZE to everything but Startup, the StirRandom too. It resumes
    (it was refused, so the guest's Startup(STATE) got TPM_RC_FAILURE), and
    Startup instantiates the DRBG anew, so two resumes give different randoms."""
    store = MemoryStateStore()
    core = VtpmCore(lambda: LibtpmsEngine(store))
    core.handle(VtpmRequest.init())
    execute(core.engine.process, wire.startup(TPM2_SU.CLEAR))
    execute(core.engine.process, wire.pcr_extend(14, hashlib.sha256(b"m").digest()))
    pcr = wire.parse_pcr_read(execute(core.engine.process, wire.pcr_read([14]))).digests
    execute(core.engine.process, wire.shutdown(TPM2_SU.STATE))
    core.handle(VtpmRequest.init())  # powered on again; no Startup yet
    snapshot, durable = core.snapshot(), dict(store.blobs)
    assert snapshot[0]
    randoms = []
    try:
        for _ in range(2):  # two crashes resumed from the same record and durable state
            core.engine.stop()
            core = VtpmCore(lambda: LibtpmsEngine(MemoryStateStore(durable)))
            core.resume(*snapshot)
            run = core.engine.process
            assert wire.response_code(run(wire.get_random(8))) == TPM2_RC.INITIALIZE
            execute(run, wire.startup(TPM2_SU.STATE))
            assert wire.parse_pcr_read(execute(run, wire.pcr_read([14]))).digests == pcr
            randoms.append(wire.parse_get_random(execute(run, wire.get_random(16))))
    finally:
        core.engine.stop()
    assert randoms[0] != randoms[1]


# ---------------------------------------------------------------- the endpoint


class ScriptedClient(K2Client):
    """K2Client's request logic over a script of session outcomes (no sockets)."""

    def __init__(self, sends: list[bytes | Exception], opens: list[AttachReply | Exception]):
        self._script_sends, self._script_opens = sends, opens
        self.sent: list[bytes] = []
        self.tokens: list[ResumeToken | None] = []
        super().__init__(None, reconnect_timeout=5)  # type: ignore[arg-type]
        self.binding = type("B", (), {"name": "vm1", "instance_id": "i"})()  # type: ignore[assignment]
        self._epoch, self._seq, self._recorded = E1, 4, 4
        self._tls = object()  # type: ignore[assignment]

    def _ended_while_idle(self) -> bool:
        return False

    def _send(self, payload: bytes) -> bytes:
        self.sent.append(payload)
        outcome = self._script_sends.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _open(self, token: ResumeToken | None) -> AttachReply | None:
        self.tokens.append(token)
        outcome = self._script_opens.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        self._epoch, self._seq = outcome.epoch, outcome.seq
        self._recorded = outcome.seq
        self._unrecorded.clear()
        return outcome


CMD = encode_tpm_command(wire.get_random(8))


def test_endpoint_takes_the_replayed_answer_instead_of_resending() -> None:
    client = ScriptedClient([K2Error("lost")], [AttachReply(E1, 5, True, response=b"ANSWER")])
    assert client.request(CMD) == b"ANSWER"
    assert client.sent == [CMD] and client.tokens == [ResumeToken(E1, 4, True, 4)]
    assert client._seq == 5


def test_endpoint_names_the_last_recorded_request_after_unrecorded_answers() -> None:
    """Answers the instance did not record reach the caller as plain successes; the
    token after a break names the last recorded request and carries the ones after
    it the instance asked to keep, numbered, with a digest of their answers."""
    answer = encode_tpm_response(b"\x80\x01" + bytes(8))
    client = ScriptedClient(
        [unrecorded(answer), answer, unrecorded(answer, keep=True), unrecorded(answer),
         K2Error("lost"), answer],
        [AttachReply(E1, 8, True)],
    )
    assert [client.request(CMD) for _ in range(4)] == [answer] * 4
    assert client._seq == 8 and client._recorded == 6
    assert client.request(CMD) == answer  # it never ran: resent after the resume
    kept = (Unrecorded(7, CMD, answer_digest(answer)),)
    assert client.tokens == [ResumeToken(E1, 8, True, recorded=6, unrecorded=kept)]
    assert client._seq == client._recorded == 9 and client._unrecorded == []


def test_endpoint_resends_what_never_ran_after_retries() -> None:
    client = ScriptedClient(
        [K2Error("lost"), b"OK"],
        [K2Error("hostd is not reachable"), K2Error("no such target"), AttachReply(E1, 4, True)],
    )
    assert client.request(CMD) == b"OK"
    assert client.sent == [CMD, CMD] and len(client.tokens) == 3 and client._seq == 5


def test_endpoint_reports_a_refused_resume_and_does_not_resend() -> None:
    client = ScriptedClient([K2Error("lost")], [AttachReply(E2, 0, False, "rollback refused")])
    with pytest.raises(K2Error, match="could not resume"):
        client.request(CMD)
    assert client.sent == [CMD] and client._epoch == E2 and client._seq == 0


def test_endpoint_gives_up_after_its_timeout() -> None:
    client = ScriptedClient([K2Error("lost")], [K2Error("refused")] * 100)
    client.reconnect_timeout = 0.3
    with pytest.raises(K2Error, match="within"):
        client.request(CMD)
    assert 2 <= len(client.tokens) < 10



# ---------------------------------------------------------------- quiet runs


def _answered(command: bytes, rc: int = 0) -> tuple[bytes, bytes]:
    return command, struct.pack(">HII", 0x8001, 10, rc)


AUDIT_ON_GET_RANDOM = wire.build_command(
    TPM2_CC.SetCommandCodeAuditStatus,
    wire.u16(TPM2_ALG.NULL) + wire.u32(1) + wire.u32(TPM2_CC.GetRandom) + wire.u32(0),
    [TPM2_RH.OWNER],
    [wire.password_session()],
)


def test_quiet_commands_are_read_only_commands_without_sessions_that_succeeded() -> None:
    assert quiet_command(*_answered(wire.get_random(8)))
    assert quiet_command(*_answered(wire.pcr_read([16])))
    assert not quiet_command(*_answered(wire.get_random(8), rc=TPM2_RC.FAILURE))
    assert not quiet_command(*_answered(wire.read_clock()))  # the clock must not go back
    assert not quiet_command(*_answered(wire.pcr_extend(16, bytes(32))))
    with_session = wire.build_command(TPM2_CC.GetRandom, wire.u16(8), [], [wire.password_session()])
    assert not quiet_command(*_answered(with_session))
    assert not quiet_command(b"\x80\x01", b"")


def test_a_changed_command_audit_list_ends_all_reuse() -> None:
    run = QuietCommands(command_audit_default=True)
    quiet = _answered(wire.get_random(8))
    assert run.unchanged(*quiet)
    assert not run.unchanged(*_answered(wire.pcr_extend(16, bytes(32))))
    assert not run.unchanged(None, None)  # a control request (INIT, locality, ...)
    assert run.command_audit_default
    assert not run.unchanged(AUDIT_ON_GET_RANDOM, None)  # the TPM failed while running it
    assert not run.command_audit_default
    assert [run.unchanged(*quiet) for _ in range(3)] == [False] * 3
    unknown = QuietCommands(command_audit_default=False)  # no mark in the sealed state
    assert [unknown.unchanged(*quiet) for _ in range(3)] == [False] * 3
    refused = QuietCommands(command_audit_default=True)
    assert not refused.unchanged(*_answered(AUDIT_ON_GET_RANDOM, rc=TPM2_RC.BAD_AUTH))
    assert not refused.unchanged(*quiet)  # whatever the answer: never again


@given(st.binary(min_size=10, max_size=40), st.binary(min_size=10, max_size=40))
def test_a_command_with_sessions_never_reuses_the_record(command: bytes, response: bytes) -> None:
    command = struct.pack(">H", 0x8002) + command[2:]
    assert not QuietCommands(command_audit_default=True).unchanged(command, response)


_CODES = st.sampled_from([int(c) for c in TPM2_CC][:40] + [int(TPM2_CC.GetRandom)] * 5
                          + [int(TPM2_CC.SetCommandCodeAuditStatus)])
_HEADERS = st.builds(
    lambda tag, code, tail: struct.pack(">HII", tag, 10 + len(tail), code) + tail,
    st.sampled_from([0x8001, 0x8002, 0]), _CODES, st.binary(max_size=8),
)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.none() | _HEADERS | st.binary(max_size=12),
                          st.binary(max_size=4) | st.just(b"\0" * 4),
                          st.sampled_from([0, 0x101]) | st.integers(0, 2**32 - 1)), max_size=6))
def test_the_per_request_check_agrees_with_unchanged(
    requests: list[tuple[bytes | None, bytes, int]],
) -> None:
    """unchanged_message reads the vTPM answer in place; it says what unchanged says
    of the TPM response inside it, request after request (the audit mark included)."""
    a, b = QuietCommands(True), QuietCommands(True)
    for command, head, rc in requests:
        message = head + struct.pack(">HII", 0x8001, 10, rc)
        expected = a.unchanged(command, tpm_response_of(message))
        assert b.unchanged_message(command, message) == expected
        assert a.command_audit_default == b.command_audit_default


def _exclusive_after_audited_get_random(core: VtpmCore, session: int) -> bool:
    """Send GetRandom with ``session`` as its audit session: is it the exclusive one?"""
    area = wire.u32(session) + wire.tpm2b(bytes(16)) + wire.u8(
        TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.AUDIT) + wire.tpm2b(b"")
    response = execute(core.engine.process,
                       wire.build_command(TPM2_CC.GetRandom, wire.u16(8), [], [area]))
    # ... nonceTPM, sessionAttributes, hmac (empty: an unbound, unsalted session)
    assert response[-2:] == b"\0\0"
    return bool(response[-3] & TPMA_SESSION.AUDITEXCLUSIVE)


def test_no_resume_brings_an_exclusive_audit_session_back() -> None:
    """Why QuietCommands may reuse the record from before a quiet command, which ends an
    exclusive audit session: on libtpms, a resume from a record taken while the
    session was exclusive answers as after the quiet command (not exclusive)."""
    store = MemoryStateStore()
    core = VtpmCore(lambda: LibtpmsEngine(store))
    core.handle(VtpmRequest.init())
    execute(core.engine.process, wire.startup(TPM2_SU.CLEAR))
    start = start_auth_session(TPM2_RH.NULL, bytes(16), b"", symmetric=wire.u16(TPM2_ALG.NULL))
    session, _ = parse_start_auth_session(execute(core.engine.process, start))
    assert _exclusive_after_audited_get_random(core, session)
    exclusive = core.snapshot()
    assert _exclusive_after_audited_get_random(core, session)  # nothing ran in between
    execute(core.engine.process, wire.get_random(8))  # a quiet command ends it
    assert not _exclusive_after_audited_get_random(core, session)
    after = core.snapshot()
    answers = []
    for snapshot in (exclusive, after):
        core.engine.stop()  # the process died
        core = VtpmCore(lambda: LibtpmsEngine(store))
        core.resume(*snapshot)
        answers.append(_exclusive_after_audited_get_random(core, session))
    assert answers == [False, False]
    core.engine.stop()


# ---------------------------------------------------------------- the instance's choice


class _FailingSlots:
    """Slot files whose next ``failures`` writes fail (a full or failing disk)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.written: list[ResumeRecord] = []

    def write(self, record: ResumeRecord) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        self.written.append(record)


def test_quiet_requests_are_recorded_again_after_a_record_that_was_not_written() -> None:
    """The instance skips a quiet request's record only while its last record is on
    disk: after a failed slot write the next request, quiet or not, writes one,
    so a later resume does not depend on the record that was lost."""
    core = VtpmCore(lambda: LibtpmsEngine(MemoryStateStore()))
    core.engine.start()
    execute(core.engine.process, wire.startup(TPM2_SU.CLEAR))
    core.answer(encode_tpm_command(wire.get_random(8)), (wire.get_random(8), 0))
    slots = _FailingSlots(failures=1)
    enclave: Any = SimpleNamespace(
        core=core, slots=slots, instance_id="x", _live=None, _seq=0, _unsaved=False,
        store=SimpleNamespace(dirty=False, file=SimpleNamespace(version=3)),
        _unrecorded=0,
        _unrecorded_bytes=0,
        _changed=False,
    )
    InstanceEnclave._record(enclave, E1, 1, b"R1")
    assert slots.written == [] and enclave._live.seq == 1
    assert not InstanceEnclave._may_skip_record(enclave, enclave._live, 10)
    InstanceEnclave._record(enclave, E1, 2, b"R2", unchanged=True)
    assert [r.seq for r in slots.written] == [2]
    assert InstanceEnclave._may_skip_record(enclave, enclave._live, 10)
    core.engine.stop()


# ---------------------------------------------------------------- replayed runs

unrecorded_entries = st.lists(
    st.tuples(st.binary(max_size=REPLAY_MAX_BYTES // REPLAY_MAX_REQUESTS),
              st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE), st.integers(1, 3)),
    max_size=REPLAY_MAX_REQUESTS,
)


def _kept(base: int, entries: list[tuple[bytes, bytes, int]]) -> tuple[Unrecorded, ...]:
    """Unrecorded requests numbered after ``base``, ``gap`` apart (quiet ones between)."""
    kept, seq = [], base
    for request, digest, gap in entries:
        seq += gap
        kept.append(Unrecorded(seq, request, digest))
    return tuple(kept)


@given(tokens, unrecorded_entries, st.dictionaries(st.sampled_from(["pid", "endpoint"]),
                                                  st.integers() | st.text(max_size=20)))
def test_tokens_with_their_unrecorded_requests_round_trip_through_attach(
    token: ResumeToken, entries: list[tuple[bytes, bytes, int]], about: dict[str, Any]
) -> None:
    kept = _kept(token.base, entries)
    end = kept[-1].seq if kept else token.seq
    token = ResumeToken(token.epoch, max(end, token.seq), token.in_flight, token.base, kept)
    info = attach_info(about, token)
    assert token_of(decode_request(encode_request(VtpmRequest.attach(0, info))).data) == token
    assert token_of(attach_info(about, None)) is None


@given(st.binary(max_size=200))
def test_any_resume_log_decodes_or_raises_the_protocol_error(log: bytes) -> None:
    head = json.dumps({"resume": ResumeToken(E1, 40, recorded=0).to_json()}).encode()
    try:
        token = token_of(head + b"\0" + log)
    except VtpmProtocolError:
        return
    assert token is not None and token.unrecorded
    assert token_of(attach_info({}, token)) == token


def test_tokens_keep_no_more_than_an_instance_leaves_unrecorded_and_in_order() -> None:
    digest = bytes(DIGEST_SIZE)
    many = tuple(Unrecorded(i, b"x", digest) for i in range(1, REPLAY_MAX_REQUESTS + 2))
    ResumeToken(E1, 40, recorded=0, unrecorded=many[:-1])
    for bad in (many,
                (Unrecorded(1, b"x" * (REPLAY_MAX_BYTES + 1), digest),),
                (Unrecorded(1, b"x", b"short"),),
                (Unrecorded(2, b"x", digest), Unrecorded(2, b"y", digest)),  # twice
                (Unrecorded(3, b"x", digest), Unrecorded(2, b"y", digest)),  # out of order
                (Unrecorded(41, b"x", digest),)):  # after the count
        with pytest.raises(VtpmProtocolError):
            ResumeToken(E1, 40, recorded=0, unrecorded=bad)
    with pytest.raises(VtpmProtocolError):  # at or before the last recorded request
        ResumeToken(E1, 40, recorded=5, unrecorded=(Unrecorded(5, b"x", digest),))
    head = json.dumps({"resume": ResumeToken(E1, 40, recorded=0).to_json()}).encode()
    log = attach_info({}, ResumeToken(E1, 40, recorded=0, unrecorded=many[:-1])).partition(
        b"\0")[2]
    extra = struct.pack(">QI", 40, 1) + b"x" + digest
    with pytest.raises(VtpmProtocolError):
        token_of(head + b"\0" + log + extra)
    with pytest.raises(VtpmProtocolError):  # a log without a token to go with
        token_of(b'{"pid": 3}\0' + extra)


def _message(rc: int = 0) -> bytes:
    return encode_tpm_response(struct.pack(">HII", 0x8001, 10, rc))


HMAC_SESSION = wire.u32(0x02000000) + wire.tpm2b(bytes(16)) + wire.u8(1) + wire.tpm2b(bytes(32))


def test_replayed_commands_are_deterministic_ones_with_password_sessions_that_succeeded() -> None:
    run = QuietCommands(command_audit_default=True)
    extend = wire.pcr_extend(16, bytes(32))
    primary = wire.create_primary(wire.ecc_p256_template())
    assert run.kind_of(extend, _message()) == REPLAYED
    assert run.kind_of(primary, _message()) == REPLAYED
    assert run.kind_of(wire.flush_context(0x80000000), _message()) == REPLAYED
    assert run.kind_of(wire.sign(0x80000000, bytes(32)), _message()) == REPLAYED
    assert run.kind_of(wire.nv_read(0x01500030, 8, auth_handle=0x01500030), _message()) == REPLAYED
    assert run.kind_of(wire.get_random(8), _message()) == QUIET
    assert run.kind_of(extend, _message(TPM2_RC.FAILURE)) == RECORD
    assert run.kind_of(wire.read_clock(), _message()) == RECORD
    assert run.kind_of(wire.nv_increment(0x01500031), _message()) == RECORD  # NV: committed
    hmac = wire.build_command(
        TPM2_CC.PCR_Extend,
        wire.u32(1) + wire.u16(TPM2_ALG.SHA256) + bytes(32),
        [16],
        [HMAC_SESSION],
    )
    assert run.kind_of(hmac, _message()) == RECORD  # its nonces are random
    assert run.kind_of(None, _message()) == RECORD
    assert not password_sessions_only(hmac, 1)
    assert password_sessions_only(extend, 1)
    two = wire.build_command(
        TPM2_CC.PCR_Extend,
        wire.u32(1) + wire.u16(TPM2_ALG.SHA256) + bytes(32),
        [16],
        [wire.password_session(), HMAC_SESSION],
    )
    assert not password_sessions_only(two, 1)
    assert run.kind_of(AUDIT_ON_GET_RANDOM, _message()) == RECORD
    assert run.kind_of(extend, _message()) == RECORD  # the audit digest would differ


@given(st.binary(max_size=64), st.integers(0, 3))
def test_any_command_bytes_are_read_without_an_exception(command: bytes, handles: int) -> None:
    command = struct.pack(">HII", 0x8002, 10 + len(command), TPM2_CC.PCR_Extend) + command
    password_sessions_only(command, handles)
    assert QuietCommands(True).kind_of(command, _message()) in (RECORD, REPLAYED)


def test_a_rerun_must_succeed_and_but_for_signatures_answer_the_same() -> None:
    extend, sign = wire.pcr_extend(16, bytes(32)), wire.sign(0x80000000, bytes(32))
    answer = _message()
    entry = Unrecorded(5, encode_tpm_command(extend), answer_digest(answer))
    assert replay_check(extend, entry, answer, REPLAYED) == ""
    assert "other bytes" in replay_check(extend, entry, _message(1), REPLAYED)
    assert "failed" in replay_check(extend, entry, answer, RECORD)
    other = Unrecorded(6, encode_tpm_command(sign), answer_digest(b"another signature"))
    assert replay_check(sign, other, answer, REPLAYED) == ""


def _live_enclave(seq: int, answer: bytes = b"") -> Any:
    live = ResumeRecord(E1, 4, 7, True, b"V", TPM2_CC.PCR_Extend, b"R4")
    return SimpleNamespace(core=object(), _live=live, _seq=seq, _answer=answer)


def test_a_live_instance_answers_an_unrecorded_request_that_ran_instead_of_running_it_again() -> (
    None
):
    """The session broke, the instance did not: the TPM is as it left it, the token's
    unrecorded requests are not run again, and an in-flight one that ran is answered."""
    ran = _live_enclave(seq=7, answer=b"A7")
    found = InstanceEnclave._resume(ran, ResumeToken(E1, 6, True, recorded=4))
    assert found == (ran._live, 7, b"A7")
    idle = _live_enclave(seq=6)
    assert InstanceEnclave._resume(idle, ResumeToken(E1, 6, True, recorded=4)) == (
        idle._live,
        6,
        None,
    )
    assert InstanceEnclave._resume(idle, ResumeToken(E1, 6, False, recorded=4)) == (
        idle._live,
        6,
        None,
    )
    why = InstanceEnclave._resume(idle, ResumeToken(E1, 5, False, recorded=4))
    assert isinstance(why, str) and "counts 5" in why
