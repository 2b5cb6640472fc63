"""Sealed state at rest (SECURITY.md properties 12 and 15), on the real sim platform's
keys and counters."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgxvtpm.enclaves.sealing import Sealer, SealError, SealKind, check_fresh, parse_header
from sgxvtpm.enclaves.state import Bundle, SealedFile, SealedStateStore
from sgxvtpm.platform.base import EnclaveIdentity
from sgxvtpm.platform.sim.enclave import SimEnclavePlatform
from sgxvtpm.platform.sim.platform_dir import SimPlatformDir

SIGNER = bytes(range(32))


def enclave(
    pd: SimPlatformDir, mrenclave: bytes = b"\x01" * 32, svn: int = 1
) -> SimEnclavePlatform:
    return pd.enclave_platform(EnclaveIdentity(mrenclave, SIGNER, 2, svn))


def test_seal_round_trip(sim_platform: SimPlatformDir) -> None:
    sealer = Sealer(enclave(sim_platform), SealKind.INSTANCE_STATE, "a" * 32)
    blob = sealer.seal(b"tpm state", 7, "vm1")
    header, plain = sealer.unseal(blob)
    assert plain == b"tpm state"
    assert (header.version, header.owner_id, header.vm_id) == (7, "a" * 32, "vm1")
    assert b"tpm state" not in blob


def test_every_flipped_bit_is_refused(sim_platform: SimPlatformDir) -> None:
    sealer = Sealer(enclave(sim_platform), SealKind.INSTANCE_STATE, "a" * 32)
    blob = sealer.seal(b"x" * 40, 3, "vm1")
    for bit in range(len(blob) * 8):
        damaged = bytearray(blob)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(SealError):
            sealer.unseal(bytes(damaged))


def test_other_instance_cannot_open(sim_platform: SimPlatformDir) -> None:
    platform = enclave(sim_platform)
    blob = Sealer(platform, SealKind.INSTANCE_STATE, "b" * 32).seal(b"s", 1, "vm2")
    with pytest.raises(SealError, match="another instance"):
        Sealer(platform, SealKind.INSTANCE_STATE, "a" * 32).unseal(blob)


def test_other_kind_cannot_open(sim_platform: SimPlatformDir) -> None:
    platform = enclave(sim_platform)
    blob = Sealer(platform, SealKind.MANAGER_REGISTRY, "a" * 32).seal(b"s", 1, "")
    with pytest.raises(SealError, match="another kind"):
        Sealer(platform, SealKind.INSTANCE_STATE, "a" * 32).unseal(blob)


def test_new_code_same_signer_still_opens(sim_platform: SimPlatformDir) -> None:
    # MRSIGNER policy: an upgraded enclave (other MRENCLAVE) keeps its state.
    blob = Sealer(enclave(sim_platform, b"\x01" * 32), SealKind.INSTANCE_STATE, "i").seal(
        b"s", 1, ""
    )
    _, plain = Sealer(enclave(sim_platform, b"\x02" * 32), SealKind.INSTANCE_STATE, "i").unseal(
        blob
    )
    assert plain == b"s"


def test_other_platform_cannot_open(
    sim_platform: SimPlatformDir, other_sim_platform: SimPlatformDir
) -> None:
    blob = Sealer(enclave(sim_platform), SealKind.INSTANCE_STATE, "i").seal(b"s", 1, "")
    with pytest.raises(SealError, match="authentication"):
        Sealer(enclave(other_sim_platform), SealKind.INSTANCE_STATE, "i").unseal(blob)


def test_freshness_rule() -> None:
    assert check_fresh(5, 5) is False
    assert check_fresh(6, 5) is True  # crash between blob write and counter increment
    with pytest.raises(SealError, match="rollback"):
        check_fresh(4, 5)
    with pytest.raises(SealError, match="future"):
        check_fresh(7, 5)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_header_parser_never_crashes(data: bytes) -> None:
    try:
        _header, offset = parse_header(data)
    except SealError:
        return
    assert 0 < offset <= len(data)


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_bundle_decoder_never_crashes(data: bytes) -> None:
    try:
        bundle = Bundle.decode(data)
    except SealError:
        return
    assert isinstance(bundle.provisioning, dict)


def test_state_store_rollback_is_refused(sim_platform: SimPlatformDir, tmp_path: Path) -> None:
    platform = enclave(sim_platform)
    path = tmp_path / "state.sealed"
    store = SealedStateStore(platform, "c" * 32, path)
    store.create({"instance_id": "c" * 32, "vm_id": "vm1"})
    store.store_blob("permall", b"v1")
    old = path.read_bytes()
    store.store_blob("permall", b"v2")
    reopened = SealedStateStore(platform, "c" * 32, path)
    assert reopened.load().blobs["permall"] == b"v2"
    path.write_bytes(old)
    with pytest.raises(SealError, match="rollback"):
        SealedStateStore(platform, "c" * 32, path).load()


def test_crash_between_write_and_counter_is_accepted(
    sim_platform: SimPlatformDir, tmp_path: Path
) -> None:
    platform = enclave(sim_platform)
    path = tmp_path / "reg.sealed"
    sealed = SealedFile(platform, SealKind.MANAGER_REGISTRY, "d" * 32, path)
    sealed.create(b"one")
    # Simulate the crash: the blob of version + 1 is durable, the counter not yet.
    blob = Sealer(platform, SealKind.MANAGER_REGISTRY, "d" * 32).seal(
        b"two", sealed.version + 1, ""
    )
    path.write_bytes(blob)
    again = SealedFile(platform, SealKind.MANAGER_REGISTRY, "d" * 32, path)
    assert again.load() == b"two"
    # ... and the counter caught up, so the version before it is now a rollback.
    assert platform.counter_read(f"manager_registry:{'d' * 32}") == again.version


def test_failed_write_is_not_acknowledged(sim_platform: SimPlatformDir, tmp_path: Path) -> None:
    platform = enclave(sim_platform)
    directory = tmp_path / "gone"
    directory.mkdir()
    store = SealedStateStore(platform, "e" * 32, directory / "state.sealed")
    store.create({"vm_id": "vm1"})
    store.store_blob("permall", b"kept")
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
    with pytest.raises(OSError):
        store.store_blob("permall", b"lost")
    assert store.load_blob("permall") == b"kept"
