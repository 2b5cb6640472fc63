"""BENCHMARKS.md rendering and the verdicts against its targets, from synthetic results."""

from __future__ import annotations

import copy
from typing import Any

from benchmarks.latency import COMMANDS
from benchmarks.procmem import parse_smaps_rollup
from benchmarks.procs import parse_worker_output
from benchmarks.report import render, verdicts
from benchmarks.scale import _grow_points


def _latency(scale: float) -> dict[str, Any]:
    return {
        "ok": True,
        "commands": {
            c: {"n": 100, "median_us": 10.0 * scale * (i + 1), "p99_us": 20.0 * scale * (i + 1)}
            for i, c in enumerate(COMMANDS)
        },
    }


def results() -> dict[str, Any]:
    return {
        "quick": False,
        "started": "2024-01-01 00:00 UTC",
        "duration_s": 600,
        "machine": {"cpu": "Test CPU", "cores": "2"},
        "config": {"cheap_iterations": 100},
        "latency": {
            "a": {**_latency(0.1), "label": "libtpms in-process"},
            "b": {**_latency(1.0), "label": "swtpm"},
            "c": {**_latency(1.2), "label": "serve"},
            "d": {"ok": False, "reason": "not available: no K2 yet", "label": "K2"},
        },
        "creation": {
            "swtpm": {
                "ok": True,
                "runs": 3,
                "median_ms": 800.0,
                "setup_ms": 780.0,
                "start_ms": 20.0,
            },
            "sgxvtpm": {
                "ok": True,
                "runs": 3,
                "median_ms": 400.0,
                "cli_ms": 900.0,
                "launch_ms": 100.0,
                "manufacture_ms": 250.0,
                "registry_ms": 50.0,
            },
        },
        "memory": {
            "swtpm": {"ok": True, "instances": 10, "pss_kib": 2048, "rss_kib": 6000},
            "sgxvtpm": {
                "ok": True,
                "instances": 10,
                "pss_kib": 6144,
                "rss_kib": 30000,
                "tree_pss_per_instance_kib": 9000,
                "hostd_pss_kib": 30000,
            },
        },
        "load": {
            "swtpm": {"32": {"ok": True, "vms": 32, "commands_per_s": 50000.0}},
            "sgxvtpm": {"32": {"ok": True, "vms": 32, "commands_per_s": 60000.0}},
        },
        "scale": {
            "swtpm": {
                "ok": True,
                "rows": [],
                "stopped": "",
                "answering": {"answered": 500, "total": 500},
            },
            "sgxvtpm": {
                "ok": True,
                "stopped": "stopped at 120 instances: TimeoutError: budget",
                "rows": [
                    {
                        "instances": 120,
                        "newest_us": 300.0,
                        "first_us": 310.0,
                        "pss_per_instance_kib": 9000,
                        "create_ms": 500,
                    }
                ],
                "answering": {"answered": 120, "total": 120, "first_failure": ""},
            },
        },
        "channel": {
            "ok": True,
            "handshake_ms": 2.0,
            "plain_us_32": 40.0,
            "session_us_32": 120.0,
            "ratio_32": 3.0,
        },
    }


def by_target(res: dict[str, Any]) -> dict[str, str]:
    return {v.target: v.status for v in verdicts(res)}


def test_verdicts_from_figures() -> None:
    status = by_target(results())
    assert status["cheap commands through (c)"] == "met"  # 1.2x <= 1.5x
    assert status["cheap commands through (d)"] == "not measured"
    assert status["heavy commands through (c)"] == "missed"  # 1.2x > 1.05x
    assert status["instance creation with certificates"] == "met"
    assert status["idle memory per instance"] == "missed"  # 3x > 2x
    assert status["aggregate throughput at 32 VMs"] == "met"
    assert status["500 live instances, all answering"] == "missed"


def test_cheap_miss_explains_the_path() -> None:
    res = results()
    res["latency"]["c"] = {**_latency(2.0), "label": "serve"}
    res["latency"]["d"] = {**_latency(1.6), "label": "K2"}
    res["latency"]["b"]["cpu"] = {"wall_us": 60.0, "cpu_us": {"swtpm": 10.0, "client": 13.0}}
    res["latency"]["c"]["cpu"] = {"wall_us": 500.0, "cpu_us": {"vm serve": 220.0, "hostd": 150.0}}
    (verdict,) = [v for v in verdicts(res) if v.target == "cheap commands through (c)"]
    assert verdict.status == "missed"
    assert "swtpm's socket loop adds" in verdict.sentence
    assert "`vm serve` endpoint process adds 4.0 µs more" in verdict.sentence
    assert "vm serve 220 µs, hostd 150 µs (wall 500 µs)" in verdict.sentence
    assert "swtpm's swtpm 10.0 µs, client 13.0 µs" in verdict.sentence


def test_missing_sections_are_not_measured_never_met() -> None:
    res = results()
    for key in ("creation", "memory", "load", "scale"):
        res.pop(key)
    res["latency"].pop("c")
    assert set(by_target(res).values()) == {"not measured"}


