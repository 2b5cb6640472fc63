"""No leaks across the C boundary, and in-process latency figures.

Every process() leaves libtpms' response buffer to libtpms (reused, freed in
stop()); every get_state() blob is freed with TPM_Free. RSS must stay flat.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tests.helpers.tpm import started_engine

pytestmark = pytest.mark.integration

MAX_GROWTH_KIB = 3 * 1024


def _getrandom_growth(count: int) -> int:
    with started_engine() as ep:
        before, after, bad = ep.call("getrandom_loop", count)
    assert bad == 0
    return int(after - before)


def test_getrandom_rss_flat_20k() -> None:
    assert _getrandom_growth(20_000) < MAX_GROWTH_KIB


@pytest.mark.slow
def test_getrandom_rss_flat_100k() -> None:
    assert _getrandom_growth(100_000) < MAX_GROWTH_KIB


def test_get_state_rss_flat() -> None:
    # 2000 volatile blobs of ~9 KB: a leak would show as ~18 MB
    with started_engine() as ep:
        before, after = ep.call("state_loop", 2000)
    assert after - before < MAX_GROWTH_KIB


def test_in_process_latency(record_testsuite_property: Callable[[str, object], None]) -> None:
    """Medians in microseconds; bounds are loose (shared 2-core machine).

    The figures go to the test report (``--junitxml``: testsuite properties),
    not among the dots.
    """
    with started_engine() as ep:
        figures = ep.call("bench", 3000)
    for name, median in figures.items():
        record_testsuite_property(f"libtpms_engine_median_us {name}", median)
    assert figures["GetRandom(32)"] < 200
    assert figures["PCR_Extend"] < 200
    assert figures["CreatePrimary P-256 (+FlushContext)"] < 20_000
