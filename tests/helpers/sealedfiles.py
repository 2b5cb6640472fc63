"""Where things are in the files that hold state at rest (util/durable.py slot files),
for tests that read a version or damage one record on purpose."""

from __future__ import annotations

from pathlib import Path

from sgxvtpm.enclaves.sealing import SealError, parse_header
from sgxvtpm.util.durable import read_slots, slot_layout


def sealed_version(path: Path) -> int:
    """The newest version in a sealed file's slots (headers only, not authenticated)."""
    versions = []
    for record in read_slots(path.read_bytes()):
        try:
            versions.append(parse_header(record)[0].version)
        except SealError:
            continue
    return max(versions)


def newest_record(path: Path) -> tuple[int, int]:
    """(start, end) in a sealed file of the slot record with the highest version."""
    data = path.read_bytes()
    layout = slot_layout(data)
    assert layout is not None, f"{path} is not a slot file"
    best: tuple[int, int, int] | None = None
    for start, record in zip(layout, read_slots(data), strict=True):
        if not record:
            continue
        version = parse_header(record)[0].version
        if best is None or version > best[0]:
            best = (version, start, start + len(record))
    assert best is not None, f"{path} holds no record"
    return best[1], best[2]
