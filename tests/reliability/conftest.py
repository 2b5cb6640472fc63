"""Fixtures of the reliability suite (RELIABILITY.md): a real hostd under control."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers.vmtools import HostdCtl, running


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[HostdCtl]:
    """A hostd of this test's own, on tmp_path/state, which the test may kill and restart."""
    with running(tmp_path / "state") as c:
        yield c
