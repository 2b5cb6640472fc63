"""Shared pytest configuration, and the fixtures of more than one layer.

Each layer's own fixtures are in its conftest.py (tests/unit, tests/integration,
tests/e2e, tests/reliability); helpers that tests import by name are in
tests/helpers (``from tests.helpers.x import ...``).

Tests marked ``slow`` are the long versions run by ``make stress``
(SGXVTPM_STRESS=1); ``make test`` runs everything else.

The operator identity, pinned platform roots and VM bindings go to a
credentials directory (sgxvtpm/vmm/credentials.py); the session gets its own,
so no test writes to the invoking user's ~/.config/sgxvtpm.

The sim platform, in-process (its keys, quotes and counters; no CPU process):
``sim_platform`` is shared by a module's tests, ``other_sim_platform`` is a
second one (another attestation root) for the same module, and
``fresh_sim_platform`` is a new one for each test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.vmm.credentials import ENV as CREDENTIALS_ENV


@pytest.fixture(scope="session", autouse=True)
def _session_credentials(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    saved = os.environ.get(CREDENTIALS_ENV)
    os.environ[CREDENTIALS_ENV] = str(tmp_path_factory.mktemp("credentials"))
    try:
        yield
    finally:
        if saved is None:
            del os.environ[CREDENTIALS_ENV]
        else:
            os.environ[CREDENTIALS_ENV] = saved


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SGXVTPM_STRESS"):
        return
    skip = pytest.mark.skip(reason="long version: run with make stress")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def sim_platform(tmp_path_factory: pytest.TempPathFactory) -> SimPlatformDir:
    return SimPlatformDir.open_or_create(tmp_path_factory.mktemp("sim") / "platform")


@pytest.fixture(scope="module")
def other_sim_platform(tmp_path_factory: pytest.TempPathFactory) -> SimPlatformDir:
    return SimPlatformDir.open_or_create(tmp_path_factory.mktemp("sim") / "other")


@pytest.fixture
def fresh_sim_platform(tmp_path: Path) -> SimPlatformDir:
    return SimPlatformDir.open_or_create(tmp_path / "platform")
