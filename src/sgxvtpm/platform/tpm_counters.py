"""Rollback counters in the host's TPM, for a platform without SGX counters.

SGX on current Linux has no monotonic counters (the PSE counters are gone),
and Gramine's encrypted files are rollback-protected only while open. This
backend keeps each counter in an NV counter index of the host machine's TPM
(``sgxvtpm.tpm.nvcounter``), reached through the untrusted host, in HMAC
sessions salted to a TPM key the enclave pinned at provisioning.

How it plugs in: an enclave wraps the :class:`EnclavePlatform` it was given
in :class:`TpmCountedPlatform`; everything but the three counter calls goes
to the platform underneath, so sealing (enclaves/state.py) is unchanged.

- :func:`counter_secret` derives the secret behind every counter's NV index
  and authValue from the enclave's MRSIGNER sealing key (EGETKEY), so the
  same enclave family finds the same counters after a restart or an upgrade.
- The pinned key's Name is the enclave's to keep (sealed with its state, or
  fixed in its measured configuration: see SECURITY.md for why the latter is
  the stronger choice).
- ``transact`` carries one TPM command to the host TPM and back: in the
  tests a socket to swtpm; in a deployment hostd relays it (not wired yet,
  docs/ARCHITECTURE.md).

The sim platform keeps its own counters (platform/sim/counters.py) and stays
the default.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgxvtpm.platform.base import (
    EnclaveIdentity,
    EnclavePlatform,
    KeyName,
    KeyPolicy,
    KeyRequest,
    PlatformError,
    QuoteVerifier,
    ReportBody,
    TargetInfo,
)
from sgxvtpm.tpm.nv import Transact
from sgxvtpm.tpm.nvcounter import CounterError, HostTpmCounters, pin_key

#: KEYREQUEST.KEYID of the counter secret: fixed, so every start derives the same.
_KEY_ID = b"sgxvtpm host TPM counters".ljust(32, b"\x00")


@dataclass(frozen=True)
class TpmCounterConfig:
    """Where the host TPM's pinned key is and what its Name must be."""

    key_handle: int
    key_name: bytes
    owner_auth: bytes = b""


def counter_secret(platform: EnclavePlatform) -> bytes:
    """32 bytes only this enclave family can derive: the root of its counters' authValues."""
    request = KeyRequest(
        KeyName.SEAL,
        KeyPolicy.MRSIGNER,
        isv_svn=platform.identity.isv_svn,
        key_id=_KEY_ID,
    )
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"sgxvtpm host TPM counters"
    ).derive(platform.get_key(request))


def provision(transact: Transact, key_handle: int, owner_auth: bytes = b"") -> TpmCounterConfig:
    """Pin the host TPM's key at ``key_handle``: the config to keep (trust on first use)."""
    try:
        return TpmCounterConfig(key_handle, pin_key(transact, key_handle), owner_auth)
    except CounterError as exc:
        raise PlatformError(str(exc)) from None


class TpmCounters:
    """The counter face of a platform (create, increment, read), over a host TPM.

    Each call raises PlatformError, as the sim counters do, when the counter
    is missing or the host's answer does not authenticate.
    """

    def __init__(self, counters: HostTpmCounters) -> None:
        self._counters = counters

    @classmethod
    def open(
        cls, platform: EnclavePlatform, transact: Transact, config: TpmCounterConfig
    ) -> TpmCounters:
        return cls(
            HostTpmCounters(
                transact,
                config.key_handle,
                config.key_name,
                counter_secret(platform),
                owner_auth=config.owner_auth,
            )
        )

    def create(self, name: str) -> int:
        try:
            return self._counters.create(name)
        except (CounterError, ValueError) as exc:
            raise PlatformError(f"host TPM counter {name!r}: {exc}") from None

    def increment(self, name: str) -> int:
        try:
            return self._counters.increment(name)
        except (CounterError, ValueError) as exc:
            raise PlatformError(f"host TPM counter {name!r}: {exc}") from None

    def read(self, name: str) -> int:
        try:
            return self._counters.read(name)
        except (CounterError, ValueError) as exc:
            raise PlatformError(f"host TPM counter {name!r}: {exc}") from None


class TpmCountedPlatform:
    """An EnclavePlatform whose monotonic counters live in the host TPM."""

    def __init__(self, inner: EnclavePlatform, counters: TpmCounters) -> None:
        self._inner = inner
        self._counters = counters

    @property
    def identity(self) -> EnclaveIdentity:
        return self._inner.identity

    def get_key(self, request: KeyRequest) -> bytes:
        return self._inner.get_key(request)

    def report(self, target: TargetInfo, report_data: bytes) -> bytes:
        return self._inner.report(target, report_data)

    def verify_report(self, report: bytes) -> ReportBody:
        return self._inner.verify_report(report)

    def quote(self, report_data: bytes) -> bytes:
        return self._inner.quote(report_data)

    def quote_verifier(self) -> QuoteVerifier:
        return self._inner.quote_verifier()

    def counter_create(self, name: str) -> int:
        return self._counters.create(name)

    def counter_increment(self, name: str) -> int:
        return self._counters.increment(name)

    def counter_read(self, name: str) -> int:
        return self._counters.read(name)
