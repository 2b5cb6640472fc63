"""BENCHMARKS.md from a run's results (pure: a dict in, markdown out).

The verdicts compare against the targets below (``LIMITS``), each a ratio to
swtpm measured in the same run; a target whose figures are missing is "not
measured", never "met".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from benchmarks.latency import COMMANDS, HEAVY
from benchmarks.stats import ratio

CHEAP_TARGET = ("GetRandom(32)", "PCR_Extend", "PCR_Read", "NV_Read(64)")
LIMITS = {
    "cheap_c": 1.5,
    "cheap_d": 1.0,
    "heavy": 1.05,
    "creation": 1.0,
    "memory": 2.0,
    "load": 1.0,
}
SCALE_TARGET = 500
LOAD_TARGET_VMS = "32"


@dataclass(frozen=True)
class Verdict:
    target: str
    status: str  # "met", "missed", "not measured"
    sentence: str


# ---------------------------------------------------------------- formatting


def fmt_us(us: float | None) -> str:
    if us is None:
        return "n/a"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    if us >= 100:
        return f"{us:.0f} µs"
    return f"{us:.1f} µs"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def fmt_kib(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def median_of(results: dict[str, Any], target: str, command: str) -> float | None:
    entry = results.get("latency", {}).get(target, {})
    if not entry.get("ok"):
        return None
    value = entry.get("commands", {}).get(command, {}).get("median_us")
    return None if value is None else float(value)


def _p99(results: dict[str, Any], target: str, command: str) -> float | None:
    entry = results.get("latency", {}).get(target, {})
    value = entry.get("commands", {}).get(command, {}).get("p99_us") if entry.get("ok") else None
    return None if value is None else float(value)


def _ok(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("ok"))


# ---------------------------------------------------------------- verdicts


def _ratios(results: dict[str, Any], target: str, commands: Iterable[str]) -> dict[str, float]:
    out = {}
    for command in commands:
        value = ratio(median_of(results, target, command), median_of(results, "b", command))
        if value is not None:
            out[command] = value
    return out


def _cpu_sentence(results: dict[str, Any], target: str) -> str:
    cpu = results.get("latency", {}).get(target, {}).get("cpu")
    if not cpu:
        return ""
    per = ", ".join(f"{name} {fmt_us(us)}" for name, us in cpu["cpu_us"].items())
    return f"{per} (wall {fmt_us(cpu['wall_us'])})"


def _path_costs(results: dict[str, Any], target: str) -> str:
    """Where the time of a cheap command goes, from GetRandom's medians and CPU use."""
    cmd = "GetRandom(32)"
    a, b, c, d = (median_of(results, t, cmd) for t in "abcd")
    parts = []
    if a is not None and b is not None:
        parts.append(f"libtpms itself needs {fmt_us(a)}; swtpm's socket loop adds {fmt_us(b - a)}")
    if a is not None and d is not None:
        parts.append(
            f"the K2 path (a TLS record each way, a hop to the instance process and "
            f"its Python loop; hostd is off the path after the handshake) adds {fmt_us(d - a)}"
        )
    if target == "c" and c is not None and d is not None:
        parts.append(f"the `vm serve` endpoint process adds {fmt_us(c - d)} more")
    mine, peer = _cpu_sentence(results, target), _cpu_sentence(results, "b")
    if mine and peer:
        parts.append(f"CPU per GetRandom: {mine}, against swtpm's {peer}")
    return "; ".join(parts)


def _heavy_costs(results: dict[str, Any], target: str, commands: list[str]) -> str:
    """For commands dominated by TPM work: what the transport adds over swtpm."""
    extra = []
    for c in commands:
        mine, peer = median_of(results, target, c), median_of(results, "b", c)
        if mine is not None and peer is not None:
            extra.append(f"{c} +{fmt_us(mine - peer)} on {fmt_us(median_of(results, 'a', c))}")
    return (
        "the TPM work is the same libtpms code; over swtpm the transport adds "
        + ", ".join(extra)
        + " of libtpms time"
    )


def _latency_verdict(
    results: dict[str, Any], name: str, target: str, commands: Iterable[str], limit: float
) -> Verdict:
    commands = list(commands)
    ratios = _ratios(results, target, commands)
    if len(ratios) < len(commands):
        reason = results.get("latency", {}).get(target, {}).get("reason", "figures missing")
        return Verdict(name, "not measured", f"{name}: not measured ({reason}).")
    worst = max(ratios.values())
    listing = ", ".join(f"{c} {r:.2f}x" for c, r in ratios.items())
    status = "met" if worst <= limit else "missed"
    why = ""
    if status == "missed":
        cheap = bool(set(commands) & set(CHEAP_TARGET))
        why = _path_costs(results, target) if cheap else _heavy_costs(results, target, commands)
    sentence = f"{name} (<= {limit:g}x): **{status}** — {listing}."
    if why:
        sentence += f" Why: {why}."
    return Verdict(name, status, sentence)


