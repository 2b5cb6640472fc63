"""Monotonic counters: values, ownership by MRSIGNER, damage detection."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sgxvtpm.platform import EnclaveIdentity, PlatformError
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.util.durable import slot_layout

SIGNER_1 = b"\x11" * 32
A = EnclaveIdentity(b"\x0a" * 32, SIGNER_1, 1, 1)
A2 = EnclaveIdentity(b"\x0b" * 32, SIGNER_1, 2, 5)  # same signer, other code/product
B = EnclaveIdentity(b"\x0a" * 32, b"\x22" * 32, 1, 1)  # other signer


def _counter_file(pdir: SimPlatformDir) -> Path:
    (path,) = (pdir.path / "counters").glob("*.ctr")
    return path


def test_create_increment_read(fresh_sim_platform: SimPlatformDir) -> None:
    enclave = fresh_sim_platform.enclave_platform(A)
    assert enclave.counter_create("state") == 0
    assert [enclave.counter_increment("state") for _ in range(3)] == [1, 2, 3]
    assert enclave.counter_read("state") == 3
    assert enclave.counter_create("state") == 3  # create opens an existing counter
    assert (
        SimPlatformDir.open_or_create(fresh_sim_platform.path)
        .enclave_platform(A)
        .counter_read("state")
        == 3
    )


def test_missing_counter(fresh_sim_platform: SimPlatformDir) -> None:
    with pytest.raises(PlatformError, match="does not exist"):
        fresh_sim_platform.enclave_platform(A).counter_read("nope")
    with pytest.raises(PlatformError, match="does not exist"):
        fresh_sim_platform.enclave_platform(A).counter_increment("nope")


def test_counters_belong_to_the_mrsigner(fresh_sim_platform: SimPlatformDir) -> None:
    fresh_sim_platform.enclave_platform(A).counter_create("c")
    fresh_sim_platform.enclave_platform(A).counter_increment("c")
    assert fresh_sim_platform.enclave_platform(A2).counter_read("c") == 1
    with pytest.raises(PlatformError):
        fresh_sim_platform.enclave_platform(B).counter_read("c")
    assert _counter_file(fresh_sim_platform).name.startswith(SIGNER_1.hex())


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_counter_is_refused(fresh_sim_platform: SimPlatformDir, damage: str) -> None:
    enclave = fresh_sim_platform.enclave_platform(A)
    enclave.counter_create("c")
    enclave.counter_increment("c")
    path = _counter_file(fresh_sim_platform)
    raw = bytearray(path.read_bytes())
    layout = slot_layout(bytes(raw))
    assert layout is not None  # two slots: 0 and then 1
    if damage == "flip":
        for start in layout:
            raw[start + 72] ^= 1  # the value field of each slot's record
    elif damage == "truncate":
        raw = raw[: layout[0] + 111]  # the first record short of a byte, the second gone
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(PlatformError, match="damaged"):
        enclave.counter_read("c")
    with pytest.raises(PlatformError, match="damaged"):
        enclave.counter_increment("c")


def test_counter_file_from_another_platform_is_refused(tmp_path: Path) -> None:
    one = SimPlatformDir.open_or_create(tmp_path / "one")
    two = SimPlatformDir.open_or_create(tmp_path / "two")
    one.enclave_platform(A).counter_create("c")
    two.enclave_platform(A).counter_create("c")
    _counter_file(two).write_bytes(_counter_file(one).read_bytes())
    with pytest.raises(PlatformError, match="damaged"):
        two.enclave_platform(A).counter_read("c")


def test_concurrent_increments_lose_nothing(fresh_sim_platform: SimPlatformDir) -> None:
    enclave = fresh_sim_platform.enclave_platform(A)
    enclave.counter_create("c")
    seen: list[int] = []

    def work() -> None:
        for _ in range(25):
            seen.append(enclave.counter_increment("c"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == list(range(1, 101))
    assert enclave.counter_read("c") == 100


@pytest.mark.parametrize("name", ["", "x" * 256])
def test_bad_names(fresh_sim_platform: SimPlatformDir, name: str) -> None:
    with pytest.raises(PlatformError):
        fresh_sim_platform.enclave_platform(A).counter_create(name)
