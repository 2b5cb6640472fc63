"""Monotonic counters in a host TPM's NV counter indices, authenticated end to end.

An enclave without SGX counters keeps its rollback counters in the TPM of the
machine it runs on, reached through the untrusted host (``transact``). Every
command that matters runs in an HMAC session salted to a TPM key the enclave
pinned (its Name), so the host relays bytes it can neither read nor forge:

- **one NV index per counter**, TPM_NT_COUNTER with AUTHWRITE | AUTHREAD |
  NO_DA (no owner or platform read/write): only a holder of the index's
  authValue can increment or read it with a response that verifies;
- **the authValue** of each index is derived from the enclave's secret (its
  sealing key) and the counter's name; it crosses the host once, in
  NV_DefineSpace, encrypted by the session (parameter encryption, Part 1 21);
- **the index's Name** (its attributes, among them WRITTEN) is in the cpHash
  of every NV_Increment and NV_Read: an index the host redefined with other
  attributes fails the command HMAC at the TPM;
- **freshness**: every command carries a new nonceCaller, and the response
  HMAC covers it with the TPM's new nonce and the NV_Read data, so an older
  response, another index's value or a forged one does not verify.

What the host can still do (SECURITY.md): refuse service, clear the TPM or
undefine an index (the counter is then missing, which sealed state reports);
a TPM_NT_COUNTER defined again starts above the highest value any counter of
that TPM ever had (Part 1, "NV Counter"; tested on libtpms), so undefining
never moves a counter back.
Its owner authorization (``owner_auth``, usually empty) is the host's to give.

``transact`` sends one command and returns its response (nv.Transact); the
module does no I/O of its own.
"""

from __future__ import annotations

import contextlib
import hmac
import os
from collections.abc import Iterator
from dataclasses import dataclass

from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.tpm.constants import (
    TPM2_ALG,
    TPM2_CC,
    TPM2_RC,
    TPM2_RH,
    TPMA_NV,
    TPMA_OBJECT,
    TPMA_SESSION,
    rc_base,
)
from sgxvtpm.tpm.nv import Transact, execute
from sgxvtpm.tpm.session import (
    Authorization,
    HmacSession,
    Random,
    SessionError,
    encrypt_salt,
    nv_name,
    parse_start_auth_session,
    public_name,
    start_auth_session,
)
from sgxvtpm.tpm.wire import (
    Reader,
    TpmProtocolError,
    TpmResponseError,
    flush_context,
    nv_read_public,
    parse_read_public,
    password_session,
    read_public,
    response_parameters,
    tpm2b,
    u16,
    u32,
)

#: Attributes of our counter indices (Part 2, 13.4), before the first increment.
COUNTER_ATTRIBUTES = TPMA_NV.TPM_NT_COUNTER | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
#: The TPM-owner NV range of TCG's handle registry (0x01000000-0x013FFFFF).
INDEX_BASE = 0x01000000
INDEX_SPAN = 0x00400000
#: What a key we salt to must be: TPM-generated, non-duplicable, a decryption key.
KEY_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)
_COUNTER_SIZE = 8


class CounterError(SgxvtpmError):
    """A counter in the host TPM could not be created, read or advanced.

    The message says what: a missing index (the host cleared its TPM or
    undefined it: restore the host's TPM or recreate the state that used the
    counter), a key that is not the pinned one, or a response that did not
    authenticate (the host or its TPM is not trustworthy). No value is
    returned that the pinned TPM did not give.
    """


def pin_key(transact: Transact, handle: int) -> bytes:
    """The Name of the TPM key at ``handle``, computed here from its public area.

    What an enclave stores (sealed) at provisioning. The key must be a
    TPM-generated restricted decryption key (an EK or a storage primary);
    CounterError otherwise. The public area comes from the host: the Name
    only becomes trustworthy once a session salted to it authenticated.
    """
    public = _read_key_public(transact, handle)
    attributes = int.from_bytes(public[4:8], "big")
    if attributes & KEY_ATTRIBUTES != KEY_ATTRIBUTES:
        raise CounterError(
            f"TPM key {handle:#x} is not a TPM-generated restricted decryption key "
            f"(attributes {attributes:#x}); pin an EK or a storage primary"
        )
    return public_name(public)


