"""Shared pytest configuration.

Tests marked ``slow`` are the long versions run by ``make stress``
(SGXVTPM_STRESS=1); ``make test`` runs everything else.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SGXVTPM_STRESS"):
        return
    skip = pytest.mark.skip(reason="long version: run with make stress")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