def test_render_has_table_ratios_machine_and_reasons() -> None:
    text = render(results(), analysis="## Analysis\n\nhand-written")
    row = next(line for line in text.splitlines() if line.startswith("| GetRandom(32) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1.0 µs (2.0 µs)"  # (a)
    assert cells[2] == "10.0 µs (20.0 µs)"  # (b)
    assert cells[4] == "n/a"  # (d) not available
    assert cells[5:] == ["1.20x", "n/a", "12.00x"]
    assert "not available: no K2 yet" in text
    assert "Test CPU" in text
    assert "hand-written" in text
    assert "Stopped early: stopped at 120 instances" in text


def test_render_placement_rows_and_reason() -> None:
    res = results()
    res["placement"] = {
        "ok": True,
        "rows": [{"placement": "all three on one CPU", "sgxvtpm_us": 85.0, "swtpm_us": 12.5}],
    }
    text = render(res)
    assert "| all three on one CPU | 85.0 µs | 12.5 µs | 6.80x |" in text
    res["placement"] = {"ok": False, "reason": "needs two CPUs"}
    assert "Not measured: needs two CPUs" in render(res)


def test_render_survives_failed_sections() -> None:
    res = copy.deepcopy(results())
    for key in ("creation", "memory", "load", "scale", "channel"):
        res[key] = {"ok": False, "reason": f"failed: {key} broke"}
    res["latency"]["b"] = {"ok": False, "reason": "failed: swtpm gone"}
    text = render(res)
    assert "failed: swtpm gone" in text
    assert "| GetRandom(32) | 1.0 µs (2.0 µs) | n/a |" in text


def test_smaps_rollup_parse() -> None:
    text = "00400000-7ffd0000 ---p 00000000 00:00 0 [rollup]\nRss: 7000 kB\nPss: 2100 kB\n"
    memory = parse_smaps_rollup(text)
    assert (memory.pss_kib, memory.rss_kib, memory.private_dirty_kib) == (2100, 7000, 0)
    memory = parse_smaps_rollup(text + "Private_Dirty: 1500 kB\n")
    assert memory.private_dirty_kib == 1500


def test_memory_and_load_misses_say_why() -> None:
    res = results()
    res["memory"]["sgxvtpm"]["private_dirty_kib"] = 5120
    res["memory"]["swtpm"]["private_dirty_kib"] = 512
    res["load"]["sgxvtpm"]["32"]["commands_per_s"] = 5000.0
    res["latency"]["b"]["cpu"] = {"wall_us": 60.0, "cpu_us": {"swtpm": 10.0, "client": 13.0}}
    res["latency"]["c"]["cpu"] = {
        "wall_us": 200.0,
        "cpu_us": {"vm serve": 50.0, "hostd": 0.0, "instance": 70.0, "client": 20.0},
    }
    sentences = {v.target: v.sentence for v in verdicts(res)}
    assert "5.0 MiB of its pages are its own" in sentences["idle memory per instance"]
    assert "against swtpm's 0.5 MiB" in sentences["idle memory per instance"]
    load = sentences["aggregate throughput at 32 VMs"]
    assert "**missed**" in load
    assert "costs 120 µs of CPU in two Python processes" in load  # the client is not counted
    assert "against 10.0 µs in swtpm (12.0x" in load


def test_worker_output_last_line_or_reason() -> None:
    assert parse_worker_output('noise\n{"ok": true, "x": 1}\n', "", 0) == {"ok": True, "x": 1}
    failed = parse_worker_output("", "Traceback...\nValueError: boom\n", 1)
    assert failed == {"ok": False, "reason": "worker failed: ValueError: boom"}


def test_scale_points_continue_from_what_exists() -> None:
    assert _grow_points((1, 10, 50), 0) == [1, 10, 50]
    assert _grow_points((1, 10, 50), 32) == [32, 50]
    assert _grow_points((1, 10), 40) == [40]


def test_render_migration_section_figures_and_reasons() -> None:
    data = results()
    assert "Moving a VM's TPM state" not in render(data)  # not measured: no section
    data["migration"] = {
        "swtpm": {"ok": True, "runs": 3, "export_ms": 1.0, "transfer_ms": 0.5,
                  "import_ms": 1.5, "median_ms": 3.0, "bytes": 10000},
        "sgxvtpm": {"ok": False, "reason": "not available: no hostd"},
    }  # fmt: skip
    text = render(data)
    assert "= **3.0 ms** (median of 3; 10000 bytes of blobs)" in text
    assert "- sgxvtpm: not available: no hostd" in text
    data["migration"]["sgxvtpm"] = {**data["migration"]["swtpm"], "median_ms": 12.0,
                                    "report_ms": 250.0}  # fmt: skip
    text = render(data)
    assert "source refuses the VM 250 ms" in text
    assert "ratio sgxvtpm / swtpm: 4.00x" in text
