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
- ``transact`` carries one TPM command to the host TPM and back: hostd
  relays it as TPM frames on the enclave's own host stream
  (platform/host_tpm.py; ``hostd --counters tpm:DEVICE_OR_TCTI``).

:func:`open_host_counters` is what an enclave entry calls: with the launch
argument ``tpm_counters`` it puts the tap on the stream, pins the host key
on first use (sealed, see :func:`load_or_pin`) and hands the entry a
TpmCountedPlatform. The sim platform keeps its own counters
(platform/sim/counters.py) and stays the default.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgxvtpm.platform.base import (
    CountersFrom,
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
from sgxvtpm.platform.host_tpm import HostTpmTap
from sgxvtpm.tpm.nv import Transact
from sgxvtpm.tpm.nvcounter import CounterError, HostTpmCounters, pin_key

#: KEYREQUEST.KEYID of the counter secret: fixed, so every start derives the same.
_KEY_ID = b"sgxvtpm host TPM counters".ljust(32, b"\x00")
#: KEYREQUEST.KEYID of the key that seals the pin.
_PIN_KEY_ID = b"sgxvtpm host TPM pin".ljust(32, b"\x00")
_PIN_AAD = b"sgxvtpm host TPM pin v1"
#: Where an enclave keeps its sealed pin, in its own state directory.
PIN_FILE = "host-tpm.pin"
#: The launch argument that asks for host TPM counters: {"key_handle": int}.
LAUNCH_ARG = "tpm_counters"


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
    """A platform's counter calls (base.CounterBackend), over a host TPM.

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

    def counter_create(self, name: str) -> int:
        return self._checked(self._counters.create, name)

    def counter_increment(self, name: str) -> int:
        return self._checked(self._counters.increment, name)

    def counter_read(self, name: str) -> int:
        return self._checked(self._counters.read, name)

    @staticmethod
    def _checked(call: Callable[[str], int], name: str) -> int:
        try:
            return call(name)
        except (CounterError, ValueError) as exc:
            raise PlatformError(f"host TPM counter {name!r}: {exc}") from None


class TpmCountedPlatform(CountersFrom):
    """An EnclavePlatform whose monotonic counters live in the host TPM.

    ``bind``: the pinned key's Name. When given, every SEAL key is derived
    from the platform's and it, so what is sealed under one pin opens under
    no other: a host that removes the pin (and has another TPM pinned) gets
    state that does not open, not old state accepted by its own counters.
    """

    def __init__(self, inner: EnclavePlatform, counters: TpmCounters, bind: bytes = b"") -> None:
        self._inner = inner
        self._counters = counters
        self._bind = bind

    @property
    def identity(self) -> EnclaveIdentity:
        return self._inner.identity

    def get_key(self, request: KeyRequest) -> bytes:
        key = self._inner.get_key(request)
        if request.key_name is not KeyName.SEAL or not self._bind:
            return key
        return HKDF(
            algorithm=hashes.SHA256(),
            length=len(key),
            salt=None,
            info=b"sgxvtpm seal key bound to host TPM key " + self._bind,
        ).derive(key)

    def report(self, target: TargetInfo, report_data: bytes) -> bytes:
        return self._inner.report(target, report_data)

    def verify_report(self, report: bytes) -> ReportBody:
        return self._inner.verify_report(report)

    def quote(self, report_data: bytes) -> bytes:
        return self._inner.quote(report_data)

    def quote_verifier(self) -> QuoteVerifier:
        return self._inner.quote_verifier()


# ---------------------------------------------------------------- the pin


def _pin_aead(platform: EnclavePlatform) -> AESGCM:
    request = KeyRequest(
        KeyName.SEAL, KeyPolicy.MRSIGNER, isv_svn=platform.identity.isv_svn, key_id=_PIN_KEY_ID
    )
    return AESGCM(platform.get_key(request)[:16])


def seal_pin(platform: EnclavePlatform, config: TpmCounterConfig) -> bytes:
    """The pin as the enclave family alone can open it (MRSIGNER seal key)."""
    body = json.dumps(
        {"key_handle": config.key_handle, "key_name": config.key_name.hex()}, sort_keys=True
    ).encode()
    nonce = os.urandom(12)
    return nonce + _pin_aead(platform).encrypt(nonce, body, _PIN_AAD)


def unseal_pin(platform: EnclavePlatform, blob: bytes) -> TpmCounterConfig:
    try:
        body = json.loads(_pin_aead(platform).decrypt(blob[:12], blob[12:], _PIN_AAD))
        return TpmCounterConfig(int(body["key_handle"]), bytes.fromhex(body["key_name"]))
    except (InvalidTag, ValueError, KeyError, TypeError):
        raise PlatformError("the sealed host TPM pin does not open: damaged or foreign") from None


def _has_sealed_state(state_dir: Path) -> bool:
    return any(state_dir.glob("*.sealed"))


def load_or_pin(
    platform: EnclavePlatform, transact: Transact, state_dir: Path, key_handle: int
) -> TpmCounterConfig:
    """The pinned host key of the enclave that keeps its state in ``state_dir``.

    The pin is sealed at first provisioning (trust on first use): when the
    directory has no pin *and no sealed state*, the Name of the key the host
    shows at ``key_handle`` is pinned and sealed to PIN_FILE. A directory with
    sealed state but no pin is refused (the pin was removed: pinning again
    would trust whatever TPM the host shows now). A pin that exists wins over
    ``key_handle``. SECURITY.md, "Rollback counters in a host TPM", says what
    this does and does not protect.
    """
    path = state_dir / PIN_FILE
    try:
        return unseal_pin(platform, path.read_bytes())
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise PlatformError(f"cannot read the host TPM pin: {exc.strerror}") from None
    if _has_sealed_state(state_dir):
        raise PlatformError(
            f"{state_dir} holds sealed state but no host TPM pin ({PIN_FILE}): it was removed; "
            "restore it (pinning again would trust any TPM the host shows)"
        )
    config = provision(transact, key_handle)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(seal_pin(platform, config))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return config


class CountersRefused(PlatformError):
    """The enclave cannot have the counters its state needs: it must not start.

    ``stream`` is where the entry still reaches hostd (to say why it stops),
    ``tap`` the host TPM tap to close afterwards, if one was put on.
    """

    def __init__(self, reason: str, stream: socket.socket, tap: HostTpmTap | None) -> None:
        super().__init__(reason)
        self.stream = stream
        self.tap = tap


def open_host_counters(
    platform: EnclavePlatform, stream: socket.socket, args: Mapping[str, Any]
) -> tuple[EnclavePlatform, socket.socket, HostTpmTap | None]:
    """The platform and stream an enclave entry runs on: with host TPM counters if asked.

    Without the launch argument ``tpm_counters`` both come back unchanged
    (the platform's own counters: the sim's), unless the enclave's state
    directory holds a host TPM pin: its state's counters are in a host TPM,
    so it refuses rather than use other counters. With it: the TPM tap goes
    on ``stream`` (the entry gets the tap's inner end, and the tap, to close
    when it is done), the pin is loaded or made (:func:`load_or_pin`), and the
    platform is a TpmCountedPlatform whose SEAL keys are bound to the pin.
    CountersRefused when that fails.
    """
    requested = args.get(LAUNCH_ARG)
    if not args.get("state_dir"):
        if isinstance(requested, Mapping):
            raise CountersRefused("host TPM counters need the enclave's state_dir", stream, None)
        return platform, stream, None
    state_dir = Path(str(args["state_dir"]))
    if not isinstance(requested, Mapping):
        if (state_dir / PIN_FILE).exists():
            raise CountersRefused(
                f"this enclave's counters are in the host's TPM ({PIN_FILE} exists): "
                "start hostd with --counters tpm:DEVICE_OR_TCTI",
                stream,
                None,
            )
        return platform, stream, None
    tap = HostTpmTap(stream)
    try:
        key_handle = int(requested["key_handle"])
        config = load_or_pin(platform, tap.transact, state_dir, key_handle)
        counters = TpmCounters.open(platform, tap.transact, config)
    except (KeyError, TypeError, ValueError):
        raise CountersRefused(
            "launch argument tpm_counters without a key_handle", tap.stream, tap
        ) from None
    except PlatformError as exc:
        raise CountersRefused(str(exc), tap.stream, tap) from None
    return TpmCountedPlatform(platform, counters, bind=config.key_name), tap.stream, tap
