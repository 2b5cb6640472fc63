"""The platform interface: what an SGX-like backend gives sgxvtpm.

Three faces (docs/ARCHITECTURE.md, "Layers and seams"):

- the *backend* (:class:`PlatformBackend`, untrusted, in hostd): the opened
  platform, with its *loader* (creates an enclave from an
  :class:`EnclaveSpec`, measures it, and hands back a byte stream to it),
  the SIGSTRUCTs its signer made for the release, and its attestation root;
  :func:`sgxvtpm.platform.open_platform` opens one;
- the *inside* face (:class:`EnclavePlatform`, trusted, in the enclave):
  EGETKEY, EREPORT, quotes, monotonic counters, and a verifier of its own
  platform's quotes;
- the *verifier* (:class:`PlatformKind`, anywhere): the MRENCLAVE a spec
  gets on this kind of platform, and a :class:`QuoteVerifier` that checks a
  quote against an attestation root and returns the enclave's identity;
  :func:`sgxvtpm.platform.platform_kind` gives one.

The ``sim`` backend implements all three with real cryptography; a
``gramine`` backend implements them on SGX hardware. Names follow the Intel
SDM (vol. 3D, ch. 34-38) so every field can be found there.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sgxvtpm.errors import SgxvtpmError

REPORT_DATA_SIZE = 64
REPORT_BODY_SIZE = 384
REPORT_SIZE = 432  # body + KEYID(32) + MAC(16), SDM 38.15

# SECS.ATTRIBUTES.FLAGS bits (SDM 38.7.1); ATTRIBUTES is FLAGS (u64) || XFRM (u64).
SGX_FLAGS_INITTED = 0x01
SGX_FLAGS_DEBUG = 0x02
SGX_FLAGS_MODE64BIT = 0x04
SGX_FLAGS_PROVISIONKEY = 0x10
SGX_FLAGS_EINITTOKENKEY = 0x20
SGX_FLAGS_KSS = 0x80


class PlatformError(SgxvtpmError):
    """A platform primitive failed; the message says which and why.

    hostd's log has the details; an incomplete or replaced platform directory
    is refused on purpose (SECURITY.md), never repaired.
    """


class AttestationError(PlatformError):
    """A report or quote did not verify.

    One opaque error for every reason (bad MAC or signature, unknown root,
    malformed layout): the detailed reason is logged where it was found.
    Do not trust that enclave; a platform replaced on purpose needs its new
    root pinned again (``vmm/credentials.py``).
    """


class KeyName(enum.IntEnum):
    """KEYREQUEST.KEYNAME values (SDM 38.18)."""

    EINITTOKEN = 0
    PROVISION = 1
    PROVISION_SEAL = 2
    REPORT = 3
    SEAL = 4


class KeyPolicy(enum.IntFlag):
    """KEYREQUEST.KEYPOLICY bits (SDM 38.18)."""

    MRENCLAVE = 0x0001
    MRSIGNER = 0x0002


@dataclass(frozen=True)
class OpenOptions:
    """How :func:`sgxvtpm.platform.open_platform` opens a platform; each backend reads
    what applies to it (the parameters are documented there)."""

    preload: Sequence[str] = ()
    release: str = ""
    sim_root: Path | None = None
    signed_release: Path | None = None


@dataclass(frozen=True)
class EnclaveSpec:
    """What the loader needs to build, measure and start one enclave.

    ``code_files`` and ``config`` are measured into MRENCLAVE; ``entry`` is the
    ``module:function`` run inside. ``sigstruct`` is the signer's signature
    over the enclave's MRENCLAVE, ATTRIBUTES, ISVPRODID and ISVSVN (the
    backend's SIGSTRUCT encoding): the platform verifies it before the enclave
    runs and derives MRSIGNER from the key that verified it, never from
    anything the loader says. ``debug`` launches with ATTRIBUTES.DEBUG set,
    which a default :class:`MeasurementPolicy` refuses.
    """

    name: str
    entry: str
    code_files: Sequence[Path]
    config: bytes
    isv_prod_id: int
    isv_svn: int
    sigstruct: bytes = b""
    debug: bool = False


@dataclass(frozen=True)
class EnclaveIdentity:
    """The measured identity of an enclave, as it appears in a REPORT body."""

    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    attributes: bytes = bytes(16)
    misc_select: int = 0

    @property
    def target_info(self) -> TargetInfo:
        """The TARGETINFO a REPORT for this enclave is made with (SDM 38.16)."""
        return TargetInfo(self.mrenclave, self.attributes, self.misc_select)


@dataclass(frozen=True)
class ReportBody:
    """A parsed REPORT body (SDM 38.15): the identity plus 64 bytes of user data."""

    identity: EnclaveIdentity
    report_data: bytes
    cpu_svn: bytes = bytes(16)


@dataclass(frozen=True)
class TargetInfo:
    """TARGETINFO (SDM 38.16): the enclave a REPORT is MAC'd for."""

    mrenclave: bytes
    attributes: bytes = bytes(16)
    misc_select: int = 0


