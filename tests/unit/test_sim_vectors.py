"""Known-answer tests for the sim platform (tests/vectors/sim_*.json).

Regenerate with scripts/make_sim_vectors.py. All ECDSA signatures are RFC 6979
deterministic, so the quote vector is byte-exact.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC

from sgxvtpm.platform import EnclaveIdentity, KeyName, KeyPolicy, KeyRequest, TargetInfo
from sgxvtpm.platform.sim import SimPlatformDir, SimQuoteVerifier, egetkey
from sgxvtpm.platform.sim.enclave import SimEnclavePlatform
from sgxvtpm.platform.sim.provision import PlatformKeys
from sgxvtpm.platform.sim.report import OFF_MRENCLAVE, OFF_MRSIGNER, OFF_REPORTDATA

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


def _identity(d: dict[str, Any]) -> EnclaveIdentity:
    return EnclaveIdentity(
        mrenclave=bytes.fromhex(d["mrenclave"]),
        mrsigner=bytes.fromhex(d["mrsigner"]),
        isv_prod_id=d["isv_prod_id"],
        isv_svn=d["isv_svn"],
        attributes=bytes.fromhex(d["attributes"]),
        misc_select=d["misc_select"],
    )


def _request(d: dict[str, Any]) -> KeyRequest:
    return KeyRequest(
        key_name=KeyName(d["key_name"]),
        key_policy=KeyPolicy(d["key_policy"]),
        isv_svn=d["isv_svn"],
        cpu_svn=bytes.fromhex(d["cpu_svn"]),
        key_id=bytes.fromhex(d["key_id"]),
        config_svn=d["config_svn"],
    )


def _cmac(key: bytes, data: bytes) -> bytes:
    c = CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


EGETKEY = _load("sim_egetkey.json")
REPORT = _load("sim_report.json")
QUOTE = _load("sim_quote.json")


def test_base_key() -> None:
    base = egetkey.derive_base_key(bytes.fromhex(EGETKEY["root_secret"]))
    assert base.hex() == EGETKEY["base_key"]


@pytest.mark.parametrize("case", EGETKEY["cases"], ids=lambda c: str(c["request"]["key_name"]))
def test_egetkey_vector(case: dict[str, Any]) -> None:
    base = bytes.fromhex(EGETKEY["base_key"])
    ident, req = _identity(case["identity"]), _request(case["request"])
    deps = egetkey.request_dependencies(ident, req, bytes(16))
    assert deps.hex() == case["dependencies"]
    assert len(deps) == egetkey.KEY_DEPENDENCIES_SIZE
    # The key is AES-CMAC over the dependency buffer, computed here independently.
    assert _cmac(base, deps).hex() == case["key"]
    assert egetkey.egetkey(base, ident, req, bytes(16)).hex() == case["key"]


def _platform(ident: EnclaveIdentity, tmp_path: Path) -> SimEnclavePlatform:
    pdir = SimPlatformDir.open_or_create(
        tmp_path / "p", root_secret=bytes.fromhex(REPORT["root_secret"])
    )
    enclave = pdir.enclave_platform(ident)
    enclave._report_key_id = bytes.fromhex(REPORT["report_key_id"])  # CR_REPORT_KEYID, fixed
    return enclave


@pytest.mark.parametrize("case", REPORT["cases"])
def test_report_vector(case: dict[str, Any], tmp_path: Path) -> None:
    source, target = _identity(case["identity"]), _identity(case["target"])
    report = _platform(source, tmp_path).report(
        TargetInfo(target.mrenclave, target.attributes, target.misc_select),
        bytes.fromhex(case["report_data"]),
    )
    assert report.hex() == case["report"]
    assert report[OFF_MRENCLAVE : OFF_MRENCLAVE + 32] == source.mrenclave
    assert report[OFF_MRSIGNER : OFF_MRSIGNER + 32] == source.mrsigner
    assert report[OFF_REPORTDATA:384].hex() == case["report_data"]
    assert report[384:416].hex() == REPORT["report_key_id"]
    # MAC = AES-CMAC(target's REPORT key, body); the target derives that key by EGETKEY.
    own_key = _platform(target, tmp_path).get_key(
        KeyRequest(KeyName.REPORT, key_id=report[384:416])
    )
    assert _cmac(own_key, report[:384]) == report[416:]


def test_quote_vector(tmp_path: Path) -> None:
    keys = PlatformKeys.from_scalars({n: int(v, 16) for n, v in QUOTE["scalars"].items()})
    now = datetime.datetime.fromisoformat(QUOTE["now"])
    pdir = SimPlatformDir.open_or_create(
        tmp_path / "p",
        root_secret=bytes.fromhex(QUOTE["root_secret"]),
        keys=keys,
        platform_id=bytes.fromhex(QUOTE["platform_id"]),
        now=now,
    )
    assert pdir.root_certificate_pem.decode() == QUOTE["root_pem"]
    ident = _identity(QUOTE["identity"])
    quote = pdir.enclave_platform(ident).quote(bytes.fromhex(QUOTE["report_data"]))
    assert quote.hex() == QUOTE["quote"]
    verifier = SimQuoteVerifier(
        QUOTE["root_pem"].encode(), clock=lambda: now + datetime.timedelta(days=1)
    )
    verified = verifier.verify(bytes.fromhex(QUOTE["quote"]))
    assert verified.identity == ident
    assert verified.report_data.hex() == QUOTE["report_data"]
    assert verified.platform_id.hex() == QUOTE["platform_id"]
    assert isinstance(keys.attestation, ec.EllipticCurvePrivateKey)
