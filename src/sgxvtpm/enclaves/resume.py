"""Resume records: what an instance needs to come back after a crash as it was.

After every request of its endpoint that may have changed the TPM, the
instance records, sealed, what TPM2_Shutdown(STATE) would have saved
(libtpms' VOLATILE state: PCRs, loaded objects, sessions, the DA state) with
the request's sequence number and its encoded response (:class:`ResumeRecord`).
A request that changed NV carries its record inside the sealed state bundle's
one atomic, counted commit (state.py); the others write it in place
(``pwrite``, no fsync: a power loss ends the VM too) into one of two slot
files, alternately, so a torn write leaves the other slot whole
(:class:`ResumeSlots`).

Freshness comes from the endpoint, which counts its requests, holds the
epoch and the number of the last request the instance recorded
(sgxvtpm/wire/resume.py): :func:`decide` accepts only a record of the
token's epoch at that request (or at count + 1 with a request in flight)
whose state version is the sealed bundle's. An older slot file put back by
the host names an older request and is refused; a slot older than an NV
commit names an older state version and is refused.

Reading libtpms' VOLATILE state is most of a record's cost (about 11 µs in
a loop, 25 µs in the enclave process between two requests), sealing and
writing it the rest (about 15 µs), so the instance writes none after most
requests (:meth:`QuietCommands.kind_of`, instance.py ``_may_skip_record``):

- after a read-only command (:data:`QUIET_COMMANDS`, without sessions,
  answered TPM_RC_SUCCESS) the TPM's VOLATILE state is the last record's;
- after one of :data:`REPLAYED_COMMANDS` (PCR_Extend, CreatePrimary,
  FlushContext, ...; without sessions or with password sessions only,
  answered TPM_RC_SUCCESS) it is what running the same request again on
  the state before it makes: nothing in it depends on a random value or on
  a session's nonces.

Either way only while the TPM's command audit list is the manufacturer's,
NV did not change (the commit carries a record), the last record reached
its slot file, its command code is neither none nor TPM2_Shutdown (which a
later INIT looks at), and fewer than REPLAY_MAX_REQUESTS requests
(REPLAY_MAX_BYTES) of the second kind went unrecorded since it
(sgxvtpm/wire/resume.py). The answer carries
:data:`~sgxvtpm.wire.vtpm.UNRECORDED` (quiet) or
:data:`~sgxvtpm.wire.vtpm.KEEP` (replayed) instead of success, inside K2;
for KEEP the endpoint keeps the request, its number and a digest of its
answer, and sends them in its token. A freshly started instance resumes from the last
record, then runs those requests again (:func:`replay_check`): each must be
one it could have left unrecorded, succeed again and, but for
:data:`ANSWERS_VARY`, answer the same bytes; else the resume is refused
and the TPM stays off. An unrecorded request in flight at a crash never
reached a record: the endpoint sends it again. (When a record must be
written anyway after quiet commands only, e.g. the first command since the
TPM started, it carries the previous record's VOLATILE state, not read
again.)
Why a resume from it answers as
the TPM would have:

- such a command has no session to update and no authorization (no DA);
- it ends an exclusive audit session (BuildResponseSession clears it for any
  command that allows sessions), but no resume brings one back: the resume's
  TPM2_StirRandom, sent without sessions, ends it too (tests/unit/test_resume.py);
- an audited command extends the command audit digest: the sealed state's
  provisioning carries ``command_audit: "default"`` from manufacturing (only
  SetCommandCodeAuditStatus is audited) until a SetCommandCodeAuditStatus
  comes (then, and for states without the mark, every record is read in full);
- GetRandom advances the DRBG: a resume stirs the DRBG with fresh entropy
  (VtpmCore.resume), so nothing it answered before can repeat;
- TPM2_ReadClock is not one of them: a resumed TPM's clock must not be
  behind one the guest has read.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sgxvtpm.enclaves.sealing import Sealer, SealError, SealKind
from sgxvtpm.platform.base import EnclavePlatform
from sgxvtpm.tpm.constants import TPM2_CC, TPM2_RC, TPM2_RH, TPM2_ST
from sgxvtpm.wire.resume import EPOCH_BYTES, ResumeToken, Unrecorded, answer_digest
from sgxvtpm.wire.vtpm import encode_tpm_response

_HEAD = struct.Struct(">4s16sQQBI")  # magic, epoch, seq, state version, flags, last code
_MAGIC = b"SVR1"
_RUNNING, _HAS_LAST = 1, 2
_U32 = struct.Struct(">I")
SLOT_NAMES = ("resume.0", "resume.1")
_AAD = b"sgxvtpm resume record v1"


@dataclass(frozen=True)
class ResumeRecord:
    """The instance after request ``seq`` of ``epoch`` (0: right after ATTACH)."""

    epoch: str
    seq: int
    state_version: int
    running: bool
    volatile: bytes = b""
    last_code: int | None = None
    response: bytes = b""

    def encode(self) -> bytes:
        flags = (_RUNNING if self.running else 0) | (_HAS_LAST if self.last_code is not None else 0)
        head = _HEAD.pack(_MAGIC, bytes.fromhex(self.epoch), self.seq, self.state_version,
                          flags, self.last_code or 0)
        return b"".join((head, _U32.pack(len(self.volatile)), self.volatile,
                         _U32.pack(len(self.response)), self.response))

    @classmethod
    def decode(cls, data: bytes) -> ResumeRecord:
        """The record; SealError if ``data`` is not one (never another exception)."""
        try:
            magic, epoch, seq, version, flags, last = _HEAD.unpack_from(data)
            offset = _HEAD.size
            parts = []
            for _ in range(2):
                (size,) = _U32.unpack_from(data, offset)
                offset += 4
                if offset + size > len(data):
                    raise ValueError("short")
                parts.append(bytes(data[offset : offset + size]))
                offset += size
        except (struct.error, ValueError):
            raise SealError("resume record is malformed") from None
        if magic != _MAGIC or offset != len(data) or flags & ~(_RUNNING | _HAS_LAST):
            raise SealError("resume record is malformed")
        return cls(epoch.hex(), seq, version, bool(flags & _RUNNING), parts[0],
                   last if flags & _HAS_LAST else None, parts[1])


#: Commands that change nothing in the VOLATILE state but the exclusive audit
#: session, the command audit digest and the DRBG when sent without sessions
#: (see the module doc; Part 3 of the TPM 2.0 library specification).
QUIET_COMMANDS = frozenset({
    TPM2_CC.GetRandom, TPM2_CC.PCR_Read, TPM2_CC.GetCapability, TPM2_CC.ReadPublic,
    TPM2_CC.NV_ReadPublic, TPM2_CC.GetTestResult,
})  # fmt: skip
#: Commands whose effect on the VOLATILE state is the same when the same bytes
#: run again on the state before them, with the number of handles before the
#: authorization area: nothing they change depends on the DRBG, the clock or
#: a session's nonces (sessions other than passwords are never replayed).
REPLAYED_COMMANDS: dict[int, int] = {
    TPM2_CC.PCR_Extend: 1, TPM2_CC.PCR_Event: 1, TPM2_CC.PCR_Reset: 1,
    TPM2_CC.CreatePrimary: 1, TPM2_CC.Load: 1, TPM2_CC.LoadExternal: 0,
    TPM2_CC.FlushContext: 0, TPM2_CC.VerifySignature: 1, TPM2_CC.Sign: 1,
    TPM2_CC.NV_Read: 2, TPM2_CC.Unseal: 1,
}  # fmt: skip
#: Commands whose answer may differ when run again (a signature's random
#: nonce, random bytes): a replay checks only that it succeeds.
ANSWERS_VARY = frozenset({TPM2_CC.Sign}) | QUIET_COMMANDS
RECORD, QUIET, REPLAYED = 0, 1, 2  # QuietCommands.kind_of
_TPM_HEADER = struct.Struct(">HII")  # tag, size, command or response code
_SESSION_HEAD = struct.Struct(">IH")  # session handle, nonce size
_U16 = struct.Struct(">H")
_OK = encode_tpm_response(b"")  # a successful TPM_COMMAND answer's vTPM header
_OK_SIZE = len(_OK)
# kind_of runs for every request: one dict lookup per command code (-1: quiet,
# else the handles of a replayed one) and plain ints, not Enum members (a member
# looked up on its class costs ~0.1 µs in CPython 3.11).
assert not QUIET_COMMANDS & REPLAYED_COMMANDS.keys()
_UNCHANGING = {int(code): -1 for code in QUIET_COMMANDS} | {
    int(code): handles for code, handles in REPLAYED_COMMANDS.items()}
_AUDIT_STATUS = int(TPM2_CC.SetCommandCodeAuditStatus)
_NO_SESSIONS, _SESSIONS = int(TPM2_ST.NO_SESSIONS), int(TPM2_ST.SESSIONS)
_RC_AT = _OK_SIZE + 6  # the TPM response code in a vTPM answer
_RC_SUCCESS = _U32.pack(TPM2_RC.SUCCESS)
_PW = int(TPM2_RH.PW)
COMMAND_AUDIT_DEFAULT = "default"


def quiet_command(command: bytes, response: bytes) -> bool:
    """True if TPM ``command``, answered ``response``, is one of :data:`QUIET_COMMANDS`
    sent without sessions and answered TPM_RC_SUCCESS."""
    return QuietCommands(command_audit_default=True).unchanged(command, response)


class QuietCommands:
    """Whether the TPM's VOLATILE state after a request is the one last recorded
    (see the module doc). :meth:`unchanged` is told every TPM command the core
    answered, in order."""

    def __init__(self, command_audit_default: bool) -> None:
        self.command_audit_default = command_audit_default

    def unchanged(self, command: bytes | None, response: bytes | None) -> bool:
        """``command`` None: not a TPM command; ``response`` None: not a TPM answer."""
        return self.unchanged_message(command, b"" if response is None else _OK + response)

    def unchanged_message(self, command: bytes | None, message: bytes) -> bool:
        """:meth:`unchanged` with the vTPM answer ``message`` as the instance sends it
        (sgxvtpm/wire/vtpm.py), read in place."""
        return self.kind_of(command, message) == QUIET

    def kind_of(self, command: bytes | None, message: bytes) -> int:
        """How the request answered ``message`` (the vTPM answer, read in place) may
        go without a record: RECORD (it may not), QUIET (the VOLATILE state is as
        before it) or REPLAYED (running it again makes it again; see the module doc)."""
        if command is None or len(command) < _TPM_HEADER.size:
            return RECORD
        tag, _, code = _TPM_HEADER.unpack_from(command)
        if code == _AUDIT_STATUS:
            self.command_audit_default = False
            return RECORD
        handles = _UNCHANGING.get(code)
        if (
            handles is None or not self.command_audit_default
            or message[_RC_AT : _RC_AT + _U32.size] != _RC_SUCCESS
            or message[:_OK_SIZE] != _OK
        ):  # fmt: skip
            return RECORD
        if handles < 0:
            return QUIET if tag == _NO_SESSIONS else RECORD
        if password_sessions_only(command, handles):
            return REPLAYED
        return RECORD


def password_sessions_only(command: bytes, handles: int) -> bool:
    """True if TPM ``command`` has no sessions, or only password sessions
    (TPM_RS_PW, no nonce), after its ``handles`` handles."""
    tag = _TPM_HEADER.unpack_from(command)[0]
    if tag == _NO_SESSIONS:
        return True
    if tag != _SESSIONS:
        return False
    try:
        offset = _TPM_HEADER.size + 4 * handles
        size: int = _U32.unpack_from(command, offset)[0]
        offset += _U32.size
        end = offset + size
        if end > len(command) or offset == end:
            return False
        while offset < end:
            handle, nonce = _SESSION_HEAD.unpack_from(command, offset)
            if handle != _PW or nonce:
                return False
            offset += _SESSION_HEAD.size + 1  # and the session attributes
            offset += _U16.size + _U16.unpack_from(command, offset)[0]  # the password
        return offset == end
    except struct.error:
        return False


def replay_check(command: bytes, entry: Unrecorded, answer: bytes, kind: int) -> str:
    """Why ``answer``, what running ``entry`` (TPM ``command``) again gave, is not
    the one it gave before (``kind``: what QuietCommands.kind_of said of it);
    empty if it is."""
    if kind == RECORD:
        return "it is not one an instance leaves unrecorded, or it failed"
    code = _TPM_HEADER.unpack_from(command)[2]
    if code not in ANSWERS_VARY and answer_digest(answer) != entry.digest:
        return "it answered other bytes than before"
    return ""


def new_epoch() -> str:
    return os.urandom(EPOCH_BYTES).hex()


def decide(
    token: ResumeToken, state_version: int, records: Iterable[ResumeRecord]
) -> ResumeRecord | str:
    """The record to resume from for ``token``, or why there is none.

    Only records of the sealed state's version count (a record older than
    the last NV commit describes a TPM that no longer exists). Among them,
    one of the token's epoch at ``seq + 1`` when a request was in flight (it
    ran: its response is replayed), else at the last request the instance
    recorded, ``token.base`` (the in-flight one never ran, its effects were
    never committed, or it went unrecorded: the endpoint resends it; the
    requests after ``base`` are the token's unrecorded ones, run again on it).
    """
    current = [r for r in records if r.state_version == state_version]
    ours = {r.seq: r for r in current if r.epoch == token.epoch}
    if token.in_flight and token.seq + 1 in ours:
        return ours[token.seq + 1]
    base = token.base
    if base in ours:
        return ours[base]
    if not current:
        return f"no resume record of the sealed state's version {state_version}"
    if not ours:
        return "the resume records are of another epoch (another endpoint attached since)"
    newest = max(ours)
    if newest < base:
        return (f"the newest resume record is at request {newest}, the endpoint's last"
                f" recorded request is {base}: an older record (rollback refused)")
    return (f"the resume records are at request {newest}, not at the endpoint's last"
            f" recorded request {base}")


class ResumeSlots:
    """Two slot files in the instance's directory, sealed records written in place."""

    def __init__(self, platform: EnclavePlatform, instance_id: str, directory: Path) -> None:
        self._sealer = Sealer(platform, SealKind.RESUME_RECORD, instance_id)
        self._paths = [directory / name for name in SLOT_NAMES]
        self._fds: list[int] = []
        #: The slot the next record goes to: never the one with the record a
        #: resume may still need (the last written, or the one resumed from).
        self._next = 0
        self._read: dict[tuple[str, int], int] = {}  # (epoch, seq) -> slot, of read()

    def _open(self) -> list[int]:
        if not self._fds:
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            self._fds = [os.open(path, flags, 0o600) for path in self._paths]
        return self._fds

    def seal(self, record: ResumeRecord) -> bytes:
        return self._sealer.seal_bare(record.encode(), _AAD)

    def unseal(self, blob: bytes) -> ResumeRecord:
        return ResumeRecord.decode(self._sealer.unseal_bare(blob, _AAD))

    def write(self, record: ResumeRecord) -> None:
        """Into the slot after the last one written: one pwritev of length + sealed
        record (no fsync), so a torn write leaves the other slot's record whole."""
        blob = self.seal(record)
        slot = self._next
        os.pwritev(self._open()[slot], (_U32.pack(len(blob)), blob), 0)
        self._next = 1 - slot

    def read(self) -> list[ResumeRecord]:
        """The records that unseal; torn, tampered and foreign slots are skipped."""
        records = []
        self._read = {}
        for slot, path in enumerate(self._paths):
            try:
                data = path.read_bytes()
                (size,) = _U32.unpack_from(data)
                record = self.unseal(data[4 : 4 + size])
            except (OSError, struct.error, SealError, ValueError):
                continue
            records.append(record)
            self._read[(record.epoch, record.seq)] = slot
        return records

    def resumed_from(self, record: ResumeRecord) -> None:
        """A resume starts from ``record`` (one :meth:`read` returned, or the sealed
        bundle's): the next record goes into the other slot."""
        slot = self._read.get((record.epoch, record.seq))
        if slot is not None:
            self._next = 1 - slot

    def erase(self) -> None:
        self.close()
        for path in self._paths:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
