"""RegistryStore.open on the real sim platform's counters: a first start, a removed or
damaged registry, and the operator's explicit reset (the manager enclave's decision)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.helpers.sealedfiles import newest_record, sealed_version

from sgxvtpm.enclaves.registry import REGISTRY_OWNER, RegistryStore
from sgxvtpm.enclaves.sealing import SealError, SealKind
from sgxvtpm.platform.base import EnclavePlatform

OPERATOR = "-----BEGIN CERTIFICATE-----\noperator\n-----END CERTIFICATE-----\n"


def version(path: Path) -> int:
    return sealed_version(path)


def test_first_start_creates_then_opens(enclave_platform: EnclavePlatform, tmp_path: Path) -> None:
    path = tmp_path / "registry.sealed"
    registry, how = RegistryStore(enclave_platform, path).open(OPERATOR)
    assert how == "created" and registry.operator_cert_pem == OPERATOR
    again, how = RegistryStore(enclave_platform, path).open("another operator")
    assert how == "opened" and again.operator_cert_pem == OPERATOR


def test_a_removed_registry_is_refused_and_only_reset_replaces_it(
    enclave_platform: EnclavePlatform, tmp_path: Path
) -> None:
    path = tmp_path / "registry.sealed"
    store = RegistryStore(enclave_platform, path)
    registry, _ = store.open(OPERATOR)
    store.save(registry)
    old = version(path)
    path.unlink()
    with pytest.raises(SealError, match=r"is missing.*tampering.*--reset-manager"):
        RegistryStore(enclave_platform, path).open("the attacker's operator")
    assert not path.exists()
    fresh, how = RegistryStore(enclave_platform, path).open("new operator", reset=True)
    assert how == "reset" and fresh.instances == {} and fresh.ca_key_pem != registry.ca_key_pem
    assert version(path) > old  # above the counter: the old file can never come back
    with pytest.raises(SealError, match="intact"):
        RegistryStore(enclave_platform, path).open("new operator", reset=True)


def test_a_damaged_registry_is_refused_unless_reset(
    enclave_platform: EnclavePlatform, tmp_path: Path
) -> None:
    path = tmp_path / "registry.sealed"
    RegistryStore(enclave_platform, path).open(OPERATOR)
    data = bytearray(path.read_bytes())
    data[newest_record(path)[1] - 1] ^= 1  # the tag of the one version
    path.write_bytes(bytes(data))
    with pytest.raises(SealError, match="failed authentication"):
        RegistryStore(enclave_platform, path).open(OPERATOR)
    assert RegistryStore(enclave_platform, path).open(OPERATOR, reset=True)[1] == "reset"
    assert RegistryStore(enclave_platform, path).open(OPERATOR)[1] == "opened"


def test_a_creation_that_never_completed_is_a_first_start(
    enclave_platform: EnclavePlatform, tmp_path: Path
) -> None:
    """Killed between creating the counter and writing version 1: nothing was acknowledged."""
    enclave_platform.counter_create(f"{SealKind.MANAGER_REGISTRY.name.lower()}:{REGISTRY_OWNER}")
    path = tmp_path / "registry.sealed"
    assert RegistryStore(enclave_platform, path).open(OPERATOR)[1] == "created"
    assert version(path) == 1
