"""Shared pytest configuration.

Tests marked ``slow`` are the long versions run by ``make stress``
(SGXVTPM_STRESS=1); ``make test`` runs everything else.

The operator identity, pinned platform roots and VM bindings go to a
credentials directory (sgxvtpm/vmm/credentials.py); the session gets its own,
so no test writes to the invoking user's ~/.config/sgxvtpm.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

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
