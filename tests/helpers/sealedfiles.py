"""Where things are in the files that hold state at rest (util/durable.py slot files),
for tests that read a version or damage one record on purpose."""

from __future__ import annotations

import struct
from pathlib import Path

from sgxvtpm.enclaves.sealing import SealError, parse_header
from sgxvtpm.util.durable import read_slots, slot_layout

_LEN = 4


def sealed_version(path: Path) -> int:
    """The newest version in a sealed file's slots (headers only, not authenticated)."""
    versions = []
    for record in read_slots(path.read_bytes()):
        try:
            versions.append(parse_header(record)[0].version)
        except SealError:
            continue
    return max(versions)


def newest_record(path: Path, version_of: str = "sealed") -> tuple[int, int]:
    """(start, end) in the file of the slot record with the highest version: a sealed
    file's (``sealed``) or a sim counter's (``counter``: its value at offset 72)."""
    data = path.read_bytes()
    layout = slot_layout(data)
    assert layout is not None, f"{path} is not a slot file"
    best: tuple[int, int, int] | None = None
    for start, record in zip(layout, read_slots(data), strict=True):
        if not record:
            continue
        if version_of == "sealed":
            version = parse_header(record)[0].version
        else:
            version = struct.unpack_from("<Q", record, 72)[0]
        if best is None or version > best[0]:
            best = (version, start, start + len(record))
    assert best is not None, f"{path} holds no record"
    return best[1], best[2]
