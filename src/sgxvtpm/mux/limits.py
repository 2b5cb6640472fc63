"""What one client, connection or session may cost hostd and the enclaves.

Anyone who can connect to hostd.sock can send relay frames, credential or
not. These bounds keep such a client from making another VM wait or from
growing a process without bound. Three rules, kept by hostd's switch
(:mod:`sgxvtpm.host.switch`) and, at the trusted ends, by the relay
connection (:mod:`sgxvtpm.mux.connection`) that the instance loop
(:mod:`sgxvtpm.enclaves.loop`) and the asyncio mux (:mod:`sgxvtpm.mux.aio`)
drive:

- Nobody waits for a peer that does not read. hostd drops a client
  connection whose unsent output passes :data:`SWITCH_OUT_MAX` and keeps
  reading every enclave stream; an enclave writes without blocking and
  drops a session whose replies do not fit in :data:`STREAM_OUT_MAX` (the
  shared stream) or :data:`SESSION_OUT_MAX` (a handed-off connection). Only
  a client sending to an enclave waits, and then only its own connection.
- Unauthenticated sessions are few and short: at most :data:`PREAUTH_MAX`
  per enclave, each closed after :data:`HANDSHAKE_TIMEOUT`
  (:class:`Admission`); hostd forwards at most :data:`PENDING_OPENS_MAX`
  unanswered OPENs to one target and lets one client connection hold at
  most :data:`CLIENT_SESSIONS_MAX` sessions.
- What is received is consumed or bounded: hostd answers CONTROL requests
  one at a time, in order, and drops a connection with more than
  :data:`CONTROL_QUEUE_MAX` outstanding; a session's unread input is at most
  :data:`SESSION_INBOX_MAX`.
"""

from __future__ import annotations

from typing import NamedTuple

from sgxvtpm.channel.session import MAX_MESSAGE

# -- the enclaves --------------------------------------------------------------

#: Sessions of one enclave that have not completed their handshake. A
#: handshake costs the enclave a key exchange and a signature (about a
#: millisecond), so this also bounds the work a burst of OPENs can cause.
PREAUTH_MAX = 32

#: A session still authenticating after this many seconds may lose its slot
#: to a newcomer when all are taken: a burst of OPENs cannot lock out later
#: clients for a whole HANDSHAKE_TIMEOUT, nor evict a handshake in progress
#: (a few round trips, milliseconds), and evictions run at most PREAUTH_MAX
#: handshakes a second.
PREAUTH_GRACE = 1.0

#: Seconds a session may take to authenticate before the enclave closes it.
#: Generous for a loaded host (the client verifies a quote); short enough that
#: idle sessions do not pile up.
HANDSHAKE_TIMEOUT = 10.0

#: Bytes an enclave keeps for hostd's stream when hostd does not read it; a
#: session whose frame does not fit is dropped. Four of the largest messages.
STREAM_OUT_MAX = 4 * MAX_MESSAGE

#: Bytes of unsent replies on one handed-off connection; past it the client
#: is not reading and its session is dropped. One reply of the largest size
#: fits twice.
SESSION_OUT_MAX = 2 * MAX_MESSAGE

#: Bytes received for one session and not yet consumed by it (the asyncio
#: mux queues them per session); past it the session is dropped. A peer
#: sends one request and waits for its answer.
SESSION_INBOX_MAX = 2 * MAX_MESSAGE


# -- hostd's switch ------------------------------------------------------------

#: Bytes hostd keeps for one connection beyond what its socket took. A client
#: past it is dropped; a client sending to an enclave past it waits. Two of the
#: largest messages a session carries: a client that reads is never near it.
SWITCH_OUT_MAX = 2 * MAX_MESSAGE

#: Sessions one client connection may hold at once; one more drops the
#: connection. The VMM and VM endpoints hold one per connection; 16 leaves room
#: for a tool that opens a few, and bounds what one connection costs.
CLIENT_SESSIONS_MAX = 16

#: OPENs hostd has forwarded to one target that the target has not answered
#: (no frame back yet); further OPENs to it are answered CLOSE("busy"). Twice
#: PREAUTH_MAX, so the enclave's own admission sees every newcomer it could
#: take, while an enclave that stopped reading is not sent more.
PENDING_OPENS_MAX = 2 * PREAUTH_MAX

#: CONTROL requests of one connection waiting or being answered. The clients
#: send one and wait for the reply; the manager's are serialised by its lock.
CONTROL_QUEUE_MAX = 4

class Verdict(NamedTuple):
    """What :meth:`Admission.admit` decided: take the session or not, and
    which older session (if any) gave up its slot for it."""

    accepted: bool
    evicted: int | None = None


class Admission:
    """The sessions of one enclave that are still authenticating (pure logic).

    :meth:`admit` a session when it opens, :meth:`done` when it authenticated
    or ended; :meth:`expired` names those past their deadline.
    """

    def __init__(
        self,
        limit: int = PREAUTH_MAX,
        grace: float = PREAUTH_GRACE,
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self._limit = limit
        self._grace = grace
        self._timeout = timeout
        self._started: dict[int, float] = {}  # session id -> start; oldest first

    @property
    def timeout(self) -> float:
        """Seconds a session may take to authenticate."""
        return self._timeout

    def __len__(self) -> int:
        return len(self._started)

    def __contains__(self, sid: object) -> bool:
        return sid in self._started

    def admit(self, sid: int, now: float) -> Verdict:
        """Whether session ``sid``, opening at ``now``, may start its handshake."""
        if sid in self._started:
            return Verdict(False)
        evicted = None
        if len(self._started) >= self._limit:
            oldest, started = next(iter(self._started.items()))
            if now - started < self._grace:
                return Verdict(False)
            del self._started[oldest]
            evicted = oldest
        self._started[sid] = now
        return Verdict(True, evicted)

    def done(self, sid: int) -> None:
        """``sid`` authenticated or ended: it no longer holds a slot."""
        self._started.pop(sid, None)

    def expired(self, now: float) -> list[int]:
        """The sessions whose handshake deadline passed; they no longer hold a slot."""
        out = []
        for sid, started in self._started.items():
            if now - started < self._timeout:
                break
            out.append(sid)
        for sid in out:
            del self._started[sid]
        return out

    def next_deadline(self) -> float | None:
        """When the oldest session's handshake deadline passes (None: no session)."""
        for started in self._started.values():
            return started + self._timeout
        return None