def _read_key_public(transact: Transact, handle: int) -> bytes:
    try:
        return parse_read_public(execute(transact, read_public(handle))).public
    except (TpmResponseError, TpmProtocolError) as exc:
        raise CounterError(f"the host TPM has no usable key at {handle:#x}: {exc}") from None


def counter_public(index: int, written: bool) -> bytes:
    """The TPMS_NV_PUBLIC contents of our counter ``index`` (Part 2, 13.5)."""
    attributes = COUNTER_ATTRIBUTES | (TPMA_NV.WRITTEN if written else 0)
    return u32(index) + u16(TPM2_ALG.SHA256) + u32(attributes) + tpm2b(b"") + u16(_COUNTER_SIZE)


@dataclass
class HostTpmCounters:
    """Counters named by strings, each an NV counter index of the host TPM.

    ``key_handle``/``key_name``: the pinned key (see :func:`pin_key`);
    ``secret``: at least 32 bytes only the enclave has, from which each
    counter's index and authValue are derived (the same secret gives the same
    counters, so it is derived from the enclave's sealing key).
    """

    transact: Transact
    key_handle: int
    key_name: bytes
    secret: bytes
    owner_auth: bytes = b""
    rng: Random = os.urandom

    def __post_init__(self) -> None:
        if len(self.secret) < 32:
            raise ValueError("the counter secret must be at least 32 bytes")
        self._public: bytes | None = None

    # ------------------------------------------------------------ names

    def _derive(self, purpose: bytes, name: str) -> bytes:
        if not name or len(name.encode()) > 255:
            raise ValueError("a counter name must be 1 to 255 bytes of UTF-8")
        return hmac.new(self.secret, purpose + b"\x00" + name.encode(), "sha256").digest()

    def index(self, name: str) -> int:
        """The NV index of counter ``name`` in the TPM-owner range."""
        value = int.from_bytes(self._derive(b"sgxvtpm tpm counter index", name)[:4], "big")
        return INDEX_BASE + value % INDEX_SPAN

    def _auth(self, name: str) -> bytes:
        # A last byte of 0 would be stripped by the TPM (Part 1, 19.6.4.3); keep 32.
        return self._derive(b"sgxvtpm tpm counter auth", name)[:31] + b"\x01"

    # ------------------------------------------------------------ operations

    def create(self, name: str) -> int:
        """Define the counter if it does not exist, initialize it; its value."""
        index = self.index(name)
        with self._session() as session:
            if self._written(index) is None:
                self._define(session, index, name)
            if not self._written(index):
                self._increment(session, index, name, written=False)
            return self._read(session, index, name, last=True)

    def increment(self, name: str) -> int:
        """Add one; the new value, once the pinned TPM said it is done."""
        index = self.index(name)
        written = self._require(index, name)
        with self._session() as session:
            self._increment(session, index, name, written=written)
            return self._read(session, index, name, last=True)

    def read(self, name: str) -> int:
        """The counter's value, as the pinned TPM answered this read."""
        index = self.index(name)
        if not self._require(index, name):
            raise CounterError(f"TPM counter {name!r} was defined but never initialized")
        with self._session() as session:
            return self._read(session, index, name, last=True)

    # ------------------------------------------------------------ steps

    def _key_public(self) -> bytes:
        if self._public is None:
            public = _read_key_public(self.transact, self.key_handle)
            if public_name(public) != self.key_name:
                raise CounterError(
                    f"the host TPM's key at {self.key_handle:#x} is not the pinned one "
                    "(another TPM, or a key the host made): refused"
                )
            self._public = public
        return self._public

    @contextlib.contextmanager
    def _session(self) -> Iterator[HmacSession]:
        """A session for one operation, flushed if the operation fails (its last
        command, without continueSession, ends it when it succeeds)."""
        session = self._start()
        try:
            yield session
        except BaseException:
            self._flush(session)
            raise

    def _start(self) -> HmacSession:
        salt, encrypted = encrypt_salt(self._key_public(), self.rng)
        nonce = self.rng(32)
        try:
            response = execute(self.transact, start_auth_session(self.key_handle, nonce, encrypted))
            handle, nonce_tpm = parse_start_auth_session(response)
        except (TpmResponseError, TpmProtocolError) as exc:
            raise CounterError(f"the host TPM did not start a salted session: {exc}") from None
        return HmacSession.from_start(handle, nonce_tpm, nonce, salt, rng=self.rng)

    def _flush(self, session: HmacSession) -> None:
        # Best effort: a session left behind dies with the TPM's next reset.
        with contextlib.suppress(OSError, SgxvtpmError):
            self.transact(flush_context(session.handle))

    def _written(self, index: int) -> bool | None:
        """Whether our index exists (None if not) and was written; unauthenticated.

        The answer only picks which of our two Names the next command uses;
        the TPM checks that Name in the command HMAC.
        """
        try:
            _, r = response_parameters(execute(self.transact, nv_read_public(index)))
            public = r.tpm2b()
        except TpmResponseError as exc:
            if rc_base(exc.rc) == TPM2_RC.HANDLE:
                return None
            raise CounterError(f"the host TPM cannot read NV index {index:#x}: {exc}") from None
        except TpmProtocolError:
            raise CounterError(f"NV_ReadPublic of {index:#x}: a malformed response") from None
        for written in (False, True):
            if public == counter_public(index, written):
                return written
        raise CounterError(
            f"NV index {index:#x} is not one of our counters (attributes "
            f"{int.from_bytes(public[6:10], 'big'):#x}): the host defined it otherwise"
        )

    def _require(self, index: int, name: str) -> bool:
        written = self._written(index)
        if written is None:
            raise CounterError(
                f"TPM counter {name!r} does not exist (NV index {index:#x}): the host "
                "cleared its TPM or undefined the index"
            )
        return written

    def _run(
        self,
        session: HmacSession,
        code: int,
        handles: list[int],
        names: list[bytes],
        params: bytes,
        auth: Authorization,
        attributes: int,
        password_sessions: tuple[bytes, ...] = (),
    ) -> bytes:
        command = session.command(code, handles, names, params, auth, attributes, password_sessions)
        try:
            return session.response(self.transact(command))
        except SessionError as exc:
            raise CounterError(f"the host TPM's answer to {TPM2_CC(code).name}: {exc}") from None
        except (TpmResponseError, TpmProtocolError) as exc:
            raise CounterError(f"the host TPM refused {TPM2_CC(code).name}: {exc}") from None

    def _define(self, session: HmacSession, index: int, name: str) -> None:
        params = tpm2b(self._auth(name)) + tpm2b(counter_public(index, False))
        self._run(
            session,
            TPM2_CC.NV_DefineSpace,
            [TPM2_RH.OWNER],
            [u32(TPM2_RH.OWNER)],
            params,
            Authorization(b""),  # our session only encrypts the authValue
            TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT,
            (password_session(self.owner_auth),),
        )

    def _increment(self, session: HmacSession, index: int, name: str, written: bool) -> None:
        nv = nv_name(counter_public(index, written))
        self._run(
            session,
            TPM2_CC.NV_Increment,
            [index, index],
            [nv, nv],
            b"",
            Authorization(nv, self._auth(name)),
            TPMA_SESSION.CONTINUESESSION,
        )

    def _read(self, session: HmacSession, index: int, name: str, last: bool) -> int:
        nv = nv_name(counter_public(index, True))
        params = self._run(
            session,
            TPM2_CC.NV_Read,
            [index, index],
            [nv, nv],
            u16(_COUNTER_SIZE) + u16(0),
            Authorization(nv, self._auth(name)),
            0 if last else TPMA_SESSION.CONTINUESESSION,
        )
        r = Reader(params)
        try:
            data = r.tpm2b()
            r.done()
        except TpmProtocolError:
            data = b""
        if len(data) != _COUNTER_SIZE:
            raise CounterError(f"the host TPM answered NV_Read of {name!r} with {len(data)} bytes")
        return int.from_bytes(data, "big")
