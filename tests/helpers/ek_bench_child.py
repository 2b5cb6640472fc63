"""Times EK manufacturing against a LibtpmsEngine in this process (run as a child).

libtpms holds one TPM per process, so the pytest process never loads it.
Usage: python -m tests.helpers.ek_bench_child PLATFORM_DIR RUNS ALGS(comma) -> one JSON line:
{"manufacture_ms": [...], "tpm_init_ms": [...], "nv_certificates": {...}}

Each run: a new engine on empty state (libtpms manufactures a TPM:
"tpm_init"), TPM2_Startup, then sgxvtpm.tpm.ek.manufacture (EKs, EK
certificates signed by a manager CA with a real sim quote, platform
certificate, NV write-lock, PCR_Allocate sha256): "manufacture".
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.helpers.ek_ca import manager_ca

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.ek import manufacture, read_ek_certificate
from sgxvtpm.tpm.engine import LibtpmsEngine, MemoryStateStore


def main() -> None:
    platform_dir, runs, algs = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    ca = manager_ca(platform_dir)
    init_ms, manu_ms = [], []
    certs: dict[str, str] = {}
    for _ in range(runs):
        engine = LibtpmsEngine(MemoryStateStore())
        t0 = time.perf_counter()
        engine.start()
        wire.check_success(engine.process(wire.startup()))
        t1 = time.perf_counter()
        made = manufacture(
            engine.process, algs, ca.sign_ek, platform_cert=ca.sign_platform, pcr_banks=["sha256"]
        )
        t2 = time.perf_counter()
        init_ms.append((t1 - t0) * 1000)
        manu_ms.append((t2 - t1) * 1000)
        certs = {
            alg: read_ek_certificate(engine.process, alg).hex() for alg in made.ek_certificates
        }
        assert all(bytes.fromhex(certs[a]) == made.ek_certificates[a] for a in certs)
        engine.stop()
    print(json.dumps({"tpm_init_ms": init_ms, "manufacture_ms": manu_ms, "nv_certificates": certs}))


if __name__ == "__main__":
    main()
