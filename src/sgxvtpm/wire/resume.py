"""Resuming a VM's TPM after a crash: what ATTACH carries and what it answers.

An endpoint holds its VM's resume token, so the host cannot roll the TPM
back by putting older files back (SECURITY.md property 19). Every ATTACH
reply starts an *epoch* or continues one, and says where:

- ATTACH without a token starts a new epoch (random, chosen by the instance)
  at sequence 0. The endpoint counts the requests it sends after ATTACH.
- After its session breaks, the endpoint ATTACHes with
  :class:`ResumeToken` (epoch, the count of requests answered, whether one
  was in flight, the last request the instance recorded). The instance
  resumes only from its record of that epoch at that last recorded request,
  or at count + 1 when a request was in flight; then the reply
  carries the in-flight request's response, which the endpoint returns
  instead of sending it again. Anything else is refused with a reason, and
  the session starts a new epoch on a TPM that is not running.
- The instance need not record every request (sgxvtpm/enclaves/resume.py):
  an answer marked :data:`~sgxvtpm.wire.vtpm.UNRECORDED` or
  :data:`~sgxvtpm.wire.vtpm.KEEP` was not recorded; for KEEP the endpoint
  keeps the request, its number and a digest of its answer
  (:class:`Unrecorded`) until an answer comes that was recorded. The token
  carries them (at most :data:`REPLAY_MAX_REQUESTS` requests of
  :data:`REPLAY_MAX_BYTES` in all, a bound the instance keeps); a freshly
  started instance runs them again on the record they follow.

The token lives in ATTACH's description (request: the ``"resume"`` member
of the endpoint's JSON, then a NUL byte and the unrecorded requests, see
:func:`attach_info`); the reply is ATTACH's payload (see
:func:`encode_attach_reply`). Endpoints of earlier versions send no token
and ignore the payload.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

from sgxvtpm.wire.vtpm import (
    MAX_ATTACH_INFO,
    MAX_MESSAGE,
    MAX_RESUME_LOG,
    VtpmProtocolError,
    VtpmUsageError,
)

EPOCH_BYTES = 16
_EPOCH = re.compile(r"[0-9a-f]{32}")
_U32 = struct.Struct(">I")
_MAX_SEQ = 2**63 - 1
#: The reply's JSON part stays small; the response after it is raw bytes.
_MAX_REPLY_JSON = 4096
#: The most requests an instance answers without a record (all of them since
#: its last recorded one), and the most bytes of them: what a resume may have
#: to run again.
REPLAY_MAX_REQUESTS = 32
REPLAY_MAX_BYTES = 8192
DIGEST_SIZE = 16
_ENTRY = struct.Struct(">QI")  # its number, request size; then the request, the answer's digest
assert REPLAY_MAX_REQUESTS * (_ENTRY.size + DIGEST_SIZE) + REPLAY_MAX_BYTES <= MAX_RESUME_LOG


def answer_digest(answer: bytes) -> bytes:
    """The digest an :class:`Unrecorded` keeps of a TPM_COMMAND answer (as
    sgxvtpm.wire.vtpm.encode_tpm_response makes it, not marked)."""
    return hashlib.sha256(answer).digest()[:DIGEST_SIZE]


@dataclass(frozen=True)
class Unrecorded:
    """A request the instance answered without recording it and asked to keep: its
    number in the epoch, the request message and :func:`answer_digest` of its answer."""

    seq: int
    request: bytes
    digest: bytes


def _seq(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_SEQ:
        raise VtpmProtocolError(f"resume sequence {value!r} is not a count")
    return value


def _epoch(value: object) -> str:
    if not isinstance(value, str) or not _EPOCH.fullmatch(value):
        raise VtpmProtocolError("resume epoch is not 32 hex digits")
    return value


@dataclass(frozen=True)
class ResumeToken:
    """The endpoint's word: requests of ``epoch`` answered so far, one maybe in flight,
    and the last of them the instance recorded (``recorded``; None: ``seq``).

    The instance does not record a request that left the TPM's VOLATILE state
    as it last recorded it, and says so in the answer
    (sgxvtpm/wire/vtpm.py: :data:`~sgxvtpm.wire.vtpm.UNRECORDED`).
    """

    epoch: str
    seq: int
    in_flight: bool = False
    recorded: int | None = None
    #: The requests after ``recorded``, in order (:class:`Unrecorded`).
    unrecorded: tuple[Unrecorded, ...] = ()

    def __post_init__(self) -> None:
        if self.recorded is not None and self.recorded > self.seq:
            raise VtpmProtocolError(f"resume recorded {self.recorded} is after seq {self.seq}")
        if (
            len(self.unrecorded) > REPLAY_MAX_REQUESTS
            or sum(len(u.request) for u in self.unrecorded) > REPLAY_MAX_BYTES
        ):
            raise VtpmProtocolError(
                "resume token keeps more requests than an instance answers without a record"
            )
        if any(len(u.digest) != DIGEST_SIZE for u in self.unrecorded):
            raise VtpmProtocolError("resume token has a digest of the wrong size")
        numbers = [self.base, *(u.seq for u in self.unrecorded)]
        if any(a >= b for a, b in itertools.pairwise(numbers)) or numbers[-1] > self.seq:
            raise VtpmProtocolError("resume token keeps requests out of order or out of range")

    @property
    def base(self) -> int:
        """The request whose record a resume starts from (when none was in flight)."""
        return self.seq if self.recorded is None else self.recorded

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"epoch": self.epoch, "seq": self.seq, "in_flight": self.in_flight}
        if self.recorded is not None:
            obj["recorded"] = self.recorded
        return obj

    @classmethod
    def from_json(cls, obj: object) -> ResumeToken:
        if not isinstance(obj, dict):
            raise VtpmProtocolError("resume token is not an object")
        in_flight = obj.get("in_flight", False)
        if not isinstance(in_flight, bool):
            raise VtpmProtocolError("resume in_flight is not a boolean")
        recorded = obj.get("recorded")
        return cls(_epoch(obj.get("epoch")), _seq(obj.get("seq")), in_flight,
                   None if recorded is None else _seq(recorded))


def attach_info(about: dict[str, Any], token: ResumeToken | None) -> bytes:
    """ATTACH's description: ``about`` as JSON, with ``token`` in it and its unrecorded
    requests after a NUL byte (JSON has none of its own)."""
    if token is None:
        return json.dumps(about).encode()
    head = json.dumps({**about, "resume": token.to_json()}).encode()
    if len(head) > MAX_ATTACH_INFO:
        raise VtpmUsageError(f"ATTACH description of {len(head)} bytes exceeds {MAX_ATTACH_INFO}")
    if not token.unrecorded:
        return head
    log = b"".join(
        _ENTRY.pack(u.seq, len(u.request)) + u.request + u.digest for u in token.unrecorded
    )
    return head + b"\0" + log


def _unrecorded(log: bytes) -> tuple[Unrecorded, ...]:
    entries: list[Unrecorded] = []
    offset = 0
    while offset < len(log):
        if offset + _ENTRY.size > len(log):
            raise VtpmProtocolError("resume log is truncated")
        seq, size = _ENTRY.unpack_from(log, offset)
        start = offset + _ENTRY.size
        end = start + size + DIGEST_SIZE
        if end > len(log) or len(entries) == REPLAY_MAX_REQUESTS:
            raise VtpmProtocolError("resume log is truncated or too long")
        entries.append(Unrecorded(seq, log[start : start + size], log[start + size : end]))
        offset = end
    return tuple(entries)


def token_of(info: bytes) -> ResumeToken | None:
    """The token in an ATTACH description (None: a fresh attach); VtpmProtocolError if invalid."""
    head, nul, log = bytes(info).partition(b"\0")
    try:
        claimed = json.loads(head.decode("utf-8")) if head else {}
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(claimed, dict) or "resume" not in claimed:
        if nul:
            raise VtpmProtocolError("resume log without a resume token")
        return None
    token = ResumeToken.from_json(claimed["resume"])
    if not nul:
        return token
    unrecorded = _unrecorded(log)
    if not unrecorded:
        raise VtpmProtocolError("empty resume log after its NUL byte")
    return ResumeToken(token.epoch, token.seq, token.in_flight, token.recorded, unrecorded)


@dataclass(frozen=True)
class AttachReply:
    """Where the session stands after ATTACH.

    ``resumed``: the token was honoured (``seq`` is where; ``response`` is
    the in-flight request's answer when ``seq`` is the token's + 1).
    Otherwise ``reason`` says why not (empty for a fresh attach) and
    ``seq`` is 0 of the new ``epoch``.
    """

    epoch: str
    seq: int
    resumed: bool = False
    reason: str = ""
    response: bytes | None = None


def encode_attach_reply(reply: AttachReply) -> bytes:
    """u32 length + JSON {epoch, seq, resumed, reason, replay} + the replayed response."""
    obj: dict[str, Any] = {"epoch": _epoch(reply.epoch), "seq": _seq(reply.seq),
                           "resumed": reply.resumed, "replay": reply.response is not None}
    if reply.reason:
        obj["reason"] = reply.reason[:512]
    head = json.dumps(obj).encode()
    body = reply.response or b""
    if 4 + len(head) + len(body) > MAX_MESSAGE - 4:
        raise VtpmProtocolError("ATTACH reply too large")
    return _U32.pack(len(head)) + head + body


def decode_attach_reply(payload: bytes) -> AttachReply | None:
    """The reply; None for an empty payload (an instance that knows no epochs)."""
    if not payload:
        return None
    if len(payload) < 4:
        raise VtpmProtocolError("ATTACH reply is truncated")
    (size,) = _U32.unpack_from(payload)
    if size > _MAX_REPLY_JSON or 4 + size > len(payload):
        raise VtpmProtocolError("ATTACH reply length is out of range")
    try:
        obj = json.loads(payload[4 : 4 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise VtpmProtocolError("ATTACH reply is not JSON") from None
    if not isinstance(obj, dict):
        raise VtpmProtocolError("ATTACH reply is not an object")
    resumed, replay, reason = obj.get("resumed"), obj.get("replay"), obj.get("reason", "")
    if not isinstance(resumed, bool) or not isinstance(replay, bool) or not isinstance(
        reason, str
    ):
        raise VtpmProtocolError("ATTACH reply has fields of the wrong type")
    rest = payload[4 + size :]
    if rest and not replay:
        raise VtpmProtocolError("ATTACH reply has trailing bytes")
    return AttachReply(_epoch(obj.get("epoch")), _seq(obj.get("seq")), resumed, reason,
                       bytes(rest) if replay else None)
