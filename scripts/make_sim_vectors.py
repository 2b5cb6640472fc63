#!/usr/bin/env python3
"""Regenerate the sim platform's known-answer vectors (tests/vectors/sim_*.json).

    .venv/bin/python scripts/make_sim_vectors.py            # rewrite the files
    .venv/bin/python scripts/make_sim_vectors.py --check    # exit 1 if they differ

Inputs are fixed (a fixed fuse key, fixed private scalars, a fixed time), and
every output is deterministic: EGETKEY and REPORT MACs are AES-CMAC, and all
ECDSA signatures (certificates, QE certification, quotes) use RFC 6979
deterministic nonces. So the quote vector is a byte-exact known answer, not
only a verify-only sample. Regenerate only when a layout change is intended,
and say so in the commit: the vectors pin the formats.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from sgxvtpm.platform.base import (
    EnclaveIdentity,
    KeyName,
    KeyPolicy,
    KeyRequest,
    ReportBody,
    TargetInfo,
)
from sgxvtpm.platform.sim import egetkey, provision
from sgxvtpm.platform.sim.counters import CounterStore
from sgxvtpm.platform.sim.enclave import SimEnclavePlatform
from sgxvtpm.platform.sim.measure import ENCLAVE_ATTRIBUTES
from sgxvtpm.platform.sim.quote import QuotingEnclave
from sgxvtpm.platform.sim.report import pack_report_body

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors"
ROOT_SECRET = hashlib.sha256(b"sgxvtpm-sim test vector fuse key").digest()
REPORT_KEY_ID = hashlib.sha256(b"sgxvtpm-sim test vector CR_REPORT_KEYID").digest()
PLATFORM_ID = hashlib.sha256(b"sgxvtpm-sim test vector platform id").digest()[:16]
NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def scalar(name: str) -> int:
    digest = hashlib.sha256(b"sgxvtpm-sim test vector key " + name.encode()).digest()
    return int.from_bytes(digest, "big") % (_P256_ORDER - 1) + 1


def identity_json(ident: EnclaveIdentity) -> dict[str, Any]:
    return {
        "mrenclave": ident.mrenclave.hex(),
        "mrsigner": ident.mrsigner.hex(),
        "isv_prod_id": ident.isv_prod_id,
        "isv_svn": ident.isv_svn,
        "attributes": ident.attributes.hex(),
        "misc_select": ident.misc_select,
    }


def identity_from_json(d: dict[str, Any]) -> EnclaveIdentity:
    return EnclaveIdentity(
        mrenclave=bytes.fromhex(d["mrenclave"]),
        mrsigner=bytes.fromhex(d["mrsigner"]),
        isv_prod_id=d["isv_prod_id"],
        isv_svn=d["isv_svn"],
        attributes=bytes.fromhex(d["attributes"]),
        misc_select=d["misc_select"],
    )


IDENTITIES = [
    EnclaveIdentity(
        mrenclave=hashlib.sha256(b"enclave A").digest(),
        mrsigner=hashlib.sha256(b"signer 1").digest(),
        isv_prod_id=1,
        isv_svn=3,
        attributes=ENCLAVE_ATTRIBUTES,
    ),
    EnclaveIdentity(
        mrenclave=hashlib.sha256(b"enclave B").digest(),
        mrsigner=hashlib.sha256(b"signer 1").digest(),
        isv_prod_id=1,
        isv_svn=3,
        attributes=ENCLAVE_ATTRIBUTES,
        misc_select=0,
    ),
]
REQUESTS = [
    KeyRequest(KeyName.SEAL, KeyPolicy.MRENCLAVE, isv_svn=3),
    KeyRequest(KeyName.SEAL, KeyPolicy.MRSIGNER, isv_svn=3),
    KeyRequest(KeyName.SEAL, KeyPolicy.MRSIGNER, isv_svn=1, key_id=bytes(range(32))),
    KeyRequest(KeyName.SEAL, KeyPolicy.MRENCLAVE | KeyPolicy.MRSIGNER, isv_svn=0),
    KeyRequest(KeyName.REPORT, key_id=bytes(range(32, 64))),
]


def request_json(r: KeyRequest) -> dict[str, Any]:
    return {
        "key_name": int(r.key_name),
        "key_policy": int(r.key_policy),
        "isv_svn": r.isv_svn,
        "cpu_svn": r.cpu_svn.hex(),
        "key_id": r.key_id.hex(),
        "config_svn": r.config_svn,
    }


def request_from_json(d: dict[str, Any]) -> KeyRequest:
    return KeyRequest(
        key_name=KeyName(d["key_name"]),
        key_policy=KeyPolicy(d["key_policy"]),
        isv_svn=d["isv_svn"],
        cpu_svn=bytes.fromhex(d["cpu_svn"]),
        key_id=bytes.fromhex(d["key_id"]),
        config_svn=d["config_svn"],
    )


def egetkey_vectors() -> dict[str, Any]:
    base = egetkey.derive_base_key(ROOT_SECRET)
    cases = []
    for ident in IDENTITIES:
        for req in REQUESTS:
            deps = egetkey.request_dependencies(ident, req, bytes(16))
            cases.append(
                {
                    "identity": identity_json(ident),
                    "request": request_json(req),
                    "dependencies": deps.hex(),
                    "key": egetkey.egetkey(base, ident, req, bytes(16)).hex(),
                }
            )
    return {"root_secret": ROOT_SECRET.hex(), "base_key": base.hex(), "cases": cases}


def vector_keys() -> provision.PlatformKeys:
    return provision.PlatformKeys.from_scalars({n: scalar(n) for n in provision.PlatformKeys.NAMES})


def vector_qe(keys: provision.PlatformKeys) -> QuotingEnclave:
    return QuotingEnclave(
        base_key=egetkey.derive_base_key(ROOT_SECRET),
        attestation_key=keys.attestation,
        certification=provision.certify(keys, PLATFORM_ID, NOW),
        platform_id=PLATFORM_ID,
    )


def vector_enclave(ident: EnclaveIdentity) -> SimEnclavePlatform:
    return SimEnclavePlatform(
        ident,
        base_key=egetkey.derive_base_key(ROOT_SECRET),
        quoting_enclave=vector_qe(vector_keys()),
        counters=CounterStore(Path("/nonexistent"), b"\x00" * 32),
        report_key_id=REPORT_KEY_ID,
    )


def report_vectors() -> dict[str, Any]:
    a, b = IDENTITIES
    cases = []
    for source, target in ((a, a), (a, b), (b, a)):
        report_data = hashlib.sha512(source.mrenclave + target.mrenclave).digest()
        report = vector_enclave(source).report(
            TargetInfo(target.mrenclave, target.attributes, target.misc_select), report_data
        )
        cases.append(
            {
                "identity": identity_json(source),
                "target": identity_json(target),
                "report_data": report_data.hex(),
                "report": report.hex(),
            }
        )
    return {
        "root_secret": ROOT_SECRET.hex(),
        "report_key_id": REPORT_KEY_ID.hex(),
        "cases": cases,
    }


def quote_vectors() -> dict[str, Any]:
    keys = vector_keys()
    qe = vector_qe(keys)
    ident = IDENTITIES[0]
    report_data = hashlib.sha512(b"quote vector").digest()
    body = pack_report_body(ReportBody(identity=ident, report_data=report_data))
    return {
        "root_secret": ROOT_SECRET.hex(),
        "scalars": {n: f"{scalar(n):064x}" for n in provision.PlatformKeys.NAMES},
        "platform_id": PLATFORM_ID.hex(),
        "now": NOW.isoformat(),
        "identity": identity_json(ident),
        "report_data": report_data.hex(),
        "root_pem": qe.certification.root_pem.decode(),
        "pck_pem": qe.certification.pck_pem.decode(),
        "quote": qe.sign_body(body).hex(),
    }


def all_vectors() -> dict[str, dict[str, Any]]:
    return {
        "sim_egetkey.json": egetkey_vectors(),
        "sim_report.json": report_vectors(),
        "sim_quote.json": quote_vectors(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    opts = parser.parse_args()
    status = 0
    for name, data in all_vectors().items():
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
        path = VECTORS / name
        if opts.check:
            if not path.exists() or path.read_text() != text:
                print(f"{path} differs from the generator", file=sys.stderr)
                status = 1
        else:
            path.write_text(text)
            print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
