"""EGETKEY: policy, SVN rules, and what a key is (and is not) bound to."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgxvtpm.platform import (
    EnclaveIdentity,
    EnclaveSpec,
    KeyName,
    KeyPolicy,
    KeyRequest,
    PlatformError,
)
from sgxvtpm.platform.sim import SimPlatformDir, identity_of_spec
from sgxvtpm.platform.sim.measure import SGX_FLAGS_INITTED, SGX_FLAGS_PROVISIONKEY

SEAL_MRENCLAVE = KeyRequest(KeyName.SEAL, KeyPolicy.MRENCLAVE, isv_svn=2)
SEAL_MRSIGNER = KeyRequest(KeyName.SEAL, KeyPolicy.MRSIGNER, isv_svn=2)


def _spec(code: Path, pdir: SimPlatformDir) -> EnclaveSpec:
    return EnclaveSpec("e", "enclave_code:main", [code], b"cfg", 9, 2)


def _code_pair(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    one, two = tmp_path / "v1" / "enclave_code.py", tmp_path / "v2" / "enclave_code.py"
    one.write_bytes(b"def main(p, s, a):\n    return 1\n")
    two.write_bytes(b"def main(p, s, a):\n    return 2\n")  # one byte differs
    return one, two


def test_mrenclave_key_changes_with_one_code_byte(
    sim_platform: SimPlatformDir, tmp_path: Path
) -> None:
    one, two = _code_pair(tmp_path)
    id1, id2 = (
        identity_of_spec(_spec(one, sim_platform), sim_platform.signer_public_key),
        identity_of_spec(_spec(two, sim_platform), sim_platform.signer_public_key),
    )
    assert id1.mrenclave != id2.mrenclave
    k1 = sim_platform.enclave_platform(id1).get_key(SEAL_MRENCLAVE)
    k2 = sim_platform.enclave_platform(id2).get_key(SEAL_MRENCLAVE)
    assert len(k1) == 16
    assert k1 != k2


def test_mrsigner_key_survives_a_code_change(sim_platform: SimPlatformDir, tmp_path: Path) -> None:
    one, two = _code_pair(tmp_path)
    id1, id2 = (
        identity_of_spec(_spec(one, sim_platform), sim_platform.signer_public_key),
        identity_of_spec(_spec(two, sim_platform), sim_platform.signer_public_key),
    )
    k1 = sim_platform.enclave_platform(id1).get_key(SEAL_MRSIGNER)
    assert k1 == sim_platform.enclave_platform(id2).get_key(SEAL_MRSIGNER)
    assert k1 != sim_platform.enclave_platform(id1).get_key(SEAL_MRENCLAVE)


def test_higher_svn_request_is_refused(sim_platform: SimPlatformDir) -> None:
    enclave = sim_platform.enclave_platform(EnclaveIdentity(b"\x01" * 32, b"\x02" * 32, 1, 2))
    with pytest.raises(PlatformError, match="ISVSVN 3"):
        enclave.get_key(KeyRequest(KeyName.SEAL, KeyPolicy.MRSIGNER, isv_svn=3))
    older = enclave.get_key(KeyRequest(KeyName.SEAL, KeyPolicy.MRSIGNER, isv_svn=1))
    assert older != enclave.get_key(SEAL_MRSIGNER)


def test_upgraded_enclave_gets_old_key(sim_platform: SimPlatformDir) -> None:
    v2 = sim_platform.enclave_platform(EnclaveIdentity(b"\x01" * 32, b"\x02" * 32, 1, 2))
    v3 = sim_platform.enclave_platform(EnclaveIdentity(b"\x03" * 32, b"\x02" * 32, 1, 3))
    assert v3.get_key(SEAL_MRSIGNER) == v2.get_key(SEAL_MRSIGNER)


@pytest.mark.parametrize(
    "request_",
    [
        KeyRequest(KeyName.SEAL, cpu_svn=b"\x01" + bytes(15)),
        KeyRequest(KeyName.SEAL, config_svn=1),
        KeyRequest(KeyName.PROVISION),
        KeyRequest(KeyName.PROVISION_SEAL),
        KeyRequest(KeyName.EINITTOKEN),
        KeyRequest(KeyName.SEAL, key_id=b"short"),
    ],
)
def test_invalid_requests_are_refused(sim_platform: SimPlatformDir, request_: KeyRequest) -> None:
    enclave = sim_platform.enclave_platform(EnclaveIdentity(b"\x01" * 32, b"\x02" * 32, 1, 2))
    with pytest.raises(PlatformError):
        enclave.get_key(request_)


def test_provision_key_needs_the_attribute(sim_platform: SimPlatformDir) -> None:
    attrs = (SGX_FLAGS_INITTED | SGX_FLAGS_PROVISIONKEY).to_bytes(8, "little") + bytes(8)
    enclave = sim_platform.enclave_platform(
        EnclaveIdentity(b"\x01" * 32, b"\x02" * 32, 1, 2, attrs)
    )
    assert len(enclave.get_key(KeyRequest(KeyName.PROVISION))) == 16


def test_key_id_and_product_separate_keys(sim_platform: SimPlatformDir) -> None:
    enclave = sim_platform.enclave_platform(EnclaveIdentity(b"\x01" * 32, b"\x02" * 32, 1, 2))
    other_product = sim_platform.enclave_platform(EnclaveIdentity(b"\x01" * 32, b"\x02" * 32, 2, 2))
    base = enclave.get_key(SEAL_MRSIGNER)
    assert base != enclave.get_key(
        KeyRequest(KeyName.SEAL, KeyPolicy.MRSIGNER, isv_svn=2, key_id=b"\x01" * 32)
    )
    assert base != other_product.get_key(SEAL_MRSIGNER)


def test_other_platform_other_keys(
    sim_platform: SimPlatformDir, other_sim_platform: SimPlatformDir
) -> None:
    ident = EnclaveIdentity(b"\x01" * 32, b"\x02" * 32, 1, 2)
    assert sim_platform.enclave_platform(ident).get_key(
        SEAL_MRSIGNER
    ) != other_sim_platform.enclave_platform(ident).get_key(SEAL_MRSIGNER)


def test_keys_are_stable_across_reopen(sim_platform: SimPlatformDir) -> None:
    ident = EnclaveIdentity(b"\x01" * 32, b"\x02" * 32, 1, 2)
    again = SimPlatformDir.open_or_create(sim_platform.path)
    assert again.enclave_platform(ident).get_key(SEAL_MRENCLAVE) == sim_platform.enclave_platform(
        ident
    ).get_key(SEAL_MRENCLAVE)
