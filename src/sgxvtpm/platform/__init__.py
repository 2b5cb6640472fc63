"""sgxvtpm.platform: the SGX-like platform interface and its backends.

The types live in :mod:`sgxvtpm.platform.base`. :func:`open_platform` opens a
backend (hostd's loader, signer and attestation root); :func:`platform_kind`
gives what a verifier needs of one (its measurement, its quote verifier).
This module is the one place outside a backend's package that names it.
``sim`` and ``gramine-sim`` (the Gramine enclave code path on the sim
platform) run on this machine; ``gramine`` needs SGX hardware.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sgxvtpm.platform.base import (
    REPORT_BODY_SIZE,
    REPORT_DATA_SIZE,
    REPORT_SIZE,
    AttestationError,
    EnclaveEntry,
    EnclaveHandle,
    EnclaveIdentity,
    EnclavePlatform,
    EnclaveSpec,
    KeyName,
    KeyPolicy,
    KeyRequest,
    Loader,
    MeasurementPolicy,
    OpenOptions,
    PlatformBackend,
    PlatformError,
    PlatformKind,
    QuoteVerifier,
    ReportBody,
    TargetInfo,
    VerifiedQuote,
)

PLATFORMS = ("sim", "gramine-sim", "gramine")
DEFAULT_PLATFORM = "sim"
#: The PCCS a client fetches DCAP collateral from (platform/pccs.py); named here
#: so that reading it does not import the fetcher and its HTTP client.
PCCS_URL_ENV = "SGXVTPM_PCCS_URL"

__all__ = [
    "DEFAULT_PLATFORM",
    "PLATFORMS",
    "REPORT_BODY_SIZE",
    "REPORT_DATA_SIZE",
    "REPORT_SIZE",
    "AttestationError",
    "EnclaveEntry",
    "EnclaveHandle",
    "EnclaveIdentity",
    "EnclavePlatform",
    "EnclaveSpec",
    "KeyName",
    "KeyPolicy",
    "KeyRequest",
    "Loader",
    "MeasurementPolicy",
    "OpenOptions",
    "PlatformBackend",
    "PlatformError",
    "PlatformKind",
    "QuoteVerifier",
    "ReportBody",
    "TargetInfo",
    "VerifiedQuote",
    "generate_vendor_key",
    "init_sim_root",
    "open_platform",
    "platform_kind",
    "sign_release",
]


def platform_kind(name: str = DEFAULT_PLATFORM) -> PlatformKind:
    """The kind of platform called ``name``: how its enclaves are measured and quoted.

    ``"sim"``: the simulated SGX platform; ``"gramine-sim"``: the Gramine code
    path on it (platform/sim/gramine_sim.py); ``"gramine"``: Gramine on SGX
    hardware (its MRENCLAVE comes from gramine-sgx-sign: ``measure`` raises
    PlatformError); anything else raises ValueError.
    """
    if name == "sim":
        from sgxvtpm.platform.sim.backend import SIM

        return SIM
    if name == "gramine-sim":
        from sgxvtpm.platform.sim.gramine_sim import GRAMINE_SIM

        return GRAMINE_SIM
    if name == "gramine":
        from sgxvtpm.platform.gramine.backend import GRAMINE

        return GRAMINE
    raise _unavailable(name)


def open_platform(
    name: str,
    path: Path,
    *,
    preload: Sequence[str] = (),
    release: str = "",
    sim_root: Path | None = None,
    signed_release: Path | None = None,
) -> PlatformBackend:
    """Open (or, on first use, provision) the platform ``name`` with its state in ``path``.

    ``preload``: modules the platform imports once for every enclave it
    starts (the sim zygote's). ``release`` ("module:function", called with the
    platform's :class:`PlatformKind`): the unsigned enclave specs the
    platform's signer signs, from the code installed for the platform itself.
    ``sim_root`` (sim only): the simulated provisioning authority a new
    platform is provisioned under (:func:`init_sim_root`).
    ``signed_release``: a pre-signed release directory (:func:`sign_release`, on
    the vendor's build host): the platform signs nothing and its loader uses
    the shipped SIGSTRUCTs (sim: a platform provisioned so holds no vendor key;
    gramine: no gramine-manifest or gramine-sgx-sign runs).
    ``"sim"`` starts the sim CPU process; ``"gramine"`` needs SGX hardware,
    Gramine's tools and DCAP collateral (PlatformError naming what is missing),
    then signs the release with gramine-sgx-sign and runs one gramine-sgx per
    enclave; anything else raises ValueError.
    """
    options = OpenOptions(preload, release, sim_root, signed_release)
    if name == "sim":
        from sgxvtpm.platform.sim.backend import SimBackend

        return SimBackend.open(Path(path), options)
    if name == "gramine-sim":
        from sgxvtpm.platform.sim.backend import GramineSimBackend

        return GramineSimBackend.open(Path(path), options)
    if sim_root is not None:
        raise PlatformError("--sim-root is for the sim platforms only")
    if name == "gramine":
        # Refuses with one line naming what is missing: the SGX device, Gramine's
        # tools, the DCAP collateral (platform/gramine/launcher.py).
        from sgxvtpm.platform.gramine.launcher import GramineBackend

        return GramineBackend.open(Path(path), release=release, signed_release=signed_release)
    raise _unavailable(name)


def sign_release(
    name: str, release: str, key: Path, out: Path, *, state_dir: Path | None = None
) -> dict[str, object]:
    """The vendor's build-host step (``sgxvtpm release sign``): sign the enclaves of
    ``release`` ("module:function", as :func:`open_platform`'s) for platform ``name``
    with the vendor's ``key`` into ``out``, with the release manifest
    (platform/release.py), which is returned. ``state_dir`` (gramine only): the
    serving host's state directory, which the manifests name. PlatformError (one
    line) on a bad key or missing tool."""
    import importlib

    if name == "gramine":
        from sgxvtpm.platform.gramine.launcher import sign_release as sign_gramine

        if state_dir is None:
            raise PlatformError("a Gramine release is signed for a state directory")
        return sign_gramine(release, Path(key), Path(out), Path(state_dir).resolve())
    kind = platform_kind(name)
    from sgxvtpm.platform.sim.release import sign

    module, _, function = release.partition(":")
    specs = getattr(importlib.import_module(module), function)(kind)
    return sign(specs, Path(key), Path(out), kind)


def generate_vendor_key(name: str, path: Path) -> bytes:
    """A new vendor signing key for platform ``name`` at ``path`` (created 0600, never
    overwritten); its MRSIGNER. gramine: RSA-3072 with e = 3 (SGX's SIGSTRUCT); the
    sim kinds: ECDSA P-256 (the sim's SIGSTRUCT, platform/sim/sigstruct.py)."""
    if name == "gramine":
        from sgxvtpm.platform.gramine.launcher import generate_key

        return generate_key(Path(path))
    platform_kind(name)  # ValueError for an unknown name
    from sgxvtpm.platform.sim.release import generate_key as generate_sim_key

    return generate_sim_key(Path(path))


def init_sim_root(path: Path) -> str:
    """Create a simulated provisioning authority in ``path`` (``sgxvtpm sim-root init``):
    a root key and certificate, and the vendor's enclave signing key. Returns the root
    certificate's SHA-256 (hex). PlatformError if ``path`` is not empty."""
    from sgxvtpm.platform.sim.authority import SimAuthority

    return SimAuthority.init(Path(path)).root_sha256


def _unavailable(name: str) -> Exception:
    return ValueError(f"unknown platform {name!r}: expected one of {', '.join(PLATFORMS)}")