@dataclass(frozen=True)
class KeyRequest:
    """KEYREQUEST (SDM 38.18), the fields the simulation uses."""

    key_name: KeyName
    key_policy: KeyPolicy = KeyPolicy.MRSIGNER
    isv_svn: int = 0
    cpu_svn: bytes = bytes(16)
    key_id: bytes = bytes(32)
    config_svn: int = 0


@dataclass(frozen=True)
class VerifiedQuote:
    """What a verified quote tells: the enclave, its report data, its platform."""

    body: ReportBody
    platform_id: bytes = b""

    @property
    def identity(self) -> EnclaveIdentity:
        return self.body.identity

    @property
    def report_data(self) -> bytes:
        return self.body.report_data


class EnclavePlatform(Protocol):
    """The face of the platform an enclave sees from inside (the ENCLU leaves)."""

    @property
    def identity(self) -> EnclaveIdentity: ...

    def get_key(self, request: KeyRequest) -> bytes:
        """EGETKEY: a 16-byte key; raises PlatformError for an ISVSVN above ours."""
        ...

    def report(self, target: TargetInfo, report_data: bytes) -> bytes:
        """EREPORT: a 432-byte REPORT MAC'd with the target's report key."""
        ...

    def verify_report(self, report: bytes) -> ReportBody:
        """Check a REPORT targeted at this enclave (local attestation)."""
        ...

    def quote(self, report_data: bytes) -> bytes:
        """A remotely verifiable quote (DCAP v3 layout) over our identity."""
        ...

    def counter_create(self, name: str) -> int:
        """Create (or open) a monotonic counter owned by our MRSIGNER; its value."""
        ...

    def counter_increment(self, name: str) -> int:
        """Increment durably; return the new value only once it is durable."""
        ...

    def counter_read(self, name: str) -> int:
        """The counter's value; PlatformError if it does not exist or is damaged."""
        ...

    def quote_verifier(self) -> QuoteVerifier:
        """A verifier of quotes under this platform's own attestation root.

        What an enclave checks its peers with. On SGX the root is compiled
        into the (measured) enclave; in sim mode it comes from the platform
        itself. Never from the host's launch arguments.
        """
        ...


def check_report_data(report_data: bytes, what: str = "EREPORT") -> None:
    """PlatformError unless ``report_data`` is REPORTDATA's 64 bytes (``what``: the call)."""
    if len(report_data) != REPORT_DATA_SIZE:
        raise PlatformError(f"{what}: report data must be {REPORT_DATA_SIZE} bytes")


class CounterBackend(Protocol):
    """Monotonic counters kept apart from the platform (EnclavePlatform's three calls)."""

    def counter_create(self, name: str) -> int: ...

    def counter_increment(self, name: str) -> int: ...

    def counter_read(self, name: str) -> int: ...


class CountersFrom:
    """EnclavePlatform's counter calls, answered by the object's ``_counters``
    (a platform without counters of its own: Gramine, or one over a host TPM)."""

    _counters: CounterBackend

    def counter_create(self, name: str) -> int:
        return self._counters.counter_create(name)

    def counter_increment(self, name: str) -> int:
        return self._counters.counter_increment(name)

    def counter_read(self, name: str) -> int:
        return self._counters.counter_read(name)


class EnclaveHandle(Protocol):
    """The loader's handle on one running enclave."""

    @property
    def name(self) -> str: ...

    @property
    def identity(self) -> EnclaveIdentity: ...

    @property
    def pid(self) -> int: ...

    @property
    def stream(self) -> socket.socket:
        """The host end of the enclave's byte stream (the only way in or out)."""
        ...

    def wait(self, timeout: float) -> bool:
        """True once the enclave process has exited (within ``timeout`` seconds)."""
        ...

    def stop(self, timeout: float = 5.0) -> None: ...


class LaunchedEnclave:
    """What every loader's :class:`EnclaveHandle` holds alike: the enclave's name,
    identity, process id and stream. A loader's handle adds ``wait`` and ``stop``."""

    def __init__(
        self, name: str, identity: EnclaveIdentity, pid: int, stream: socket.socket
    ) -> None:
        self._name, self._identity, self._pid, self._stream = name, identity, pid, stream

    @property
    def name(self) -> str:
        return self._name

    @property
    def identity(self) -> EnclaveIdentity:
        return self._identity

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def stream(self) -> socket.socket:
        """The host end of the enclave's byte stream."""
        return self._stream


class Loader(Protocol):
    """The untrusted half of the SGX module: create and stop enclaves."""

    def launch(self, spec: EnclaveSpec, args: Mapping[str, Any]) -> EnclaveHandle:
        """Measure ``spec``, check its SIGSTRUCT, start it, pass ``args`` (untrusted input)."""
        ...

    def close(self) -> None: ...