def _creation_verdict(results: dict[str, Any]) -> Verdict:
    name = "instance creation with certificates"
    creation = results.get("creation", {})
    sw, sg = creation.get("swtpm", {}), creation.get("sgxvtpm", {})
    if not (_ok(sw) and _ok(sg)):
        reason = (sg if _ok(sw) else sw).get("reason", "figures missing")
        return Verdict(name, "not measured", f"{name}: not measured ({reason}).")
    value = ratio(sg["median_ms"], sw["median_ms"])
    assert value is not None
    status = "met" if value <= LIMITS["creation"] else "missed"
    detail = (
        f"sgxvtpm {sg['median_ms']:.0f} ms vs swtpm_setup + start "
        f"{sw['median_ms']:.0f} ms ({value:.2f}x)"
    )
    if "manufacture_ms" in sg:
        detail += (
            f"; sgxvtpm's time: enclave launch {sg['launch_ms']:.0f} ms, EKs and "
            f"certificates {sg['manufacture_ms']:.0f} ms, registry and reply "
            f"{sg['registry_ms']:.0f} ms"
        )
    return Verdict(name, status, f"{name} (<= 1.0x): **{status}** — {detail}.")


def _memory_verdict(results: dict[str, Any]) -> Verdict:
    name = "idle memory per instance"
    memory = results.get("memory", {})
    sw, sg = memory.get("swtpm", {}), memory.get("sgxvtpm", {})
    if not (_ok(sw) and _ok(sg)):
        reason = (sg if _ok(sw) else sw).get("reason", "figures missing")
        return Verdict(name, "not measured", f"{name}: not measured ({reason}).")
    value = ratio(sg["pss_kib"], sw["pss_kib"])
    assert value is not None
    status = "met" if value <= LIMITS["memory"] else "missed"
    detail = (
        f"instance enclave PSS {fmt_kib(sg['pss_kib'])} vs swtpm {fmt_kib(sw['pss_kib'])} "
        f"({value:.2f}x) with {sg['instances']} instances; everything under hostd "
        f"divided by the instances: {fmt_kib(sg['tree_pss_per_instance_kib'])}"
    )
    if status == "missed" and "private_dirty_kib" in sg:
        detail += (
            f". Why: an instance is a CPython process forked from the zygote; "
            f"{fmt_kib(sg['private_dirty_kib'])} of its pages are its own (written "
            f"since the fork: its heap, libtpms' state, and the shared interpreter "
            f"pages that reference counting copies), against swtpm's "
            f"{fmt_kib(sw.get('private_dirty_kib', 0))}"
        )
    return Verdict(name, status, f"{name} (<= 2x swtpm's PSS): **{status}** — {detail}.")


def _load_verdict(results: dict[str, Any]) -> Verdict:
    name = f"aggregate throughput at {LOAD_TARGET_VMS} VMs"
    load = results.get("load", {})
    sw = load.get("swtpm", {}).get(LOAD_TARGET_VMS, {})
    sg = load.get("sgxvtpm", {}).get(LOAD_TARGET_VMS, {})
    if not (_ok(sw) and _ok(sg)):
        reason = (sg if _ok(sw) else sw).get("reason", f"no {LOAD_TARGET_VMS}-VM point in this run")
        return Verdict(name, "not measured", f"{name}: not measured ({reason}).")
    value = ratio(sg["commands_per_s"], sw["commands_per_s"])
    assert value is not None
    status = "met" if value >= LIMITS["load"] else "missed"
    detail = (
        f"sgxvtpm (c) {sg['commands_per_s']:.0f} commands/s vs swtpm "
        f"{sw['commands_per_s']:.0f} ({value:.2f}x)"
    )
    if status == "missed":
        detail += _load_why(results)
    return Verdict(name, status, f"{name} (>= 1.0x): **{status}** — {detail}.")


def _server_cpu_us(results: dict[str, Any], target: str) -> float | None:
    """CPU per command of the processes that serve it (everything but the client)."""
    cpu = results.get("latency", {}).get(target, {}).get("cpu")
    if not cpu:
        return None
    return float(sum(us for name, us in cpu["cpu_us"].items() if name != "client"))


