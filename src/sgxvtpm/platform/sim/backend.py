"""The sim platform behind base.py's seam: :data:`SIM` (its kind) and :class:`SimBackend`.

Everything outside ``sgxvtpm.platform.sim`` reaches the simulated platform
through these two, as ``sgxvtpm.platform.platform_kind("sim")`` and
``sgxvtpm.platform.open_platform("sim", ...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from sgxvtpm.platform.base import EnclaveSpec, OpenOptions
from sgxvtpm.platform.sim.gramine_sim import GRAMINE_SIM, GramineSimKind
from sgxvtpm.platform.sim.loader import SimLoader
from sgxvtpm.platform.sim.measure import SimMeasuredKind
from sgxvtpm.platform.sim.release import load as load_release


class SimKind(SimMeasuredKind):
    """base.PlatformKind of the simulated platform."""

    name = "sim"
    # The zygote forks every sim enclave: it runs in each one before the entry.
    enclave_bootstrap: tuple[str, ...] = ("sgxvtpm.platform.sim.zygote",)
    # hostd may hand an authenticated client's connection to an instance.
    connection_handoff = True


SIM = SimKind()


class _LoaderBackend:
    """The part of a base.PlatformBackend that the sim CPU's loader answers."""

    _gramine_sim = False

    def __init__(self, loader: SimLoader) -> None:
        self._loader = loader

    @classmethod
    def open(cls, path: Path, options: OpenOptions) -> Self:
        kind = GRAMINE_SIM if cls._gramine_sim else SIM
        # hostd --release DIR: the vendor's SIGSTRUCTs (public files, read here).
        signed = options.signed_release
        loader = SimLoader(
            Path(path), preload=() if cls._gramine_sim else options.preload,
            release=options.release, gramine_sim=cls._gramine_sim, sim_root=options.sim_root,
            presigned=None if signed is None else load_release(signed, kind),
        )  # fmt: skip
        return cls(loader)

    @property
    def loader(self) -> SimLoader:
        return self._loader

    @property
    def attestation_root_pem(self) -> bytes:
        return self._loader.attestation_root_pem

    def signed(self, spec: EnclaveSpec) -> EnclaveSpec:
        return self._loader.signed(spec)

    def platform_quote(self, report_data: bytes) -> bytes:
        return self._loader.probe_quote(report_data)

    def replace_collateral(self, collateral: str) -> None:
        self._loader.replace_collateral(collateral)

    def close(self) -> None:
        self._loader.close()


class SimBackend(_LoaderBackend, SimKind):
    """base.PlatformBackend: a sim platform opened through its CPU process.

    The loader starts the sim CPU (:mod:`.cpu`) on the platform directory;
    the CPU alone reads the platform's secrets, and signs the release named
    by ``release`` ("module:function", called with :data:`SIM`) from its own
    installed code.
    """


class GramineSimBackend(_LoaderBackend, GramineSimKind):
    """base.PlatformBackend of gramine-sim (platform/sim/gramine_sim.py): the sim CPU
    launches one stand-in process per enclave, which runs the Gramine code path."""

    _gramine_sim = True  # no zygote: every enclave is a fresh process
