"""Fixtures of the unit tests (no process of ours is started by them)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from sgxvtpm.platform.base import EnclaveIdentity, EnclavePlatform
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.util import measured

ENCLAVE = EnclaveIdentity(b"\x01" * 32, bytes(range(32)), isv_prod_id=1, isv_svn=1)


@pytest.fixture
def enclave_platform(fresh_sim_platform: SimPlatformDir) -> EnclavePlatform:
    """What enclave ``ENCLAVE`` gets from a fresh sim platform: its keys and counters."""
    return fresh_sim_platform.enclave_platform(ENCLAVE)


@pytest.fixture
def clean_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # codeimport.install makes this process "an enclave" for util.measured.
    monkeypatch.setattr(measured, "_libraries", {})
    monkeypatch.setattr(measured, "_in_enclave", False)
    meta = list(sys.meta_path)
    yield
    sys.meta_path[:] = meta
    # The sample enclave package of test_sim_measure.py.
    for name in [n for n in sys.modules if n == "encpkg" or n.startswith("encpkg.")]:
        del sys.modules[name]