def _load_why(results: dict[str, Any]) -> str:
    mine, peer = _server_cpu_us(results, "c"), _server_cpu_us(results, "b")
    if not mine or not peer:
        return ""
    return (
        f". Why: the load keeps both cores busy, so throughput is CPU per command; "
        f"serving one command through (c) costs {fmt_us(mine)} of CPU in two Python "
        f"processes (vm serve, instance) against {fmt_us(peer)} in swtpm "
        f"({mine / peer:.1f}x, single-client loop above), and with many VMs every "
        f"command also switches between more processes whose caches evict each other"
    )


def _scale_verdict(results: dict[str, Any]) -> Verdict:
    name = f"{SCALE_TARGET} live instances, all answering"
    sg = results.get("scale", {}).get("sgxvtpm", {})
    if not _ok(sg):
        return Verdict(name, "not measured", f"{name}: not measured ({sg.get('reason', '')}).")
    answering = sg.get("answering", {})
    total, answered = int(answering.get("total", 0)), int(answering.get("answered", 0))
    status = "met" if total >= SCALE_TARGET and answered == total else "missed"
    detail = f"{total} instances created, {answered} answered GetRandom"
    if sg.get("stopped"):
        detail += f"; {sg['stopped']}"
    if answering.get("first_failure"):
        detail += f"; first failure: {answering['first_failure']}"
    return Verdict(name, status, f"{name}: **{status}** — {detail}.")


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    heavy = list(HEAVY)
    return [
        _latency_verdict(
            results, "cheap commands through (c)", "c", CHEAP_TARGET, LIMITS["cheap_c"]
        ),
        _latency_verdict(
            results, "cheap commands through (d)", "d", CHEAP_TARGET, LIMITS["cheap_d"]
        ),
        _latency_verdict(results, "heavy commands through (c)", "c", heavy, LIMITS["heavy"]),
        _latency_verdict(results, "heavy commands through (d)", "d", heavy, LIMITS["heavy"]),
        _creation_verdict(results),
        _memory_verdict(results),
        _load_verdict(results),
        _scale_verdict(results),
    ]


# ---------------------------------------------------------------- sections


def _machine(results: dict[str, Any]) -> list[str]:
    machine = results.get("machine", {})
    return ["## Machine", "", *_table(["", ""], ([k, str(v)] for k, v in machine.items())), ""]


def _latency(results: dict[str, Any]) -> list[str]:
    lat = results.get("latency", {})
    labels = {t: lat.get(t, {}).get("label", t) for t in "abcd"}
    header = ["command", *(f"({t}) {labels[t]}" for t in "abcd"), "(c)/(b)", "(d)/(b)", "(c)/(a)"]
    rows = []
    for command in COMMANDS:
        cells = [command]
        for t in "abcd":
            med = median_of(results, t, command)
            cells.append(
                "n/a" if med is None else f"{fmt_us(med)} ({fmt_us(_p99(results, t, command))})"
            )
        c, b, a, d = (median_of(results, t, command) for t in "cbad")
        cells += [fmt_ratio(ratio(c, b)), fmt_ratio(ratio(d, b)), fmt_ratio(ratio(c, a))]
        rows.append(cells)
    lines = [
        "## Per-command latency",
        "",
        "Median (p99) per command, same client code for every target: "
        f"{results.get('config', {}).get('cheap_iterations', '?')} iterations for cheap "
        "commands and a tenth of that for heavy ones, after a warm-up. (a) keeps its state "
        "in memory; (b) writes files without fsync; (c) and (d) seal and fsync every state "
        "change before answering (SECURITY.md property 16).",
        "",
        *_table(header, rows),
        "",
    ]
    for t in "abcd":
        entry = lat.get(t, {})
        if entry and not entry.get("ok"):
            lines.append(f"- ({t}) {labels[t]}: {entry.get('reason', 'no result')}")
    lines.append("")
    return [*lines, *_cpu_breakdown(results)]