class QuoteVerifier(Protocol):
    def verify(self, quote: bytes) -> VerifiedQuote:
        """Verify against this verifier's attestation root; AttestationError if not."""
        ...


class PlatformKind(Protocol):
    """What checking enclaves needs of a kind of platform, with no platform opened.

    A verifier (the VMM, a VM endpoint, ``sgxvtpm attest``) computes the
    MRENCLAVE it expects from the enclave code installed on its side and
    checks quotes against the attestation root it pinned: both depend on the
    kind of platform only, never on a platform's secrets.
    """

    @property
    def name(self) -> str:
        """The name ``open_platform`` and ``hostd --platform`` know it by."""
        ...

    @property
    def enclave_bootstrap(self) -> tuple[str, ...]:
        """Modules of this package that run in every enclave before its entry point.

        They are measured with the enclave's own code (enclaves/specs.py).
        """
        ...

    def measure(self, spec: EnclaveSpec) -> bytes:
        """The MRENCLAVE an enclave built from ``spec`` has on this kind of platform."""
        ...

    def quote_verifier(self, root_pem: bytes, collateral: str | None = None) -> QuoteVerifier:
        """A verifier of this kind's quotes under ``root_pem``; PlatformError if not a root.

        With ``collateral`` (dcap-qvl QuoteCollateralV3 JSON, untrusted: signed under
        ``root_pem``) the DCAP verifier every handshake uses (platform/dcap.py);
        without, the sim kinds' plain chain check (platform/sim/quote.py), kept for
        library callers that hold only a root; the gramine kind needs collateral.
        """
        ...


class PlatformBackend(PlatformKind, Protocol):
    """An opened platform, as hostd uses it; it holds no platform secret itself.

    The platform's own process (the sim CPU, or SGX with its quoting
    enclave) keeps the secrets; the backend reaches it through the loader.
    """

    @property
    def connection_handoff(self) -> bool:
        """Whether an instance enclave can take a client's connection (SCM_RIGHTS on
        its stream); False on Gramine, whose host stream is stdio."""
        ...

    @property
    def loader(self) -> Loader:
        """Launches enclaves from signed specs."""
        ...

    @property
    def attestation_root_pem(self) -> bytes:
        """The platform's attestation root (public): what clients pin on first contact."""
        ...

    def signed(self, spec: EnclaveSpec) -> EnclaveSpec:
        """``spec`` with the SIGSTRUCT the platform's signer made for its release enclave.

        PlatformError if the release has no enclave of that name; whether the
        SIGSTRUCT fits ``spec``'s code is EINIT's question, at launch.
        """
        ...

    def platform_quote(self, report_data: bytes) -> bytes:
        """A quote by this platform of an identity no enclave has, over ``report_data``:
        it names the platform's FMSPC and PCK CA, and checks collateral for it
        (``hostd --pccs``, host/collateral.py). PlatformError where the platform
        cannot make one for the host (gramine)."""
        ...

    def replace_collateral(self, collateral: str) -> None:
        """The collateral the platform gives the enclaves it launches from now on, taken
        only if it verifies the platform's own quote under its root (PlatformError)."""
        ...

    def close(self) -> None:
        """Stop every enclave the loader launched, then the platform's processes."""
        ...


EnclaveEntry = Callable[[EnclavePlatform, socket.socket, Mapping[str, Any]], None]
"""The signature of an enclave's entry point: ``main(platform, stream, args)``."""


@dataclass
class MeasurementPolicy:
    """Which enclaves a verifier accepts (SECURITY.md property 13).

    Either an exact MRENCLAVE (the default: computed by the verifier from the
    enclave code it has installed), or MRSIGNER + ISVPRODID + minimum ISVSVN
    (for upgrades). Several MRENCLAVE values may be allowed at once. A debug
    enclave (ATTRIBUTES.DEBUG: its memory is readable through the debugger
    interface) is refused unless ``allow_debug``, whatever else matches.
    """

    mrenclaves: frozenset[bytes] = field(default_factory=frozenset)
    mrsigner: bytes | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int = 0
    allow_debug: bool = False

    def accepts(self, identity: EnclaveIdentity) -> bool:
        if is_debug(identity) and not self.allow_debug:
            return False
        if identity.mrenclave in self.mrenclaves:
            return True
        if self.mrsigner is None or self.isv_prod_id is None:
            return False
        return (
            identity.mrsigner == self.mrsigner
            and identity.isv_prod_id == self.isv_prod_id
            and identity.isv_svn >= self.min_isv_svn
        )


def is_debug(identity: EnclaveIdentity) -> bool:
    """Whether ATTRIBUTES.FLAGS has DEBUG set."""
    return bool(int.from_bytes(identity.attributes[:8], "little") & SGX_FLAGS_DEBUG)
