"""sgxvtpm.platform: the SGX-like platform interface and its backends.

The types live in :mod:`sgxvtpm.platform.base`; :func:`open_platform` picks a
backend. Only ``sim`` exists on this machine (no SGX hardware).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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
    PlatformError,
    QuoteVerifier,
    ReportBody,
    TargetInfo,
    VerifiedQuote,
)

if TYPE_CHECKING:
    from sgxvtpm.platform.sim import SimPlatformDir

__all__ = [
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
    "PlatformError",
    "QuoteVerifier",
    "ReportBody",
    "TargetInfo",
    "VerifiedQuote",
    "open_platform",
]


def open_platform(kind: str, path: Path) -> SimPlatformDir:
    """Open (or provision) the platform backend ``kind`` with its state in ``path``.

    ``"sim"``: the simulated SGX platform. ``"gramine"`` needs SGX hardware and
    raises PlatformError here; anything else raises ValueError.
    """
    if kind == "sim":
        from sgxvtpm.platform.sim import SimPlatformDir

        return SimPlatformDir.open_or_create(Path(path))
    if kind == "gramine":
        raise PlatformError(
            "platform 'gramine' is not available on this machine: no SGX "
            "(no /dev/sgx_enclave); use 'sim'"
        )
    raise ValueError(f"unknown platform kind {kind!r}: expected 'sim' or 'gramine'")