def _cpu_breakdown(results: dict[str, Any]) -> list[str]:
    """Per target: wall and CPU time per GetRandom(32) in each process on the path."""
    lat = results.get("latency", {})
    rows = []
    for t in "abcd":
        cpu = lat.get(t, {}).get("cpu") if _ok(lat.get(t, {})) else None
        if not cpu:
            continue
        per = cpu["cpu_us"]
        busy = sum(per.values())
        user = cpu.get("user_us", {})
        parts = ", ".join(
            f"{name} {fmt_us(us)}" + (f" ({fmt_us(user[name])} user)" if name in user else "")
            for name, us in per.items()
        )
        rows.append(
            [f"({t}) {lat[t].get('label', t)}", fmt_us(cpu["wall_us"]), parts, fmt_us(busy),
             fmt_us(max(0.0, cpu["wall_us"] - busy))]
        )  # fmt: skip
    if not rows:
        return []
    return [
        "Where one GetRandom(32) goes: wall time per command in a closed loop; CPU time per "
        "command of each process on the path (all its threads, /proc/PID/task/*/schedstat), "
        "and in brackets the part in user space (Python and libtpms; from /proc/PID/stat, "
        "shown where enough clock ticks passed), the rest being the kernel (socket I/O, "
        "waking the next process); and the wall time left over, spent waiting for wake-ups:",
        "",
        *_table(["target", "wall", "CPU per process", "CPU total", "waiting"], rows),
        "",
    ]


def _creation(results: dict[str, Any]) -> list[str]:
    creation = results.get("creation", {})
    sw, sg = creation.get("swtpm", {}), creation.get("sgxvtpm", {})
    lines = ["## Instance creation with EK certificates", ""]
    if _ok(sw):
        lines.append(
            f"- swtpm: `swtpm_setup --tpm2 --create-ek-cert --create-platform-cert` "
            f"(local CA) {sw['setup_ms']:.0f} ms + swtpm start until it answers "
            f"{sw['start_ms']:.0f} ms = **{sw['median_ms']:.0f} ms** "
            f"(median of {sw['runs']})"
        )
    else:
        lines.append(f"- swtpm: {sw.get('reason', 'no result')}")
    if _ok(sg):
        text = (
            f"- sgxvtpm: `vm create` (VMM call) **{sg['median_ms']:.0f} ms** (median of "
            f"{sg['runs']}); the `sgxvtpm vm create` command line, interpreter start "
            f"included: {sg['cli_ms']:.0f} ms"
            + (f" (median of {sg['cli_runs']})" if sg.get("cli_runs", 1) > 1 else "")
        )
        if "manufacture_ms" in sg:
            text += (
                f"; from hostd's log: launch {sg['launch_ms']:.0f} ms, EKs + certificates "
                f"{sg['manufacture_ms']:.0f} ms, registry + reply {sg['registry_ms']:.0f} ms"
            )
        lines.append(text)
    else:
        lines.append(f"- sgxvtpm: {sg.get('reason', 'no result')}")
    value = ratio(sg.get("median_ms"), sw.get("median_ms")) if _ok(sw) and _ok(sg) else None
    lines += [f"- ratio sgxvtpm / swtpm: {fmt_ratio(value)}", ""]
    return lines


def _migration(results: dict[str, Any]) -> list[str]:
    section = results.get("migration")
    if section is None:
        return []
    sw, sg = section.get("swtpm", {}), section.get("sgxvtpm", {})
    lines = ["## Moving a VM's TPM state to another host", ""]
    for name, entry, what in (
        ("swtpm", sw, "CMD_GET_STATEBLOB x3, CMD_STOP + CMD_SET_STATEBLOB x3 + CMD_INIT "
                      "on a second swtpm; the host reads the state"),
        ("sgxvtpm", sg, "the same over K2 between two hostds of one fleet; portable "
                        "blobs under the VM's fleet key"),
    ):  # fmt: skip
        if _ok(entry):
            lines.append(
                f"- {name} ({what}): export {entry['export_ms']:.1f} ms + transfer (file) "
                f"{entry['transfer_ms']:.2f} ms + import {entry['import_ms']:.1f} ms = "
                f"**{entry['median_ms']:.1f} ms** (median of {entry['runs']}; "
                f"{entry['bytes']:.0f} bytes of blobs)"
            )
        else:
            lines.append(f"- {name}: {entry.get('reason', 'no result')}")
    if _ok(sg) and "report_ms" in sg:
        lines.append(
            f"- sgxvtpm, after the import: first TPM command on the destination until the "
            f"source refuses the VM {sg['report_ms']:.0f} ms (the destination's manager polls "
            "every 0.5 s)"
        )
    value = ratio(sg.get("median_ms"), sw.get("median_ms")) if _ok(sw) and _ok(sg) else None
    lines += [f"- ratio sgxvtpm / swtpm: {fmt_ratio(value)}", ""]
    return lines


