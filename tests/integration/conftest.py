"""Fixtures of the integration tests: real processes (the sim loader and its zygote,
hostd and its enclaves)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers.echo_client import copy_echo_code
from tests.helpers.hostd import Hostd, running_hostd

from sgxvtpm.platform.sim import SimLoader, SimPlatformDir


@pytest.fixture(scope="module")
def sim_loader(sim_platform: SimPlatformDir) -> Iterator[SimLoader]:
    """``sim_platform``'s loader: its CPU process and zygote, for the module."""
    with sim_platform.loader() as loader:
        yield loader


@pytest.fixture(scope="module")
def echo_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The echo enclave's code (tests/helpers/sim_echo_enclave.py), outside any package."""
    return copy_echo_code(tmp_path_factory.mktemp("enclave_code"))


@pytest.fixture
def hostd(tmp_path: Path) -> Iterator[Hostd]:
    """A real hostd of this test's own, with its manager enclave, on tmp_path/state."""
    with running_hostd(tmp_path / "state") as h:
        yield h
