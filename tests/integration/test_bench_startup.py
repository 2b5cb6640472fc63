"""The "control socket up after exec" benchmark (benchmarks/startup.py) produces its figures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from benchmarks import startup
from benchmarks.config import QUICK
from benchmarks.context import Context
from benchmarks.report import _startup

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("swtpm") is None, reason="Debian's swtpm is not installed"),
]


def test_startup_section_times_swtpm_and_ours_idle_and_loaded(tmp_path: Path) -> None:
    ctx = Context(tmp_path, QUICK)
    try:
        results = startup.run(ctx)
    finally:
        ctx.close()
    for kind in ("swtpm", "sgxvtpm"):
        assert results[kind]["ok"], results[kind]
        for load in ("idle", "loaded"):
            entry = results[kind][load]
            assert entry["runs"] == QUICK.startup_runs
            # libvirt gives up after 1000 ms: both must be well inside it.
            assert 0 < entry["median_ms"] <= entry["max_ms"] < 1000, (kind, load, entry)
    text = "\n".join(_startup({"startup": results}))
    assert "| sgxvtpm's swtpm (endpoint/libvirt) |" in text
    assert " ms (p90 " in text and ", max " in text