def _startup_cell(entry: dict[str, Any]) -> str:
    p90 = f"p90 {entry['p90_ms']:.0f}, " if "p90_ms" in entry else ""
    return f"{entry['median_ms']:.0f} ms ({p90}max {entry['max_ms']:.0f})"


def _startup(results: dict[str, Any]) -> list[str]:
    section = results.get("startup")
    if not isinstance(section, dict):
        return []
    lines = ["## Control socket up after exec (libvirt waits 1000 ms)", ""]
    if not _ok(section):
        return [*lines, f"- {section.get('reason', 'no result')}", ""]
    rows = []
    for kind, label in (("swtpm", "swtpm socket"),
                        ("sgxvtpm", "sgxvtpm's swtpm (endpoint/libvirt)")):
        entry = section.get(kind, {})
        if not _ok(entry):
            rows.append([label, entry.get("reason", "no result"), ""])
            continue
        rows.append([label] + [_startup_cell(entry[load]) for load in ("idle", "loaded")])
    runs = next((section[k]["idle"]["runs"] for k in ("swtpm", "sgxvtpm")
                 if _ok(section.get(k, {}))), "?")
    lines.append(f"Exec until the socket exists, median of {runs} starts; loaded: every CPU "
                 f"busy with a spinning process. sgxvtpm's target: "
                 f"{section.get('target_ms', 300):.0f} ms under load.")
    lines.append("")
    return [*lines, *_table(["executable", "idle", "loaded"], rows), ""]


def _memory(results: dict[str, Any]) -> list[str]:
    memory = results.get("memory", {})
    sw, sg = memory.get("swtpm", {}), memory.get("sgxvtpm", {})
    lines = ["## Idle memory per instance", ""]
    rows = []
    if _ok(sw):
        rows.append(
            [
                "swtpm process",
                str(sw["instances"]),
                fmt_kib(sw["pss_kib"]),
                fmt_kib(sw["rss_kib"]),
                fmt_kib(sw["pss_kib"]),
            ]
        )
    if _ok(sg):
        rows.append(
            [
                "sgxvtpm instance enclave",
                str(sg["instances"]),
                fmt_kib(sg["pss_kib"]),
                fmt_kib(sg["rss_kib"]),
                fmt_kib(sg["tree_pss_per_instance_kib"]),
            ]
        )
    lines += _table(
        ["process", "instances alive", "PSS (median)", "RSS (median)", "all PSS / instances"], rows
    )
    for key, entry in (("swtpm", sw), ("sgxvtpm", sg)):
        if not _ok(entry):
            lines.append(f"\n- {key}: {entry.get('reason', 'no result')}")
    if _ok(sg):
        lines.append(
            f'\n"All PSS / instances" for sgxvtpm counts hostd '
            f"({fmt_kib(sg['hostd_pss_kib'])}), the zygote and the manager too."
        )
    value = ratio(sg.get("pss_kib"), sw.get("pss_kib")) if _ok(sw) and _ok(sg) else None
    lines += ["", f"Ratio sgxvtpm / swtpm (PSS): {fmt_ratio(value)}", ""]
    return lines


def _load(results: dict[str, Any]) -> list[str]:
    load = results.get("load", {})
    points = sorted({*load.get("swtpm", {}), *load.get("sgxvtpm", {})}, key=int)
    rows = []
    notes = []
    for n in points:
        sw, sg = load.get("swtpm", {}).get(n, {}), load.get("sgxvtpm", {}).get(n, {})
        a = sw.get("commands_per_s") if _ok(sw) else None
        b = sg.get("commands_per_s") if _ok(sg) else None
        rows.append(
            [
                n,
                "n/a" if a is None else f"{a:.0f}",
                "n/a" if b is None else f"{b:.0f}",
                fmt_ratio(ratio(b, a)),
            ]
        )
        for key, entry in (("swtpm", sw), ("sgxvtpm", sg)):
            if entry and not _ok(entry):
                notes.append(f"- {key}, {n} VMs: {entry.get('reason')}")
    lines = [
        "## Aggregate throughput",
        "",
        "Commands per second over all VMs, each VM a persistent connection in a closed "
        "loop of GetRandom(32) and PCR_Extend; two load processes; sgxvtpm through "
        "`vm serve --swtpm` (c).",
        "",
        *_table(["VMs", "swtpm cmd/s", "sgxvtpm (c) cmd/s", "ratio"], rows),
    ]
    if notes:
        lines += ["", *dict.fromkeys(notes)]
    return [*lines, ""]


