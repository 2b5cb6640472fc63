"""Fixtures of the unit tests (no process of ours is started by them)."""

from __future__ import annotations

import pytest

from sgxvtpm.platform.base import EnclaveIdentity, EnclavePlatform
from sgxvtpm.platform.sim import SimPlatformDir

ENCLAVE = EnclaveIdentity(b"\x01" * 32, bytes(range(32)), isv_prod_id=1, isv_svn=1)


@pytest.fixture
def enclave_platform(fresh_sim_platform: SimPlatformDir) -> EnclavePlatform:
    """What enclave ``ENCLAVE`` gets from a fresh sim platform: its keys and counters."""
    return fresh_sim_platform.enclave_platform(ENCLAVE)
