"""The benchmark harness end to end, tiny: it must keep producing numbers.

Results are figures, not pass/fail on speed: this only checks that a run
writes BENCHMARKS-style output with real medians for (a) libtpms and (b)
swtpm, and that every other target has either figures or a stated reason.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.latency import COMMANDS
from benchmarks.procs import ROOT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("swtpm") is None, reason="Debian's swtpm is not installed"),
]
NUMBER = re.compile(r"^\d+(\.\d+)? (µs|ms) \(\d+(\.\d+)? (µs|ms)\)$")
TINY = [
    "--quick",
    "--iterations",
    "20",
    "--creation-runs",
    "1",
    "--memory-instances",
    "2",
    "--load-vms",
    "1,2",
    "--load-seconds",
    "0.2",
    "--scale-points",
    "1,2",
    "--scale-budget",
    "5",
    "--channel-iterations",
    "5",
]


def test_quick_run_writes_numbers_for_a_and_b(tmp_path: Path) -> None:
    out = tmp_path / "BENCH.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *TINY, "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    rows = {
        cells[0]: cells
        for line in text.splitlines()
        if line.startswith("| ")
        for cells in [[c.strip() for c in line.strip().strip("|").split("|")]]
    }
    for command in COMMANDS:
        assert command in rows, f"no row for {command}"
        a, b = rows[command][1], rows[command][2]
        assert NUMBER.match(a), f"(a) {command}: {a!r}"
        assert NUMBER.match(b), f"(b) {command}: {b!r}"
    results = json.loads(out.with_suffix(".json").read_text())
    for target in "cd":  # figures, or a reason why not
        entry = results["latency"][target]
        assert entry["ok"] or entry["reason"], entry
    assert "## Targets" in text
    assert results["machine"]["cores"]
    # swtpm's side of every other section ran.
    assert results["creation"]["swtpm"]["ok"], results["creation"]["swtpm"]
    assert results["memory"]["swtpm"]["pss_kib"] > 0
    assert results["load"]["swtpm"]["2"]["commands_per_s"] > 0
    assert results["scale"]["swtpm"]["answering"]["answered"] == 2
    placement = results["placement"]  # measured, or a reason (one CPU)
    assert placement["ok"] or placement["reason"], placement
    if placement["ok"]:
        assert len(placement["rows"]) == 4
        assert all(r["sgxvtpm_us"] > 0 and r["swtpm_us"] > 0 for r in placement["rows"])
