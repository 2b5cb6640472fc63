"""Monotonic counters: durable files in the platform directory.

One slot file (util/durable.py) per counter, named by its owner's MRSIGNER and
a hash of its name; each slot holds a record

  magic "SGXVCTR1" | owner MRSIGNER (32) | SHA-256(name) (32) | value u64le |
  HMAC-SHA256(counter key, everything before) (32)

and the counter's value is the highest one whose MAC checks (a write torn by
a crash leaves the other slot's, the value before). The counter key is
derived from the fuse key, so only this platform can write a counter the
enclaves will accept. Every change is flushed to disk (the record in the
other slot, fdatasync) before the new value is returned, under an exclusive
flock so concurrent increments never lose one.
Sealed state is fresh because of them (SECURITY.md property 15).

What the simulation cannot stop: whoever controls the platform directory
(root; hostd's user too when hostd runs without ``--user``) can put back an
older, validly MAC'd file. Hardware needs a TPM NV counter or a replicated
service for that (SECURITY.md, "What sim mode does not protect against").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgxvtpm.platform.base import PlatformError
from sgxvtpm.util.durable import SlotFile

_MAGIC = b"SGXVCTR1"
_SIZE = len(_MAGIC) + 32 + 32 + 8 + 32
_MAX = 2**64 - 1


def derive_counter_key(root_secret: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"sgxvtpm-sim counter MAC key"
    ).derive(root_secret)


class CounterStore:
    """The platform's counter service; enclaves reach it through EnclavePlatform."""

    def __init__(self, directory: Path, mac_key: bytes) -> None:
        self._dir = directory
        self._key = mac_key

    def create(self, owner: bytes, name: str) -> int:
        """Create the counter at 0 if it does not exist; its value."""
        with self._locked(owner, name) as slots:
            if slots.path.exists():
                return self._load(slots, owner, name)
            slots.create(self._record(owner, name, 0))
            return 0

    def increment(self, owner: bytes, name: str) -> int:
        """Add one; the new value is on disk when this returns."""
        with self._locked(owner, name) as slots:
            value = self._load(slots, owner, name)
            if value == _MAX:
                raise PlatformError(f"monotonic counter {name!r} is exhausted")
            slots.write(self._record(owner, name, value + 1))
            return value + 1

    def read(self, owner: bytes, name: str) -> int:
        with self._locked(owner, name) as slots:
            return self._load(slots, owner, name)

    def _path(self, owner: bytes, name: str) -> Path:
        if not name or len(name.encode()) > 255:
            raise PlatformError("a counter name must be 1 to 255 bytes of UTF-8")
        return self._dir / f"{owner.hex()}-{_name_hash(name).hex()[:32]}.ctr"

    @contextlib.contextmanager
    def _locked(self, owner: bytes, name: str) -> Iterator[SlotFile]:
        path = self._path(owner, name)
        self._dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        slots = SlotFile(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield slots
        finally:
            slots.close()
            os.close(fd)

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def _record(self, owner: bytes, name: str, value: int) -> bytes:
        data = _MAGIC + owner + _name_hash(name) + struct.pack("<Q", value)
        return data + self._mac(data)

    def _load(self, slots: SlotFile, owner: bytes, name: str) -> int:
        """The counter's value; ``slots`` then writes over the slot that does not hold it."""
        try:
            records = slots.read()
        except FileNotFoundError:
            raise PlatformError(f"monotonic counter {name!r} does not exist") from None
        except OSError as exc:
            raise PlatformError(f"monotonic counter {name!r} cannot be read: {exc}") from exc
        head = _MAGIC + owner + _name_hash(name)
        values = [
            (struct.unpack_from("<Q", raw, len(head))[0], slot)
            for slot, raw in enumerate(records)
            if len(raw) == _SIZE
            and raw.startswith(head)
            and hmac.compare_digest(raw[-32:], self._mac(raw[:-32]))
        ]
        if not values:
            raise PlatformError(
                f"monotonic counter {name!r} is damaged ({slots.path}): its MAC or format does "
                "not check; restore the platform directory from a backup or recreate "
                "the counter's owner state"
            )
        value, slot = max(values)
        slots.use(slot)
        return int(value)


def _name_hash(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()