def _scale_rows(entry: dict[str, Any]) -> list[list[str]]:
    rows = []
    for row in entry.get("rows", []):
        rows.append(
            [
                str(row["instances"]),
                fmt_us(row.get("newest_us")),
                fmt_us(row.get("first_us")),
                fmt_kib(row.get("pss_per_instance_kib")),
                f"{row.get('create_ms', 0):.0f} ms",
            ]
        )
    return rows


def _scale(results: dict[str, Any]) -> list[str]:
    scale = results.get("scale", {})
    lines = [
        "## Scale",
        "",
        "Latency of GetRandom(32) (median of 50, new worker) on the newest and the first "
        "instance, memory per instance (all PSS / instances), and the time to create the "
        "latest instances, as instances are added. swtpm instances are bare `swtpm socket` "
        "processes; sgxvtpm instances are full `vm create`s probed over K2.",
        "",
    ]
    header = ["instances", "newest", "first", "PSS / instance", "create (latest)"]
    for key in ("swtpm", "sgxvtpm"):
        entry = scale.get(key, {})
        lines.append(f"### {key}")
        lines.append("")
        if not _ok(entry):
            lines += [f"{entry.get('reason', 'no result')}", ""]
            continue
        lines += _table(header, _scale_rows(entry))
        answering = entry.get("answering", {})
        lines.append("")
        lines.append(
            f"All answering at the end: {answering.get('answered', '?')} of "
            f"{answering.get('total', '?')}."
        )
        if answering.get("first_failure"):
            lines.append(f"First failure: {answering['first_failure']}")
        if entry.get("stopped"):
            lines.append(f"Stopped early: {entry['stopped']}.")
        lines.append("")
    return lines


def _channel(results: dict[str, Any]) -> list[str]:
    channel = results.get("channel", {})
    lines = ["## Channel overhead (benchmarks/bench_channel.py)", ""]
    if not _ok(channel):
        return [*lines, str(channel.get("reason", "not run")), ""]
    sizes = sorted(int(k.split("_")[-1]) for k in channel if k.startswith("ratio_"))
    rows = [
        [
            str(s),
            fmt_us(channel[f"plain_us_{s}"]),
            fmt_us(channel[f"session_us_{s}"]),
            fmt_ratio(channel[f"ratio_{s}"]),
        ]
        for s in sizes
    ]
    return [
        *lines,
        f"Attested handshake (TLS 1.3 + quote check): {channel['handshake_ms']:.2f} ms. "
        "Echo round trip over a socketpair, plain vs inside the attested session:",
        "",
        *_table(["bytes", "plain", "session", "ratio"], rows),
        "",
    ]


def _placement(results: dict[str, Any]) -> list[str]:
    placement = results.get("placement")
    if not placement:
        return []
    lines = [
        "## Placement",
        "",
        "GetRandom(32) medians through `vm serve --swtpm` (c) and swtpm with the processes "
        "pinned to the CPUs of each row (swtpm where the instance enclave is); every other "
        "section leaves placement to the scheduler. A wake-up on the other CPU costs an IPI "
        "(on a virtual machine, a VM exit).",
        "",
    ]
    if not _ok(placement):
        return [*lines, f"Not measured: {placement.get('reason')}", ""]
    rows = [
        [
            row["placement"],
            fmt_us(row["sgxvtpm_us"]),
            fmt_us(row["swtpm_us"]),
            fmt_ratio(ratio(row["sgxvtpm_us"], row["swtpm_us"])),
        ]
        for row in placement["rows"]
    ]
    return [*lines, *_table(["placement", "sgxvtpm (c)", "swtpm", "ratio"], rows), ""]


def render(results: dict[str, Any], analysis: str = "") -> str:
    lines = [
        "# sgxvtpm benchmarks",
        "",
        f"Generated by `make bench` (`sgxvtpm bench{' --quick' if results.get('quick') else ''}`"
        f") on {results.get('started', '?')} in {results.get('duration_s', 0):.0f} s. "
        "Results are figures, not pass/fail tests; every ratio compares two systems measured "
        "in this same run, on the same machine, with the same client and the same libtpms.",
        "",
        "## Targets",
        "",
        *(f"- {v.sentence}" for v in verdicts(results)),
        "",
        *_latency(results),
        *_placement(results),
        *_creation(results),
        *_migration(results),
        *_startup(results),
        *_memory(results),
        *_load(results),
        *_scale(results),
        *_channel(results),
        *_machine(results),
    ]
    if analysis.strip():
        lines += [analysis.strip(), ""]
    return "\n".join(lines)
