"""What the two kinds of enclave are made of, and the identity a verifier expects.

An enclave's measured code is every module of this package that can run in
an enclave (everything but the untrusted host, VMM and endpoint code), and,
for an instance, libtpms' shared object. A verifier computes the expected
MRENCLAVE from the code it has installed (DESIGN.md S3): no host-side file
decides what is trusted.
"""

from __future__ import annotations

import ctypes.util
import functools
import json
from pathlib import Path

from sgxvtpm.platform.base import EnclaveSpec, MeasurementPolicy

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
UNTRUSTED = ("host", "vmm", "endpoint", "cli.py", "__main__.py")

MANAGER_PROD_ID = 1
INSTANCE_PROD_ID = 2
ISV_SVN = 1

MANAGER_ENTRY = "sgxvtpm.enclaves.manager:main"
INSTANCE_ENTRY = "sgxvtpm.enclaves.instance:main"


@functools.cache
def enclave_modules() -> tuple[Path, ...]:
    files = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        rel = path.relative_to(PACKAGE_ROOT)
        if rel.parts[0] in UNTRUSTED or "__pycache__" in rel.parts:
            continue
        files.append(path)
    return tuple(files)


@functools.cache
def libtpms_path() -> Path:
    name = ctypes.util.find_library("tpms") or "libtpms.so.0"
    for directory in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                      "/usr/lib", "/usr/local/lib"):
        candidate = Path(directory) / name
        if candidate.exists():
            return candidate.resolve()
    raise FileNotFoundError("libtpms.so.0 not found: install Debian's libtpms0")


def _config(name: str, prod_id: int) -> bytes:
    return json.dumps(
        {"enclave": name, "isv_prod_id": prod_id, "isv_svn": ISV_SVN, "threads": 1},
        sort_keys=True,
    ).encode()


def manager_spec(signer_public_key: bytes) -> EnclaveSpec:
    return EnclaveSpec(
        name="manager",
        entry=MANAGER_ENTRY,
        code_files=enclave_modules(),
        config=_config("manager", MANAGER_PROD_ID),
        signer_public_key=signer_public_key,
        isv_prod_id=MANAGER_PROD_ID,
        isv_svn=ISV_SVN,
    )


def instance_spec(signer_public_key: bytes) -> EnclaveSpec:
    return EnclaveSpec(
        name="instance",
        entry=INSTANCE_ENTRY,
        code_files=(*enclave_modules(), libtpms_path()),
        config=_config("instance", INSTANCE_PROD_ID),
        signer_public_key=signer_public_key,
        isv_prod_id=INSTANCE_PROD_ID,
        isv_svn=ISV_SVN,
    )


def expected_policy(kind: str) -> MeasurementPolicy:
    """The default policy: the exact MRENCLAVE of the code installed here."""
    from sgxvtpm.platform.sim.measure import measure_mrenclave

    spec = manager_spec(b"") if kind == "manager" else instance_spec(b"")
    return MeasurementPolicy(mrenclaves=frozenset({measure_mrenclave(spec)}))


def peer_policy(signer_mrsigner: bytes, kind: str) -> MeasurementPolicy:
    """Enclave-to-enclave policy: same signer, the right product, current SVN or later."""
    prod = MANAGER_PROD_ID if kind == "manager" else INSTANCE_PROD_ID
    return MeasurementPolicy(mrsigner=signer_mrsigner, isv_prod_id=prod, min_isv_svn=ISV_SVN)
