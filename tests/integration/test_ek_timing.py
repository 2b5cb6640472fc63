"""Manufacturing time per instance: our code on libtpms in-process, on swtpm, and swtpm_setup.

All three make an RSA-2048 EK and an ECC EK, EK certificates, a platform
certificate, and store them in NV; ours also write-locks NV and allocates the
sha256 bank (swtpm_setup allocates banks too). swtpm_setup always makes an
ECC P-384 EK, so ours is timed with P-256 (our default) and with P-384.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.helpers.ek_ca import manager_ca
from tests.helpers.processes import helper_command, helper_env
from tests.helpers.swtpm import Swtpm, swtpm_setup

from sgxvtpm.tpm.ek import manufacture, read_ek_certificate

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("swtpm_setup"), reason="needs swtpm_setup"),
]

ENGINE_P256 = "sgxvtpm on libtpms in-process, rsa2048+ecc-p256"
ENGINE_P384 = "sgxvtpm on libtpms in-process, rsa2048+ecc-p384"
SOCKET_P256 = "sgxvtpm over a swtpm socket, rsa2048+ecc-p256"
SWTPM_SETUP = "swtpm_setup (localca), rsa2048+ecc-p384"
RecordProperty = Callable[[str, object], None]


def _engine_ms(platform: Path, runs: int, algs: str) -> list[float]:
    out = subprocess.run(
        helper_command("ek_bench_child", str(platform), str(runs), algs),
        capture_output=True, check=True, timeout=120, env=helper_env(),
    )  # fmt: skip
    data = json.loads(out.stdout)
    assert set(data["nv_certificates"]) == set(algs.split(","))
    return [float(x) for x in data["manufacture_ms"]]


def _swtpm_ms(tmp: Path, runs: int) -> list[float]:
    ca = manager_ca(tmp / "platform")
    times = []
    for i in range(runs):
        d = tmp / f"swtpm{i}"
        d.mkdir()
        with Swtpm(d) as tpm:
            t0 = time.perf_counter()
            made = manufacture(
                tpm.transact, ["rsa2048", "ecc-p256"], ca.sign_ek,
                platform_cert=ca.sign_platform, pcr_banks=["sha256"],
            )  # fmt: skip
            times.append((time.perf_counter() - t0) * 1000)
            assert read_ek_certificate(tpm.transact, "ecc-p256") == made.ek_certificates["ecc-p256"]
    return times


def _fmt(ms: list[float]) -> str:
    return f"median {statistics.median(ms):7.1f} ms (min {min(ms):.1f}, n={len(ms)})"


def _measure(tmp: Path, runs: int, record: RecordProperty) -> dict[str, list[float]]:
    swtpm_setup(tmp / "warmup", tmp)  # creates swtpm_localca's CA keys once
    platform = tmp / "platform"
    results = {
        ENGINE_P256: _engine_ms(platform, runs, "rsa2048,ecc-p256"),
        ENGINE_P384: _engine_ms(platform, runs, "rsa2048,ecc-p384"),
        SOCKET_P256: _swtpm_ms(tmp, runs),
        SWTPM_SETUP: [swtpm_setup(tmp / f"setup{i}", tmp) * 1000 for i in range(runs)],
    }
    lines = ["EK manufacturing per instance (EKs + EK/platform certificates + NV):"]
    for name, ms in results.items():
        lines.append(f"  {name:<50} {_fmt(ms)}")
        record(name, round(statistics.median(ms), 2))
    print("\n".join(lines))
    return results


def test_manufacturing_time(tmp_path: Path, record_property: RecordProperty) -> None:
    results = _measure(tmp_path, 3, record_property)
    engine = statistics.median(results[ENGINE_P384])
    setup = statistics.median(results[SWTPM_SETUP])
    # swtpm_setup starts a swtpm and a CA tool process per certificate; in-process it is
    # one engine call per command. The margin is wide (tens of times) so this is stable.
    assert 0 < engine < setup


@pytest.mark.slow
def test_manufacturing_time_long(tmp_path: Path, record_property: RecordProperty) -> None:
    results = _measure(tmp_path, 15, record_property)
    assert 0 < statistics.median(results[ENGINE_P384]) < statistics.median(results[SWTPM_SETUP])
