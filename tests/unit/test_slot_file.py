"""util.durable.SlotFile: a record rewritten in place, in the slot that does not hold it.

What a crash can leave is simulated by writing the bytes it would: a slot torn
half-way, a file cut short. The sealed and counted files built on it
(enclaves/state.py SealedFile, platform/sim/counters.py) are checked here too:
a torn newest version falls back to the one before, which their counter then
accepts or refuses.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers.sealedfiles import newest_record

from sgxvtpm.enclaves.sealing import SealError, SealKind
from sgxvtpm.enclaves.state import SealedFile
from sgxvtpm.platform.base import EnclavePlatform
from sgxvtpm.platform.sim.counters import CounterStore
from sgxvtpm.util.durable import SLOT_HEADER, SlotFile, read_slots, slot_capacity, slot_layout


def reopen(path: Path) -> tuple[SlotFile, list[bytes]]:
    slots = SlotFile(path)
    return slots, slots.read()


def tear(path: Path, slot: int, keep: int) -> None:
    """What a crash mid-write leaves: slot ``slot`` holds only ``keep`` bytes of a new record."""
    data = bytearray(path.read_bytes())
    layout = slot_layout(bytes(data))
    assert layout is not None
    start = layout[slot]
    data[start + keep : start + keep + 64] = os.urandom(64)
    path.write_bytes(bytes(data))


def test_writes_alternate_in_place_and_leave_the_current_slot_alone(tmp_path: Path) -> None:
    path = tmp_path / "record"
    slots = SlotFile(path)
    slots.create(b"v1")
    inode = path.stat().st_ino
    for version in range(2, 6):
        before = read_slots(path.read_bytes())
        slots.write(f"v{version}".encode())
        after = read_slots(path.read_bytes())
        current = (version - 1) % 2  # v1 in slot 0, v2 in slot 1, ...
        assert after[current] == f"v{version}".encode()
        assert after[1 - current] == before[1 - current]  # the record before, untouched
    assert path.stat().st_ino == inode  # no rename: written in place
    assert SlotFile(path).read() == [b"v5", b"v4"]


def test_a_reader_continues_from_the_slot_it_chose(tmp_path: Path) -> None:
    path = tmp_path / "record"
    writer = SlotFile(path)
    writer.create(b"old")
    writer.write(b"new")  # slot 1
    slots, records = reopen(path)
    assert records == [b"old", b"new"]
    slots.use(1)
    slots.write(b"newer")  # over "old", never over the current "new"
    assert SlotFile(path).read() == [b"newer", b"new"]


def test_a_torn_write_leaves_the_record_before_whole(tmp_path: Path) -> None:
    path = tmp_path / "record"
    slots = SlotFile(path)
    slots.create(b"A" * 300)
    slots.write(b"B" * 300)
    tear(path, 1, 100)
    records = SlotFile(path).read()
    assert records[0] == b"A" * 300
    assert records[1] != b"B" * 300  # the reader's own check (a MAC, a seal) refuses it


def test_a_record_that_outgrows_its_slot_rewrites_the_file(tmp_path: Path) -> None:
    path = tmp_path / "record"
    slots = SlotFile(path)
    slots.create(b"x" * 100)
    big = os.urandom(slot_capacity(100) * 3)
    slots.write(big)
    assert SlotFile(path).read()[0] == big
    slots.write(b"small again")
    assert SlotFile(path).read() == [big, b"small again"]


def test_a_file_of_one_record_is_read_whole_and_converted_on_the_next_write(
    tmp_path: Path,
) -> None:
    """Files written whole (before slot files) keep working, and become slot files."""
    path = tmp_path / "record"
    path.write_bytes(b"written whole by atomic_write")
    slots, records = reopen(path)
    assert records == [b"written whole by atomic_write"]
    slots.write(b"next")
    assert slot_layout(path.read_bytes()) is not None
    assert SlotFile(path).read()[0] == b"next"


@pytest.mark.parametrize("size", [0, 5, SLOT_HEADER, SLOT_HEADER + 10])
def test_a_truncated_slot_file_holds_empty_slots(tmp_path: Path, size: int) -> None:
    path = tmp_path / "record"
    SlotFile(path).create(b"r" * 200)
    path.write_bytes(path.read_bytes()[:size])
    assert all(len(record) < 200 for record in SlotFile(path).read())


def test_a_symlink_at_the_path_is_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "record"
    slots = SlotFile(path)
    slots.create(b"one")
    path.unlink()
    path.symlink_to(victim)
    with pytest.raises(OSError):
        SlotFile(path).read()
    slots.write(b"two")  # replaces the link by a file, as atomic_write does
    assert victim.read_bytes() == b"precious"
    assert not path.is_symlink() and SlotFile(path).read()[0] == b"two"


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_file_removed_or_replaced_behind_its_back_is_written_anew(
    tmp_path: Path, how: str
) -> None:
    """Writes into the old inode would be lost with it: the record goes to the path."""
    path = tmp_path / "record"
    slots = SlotFile(path)
    slots.create(b"one")
    slots.write(b"two")  # the file is open for writing from here on
    if how == "removed":
        path.unlink()
    else:
        SlotFile(path).create(b"someone else's")
    slots.write(b"three")
    assert SlotFile(path).read()[0] == b"three"
    slots.write(b"four")
    assert SlotFile(path).read() == [b"three", b"four"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=12))
def test_each_write_keeps_the_record_before_it_unless_it_outgrew_the_slot(
    records: list[bytes],
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "record"
        slots = SlotFile(path)
        slots.create(records[0])
        for before, record in itertools.pairwise(records):
            capacity = os.path.getsize(path)
            slots.write(record)
            found = SlotFile(path).read()
            assert record in found
            if os.path.getsize(path) == capacity:  # written in place
                assert sorted(found) == sorted([before, record])


# -- the files built on it ------------------------------------------------------


def sealed(platform: EnclavePlatform, path: Path, owner: str, *versions: bytes) -> SealedFile:
    """A sealed file of ``owner`` at ``path``: created with the first of ``versions``
    and committed with each of the others (none: only opened)."""
    file = SealedFile(platform, SealKind.INSTANCE_STATE, owner, path)
    if versions:
        file.create(versions[0])
        for version in versions[1:]:
            file.commit(version)
    return file


def test_sealed_file_falls_back_from_a_torn_version_its_counter_never_saw(
    tmp_path: Path, enclave_platform: EnclavePlatform
) -> None:
    """A crash during the write of version 3 (into slot 0, over version 1): the counter
    is still at 2, and version 2 loads."""
    path = tmp_path / "state.sealed"
    sealed(enclave_platform, path, "i1", b"version 1", b"version 2")
    tear(path, 0, 40)
    again = sealed(enclave_platform, path, "i1")
    assert again.load() == b"version 2" and again.version == 2
    again.commit(b"version 3")  # into the torn slot, never over version 2
    assert sealed(enclave_platform, path, "i1").load() == b"version 3"


def test_sealed_file_refuses_a_damaged_newest_version_and_says_why(
    tmp_path: Path, enclave_platform: EnclavePlatform
) -> None:
    """Version 3 was acknowledged (the counter is at 3), then damaged: the version
    before it is a rollback, and the reason names both slots."""
    path = tmp_path / "state.sealed"
    sealed(enclave_platform, path, "i4", b"version 1", b"version 2", b"version 3")  # 3: slot 0
    tear(path, 0, 40)
    reason = r"rollback refused; the other slot: .*failed authentication"
    with pytest.raises(SealError, match=reason):
        sealed(enclave_platform, path, "i4").load()


def test_sealed_file_loads_the_newest_version_and_continues_from_it(
    tmp_path: Path, enclave_platform: EnclavePlatform
) -> None:
    path = tmp_path / "state.sealed"
    sealed(enclave_platform, path, "i2", b"one", b"two", b"three", b"four")
    again = sealed(enclave_platform, path, "i2")
    assert again.load() == b"four" and again.version == 4
    again.commit(b"five")
    final = sealed(enclave_platform, path, "i2")
    assert final.load() == b"five" and final.version == 5


def test_sealed_file_refuses_a_whole_older_copy(
    tmp_path: Path, enclave_platform: EnclavePlatform
) -> None:
    path = tmp_path / "state.sealed"
    file = sealed(enclave_platform, path, "i3", b"one", b"two")
    old = path.read_bytes()
    file.commit(b"three")
    file.commit(b"four")
    path.write_bytes(old)
    with pytest.raises(SealError, match="rollback refused"):
        sealed(enclave_platform, path, "i3").load()


def test_counter_torn_mid_increment_reads_the_value_before(tmp_path: Path) -> None:
    store = CounterStore(tmp_path / "counters", os.urandom(32))
    owner = os.urandom(32)
    assert store.create(owner, "c") == 0
    for expected in range(1, 6):
        assert store.increment(owner, "c") == expected
    (path,) = (tmp_path / "counters").glob("*.ctr")
    inode = path.stat().st_ino
    # 0, 2, 4 went into slot 0 and 1, 3, 5 into slot 1: an increment to 6 torn
    # mid-write (it goes over 4) leaves 5.
    tear(path, 0, 20)
    assert store.read(owner, "c") == 5
    assert path.stat().st_ino == inode
    tear(path, 1, 20)  # 5 damaged too: no slot checks
    with pytest.raises(Exception, match="damaged"):
        store.read(owner, "c")


def test_a_failed_whole_file_write_leaves_the_file_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk refuses the bigger file a record needs; smaller records still go in place."""
    from sgxvtpm.util import durable

    path = tmp_path / "record"
    slots = SlotFile(path)
    slots.create(b"small")

    def disk_full(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "atomic_write", disk_full)
    with pytest.raises(OSError, match="No space"):
        slots.write(os.urandom(slot_capacity(5) * 2))
    slots.write(b"fits")
    assert SlotFile(path).read() == [b"small", b"fits"]


def test_files_written_whole_before_slot_files_load_and_are_converted(
    tmp_path: Path, enclave_platform: EnclavePlatform
) -> None:
    """An upgraded host: a counter file and a sealed file as one record each."""
    store = CounterStore(tmp_path / "counters", os.urandom(32))
    owner = os.urandom(32)
    store.create(owner, "c")
    store.increment(owner, "c")
    (path,) = (tmp_path / "counters").glob("*.ctr")
    path.write_bytes(store._record(owner, "c", 7))  # the old format: the record alone
    assert store.read(owner, "c") == 7
    assert store.increment(owner, "c") == 8
    assert slot_layout(path.read_bytes()) is not None and store.read(owner, "c") == 8

    state = tmp_path / "state.sealed"
    sealed(enclave_platform, state, "i5", b"one", b"two")
    start, end = newest_record(state)
    state.write_bytes(state.read_bytes()[start:end])  # version 2, written whole
    again = sealed(enclave_platform, state, "i5")
    assert again.load() == b"two"
    again.commit(b"three")
    assert slot_layout(state.read_bytes()) is not None
    assert sealed(enclave_platform, state, "i5").load() == b"three"
