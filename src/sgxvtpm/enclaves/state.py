"""An instance's sealed state: its provisioning and libtpms' three blobs in one file.

One file, one current version: every commit seals the whole bundle with
version + 1 into the file's other slot (util/durable.py: written in place, one
fdatasync), then advances the platform counter (sealing.py explains the order).
Manufacturing (instance.py: provision, certify) commits once, at its end,
before it answers that the TPM exists. A VM's running TPM
stores in *deferred* mode too: the store only marks the bundle dirty, and the
instance commits it once per request, after the command and before its
response leaves, together with that request's resume record (resume.py), so
an NV change and the volatile state that goes with it are one commit and a
response is released only after the change it reports is durable
(SECURITY.md property 16); a commit that fails is rolled back and answered
with TPM_RC_FAILURE (instance.py).

The bundle also records the version of the latest export of state blobs to
the host (``exported``, 0 when the TPM has changed since); blobcipher.py
accepts only that export back.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgxvtpm.enclaves.sealing import Sealer, SealError, SealKind, check_fresh
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.platform.base import EnclavePlatform, PlatformError
from sgxvtpm.util.durable import SlotFile

BLOB_NAMES = ("permall", "volatilestate", "savestate")
_ABSENT = 0xFFFFFFFF


@dataclass
class Bundle:
    """u32 len + provisioning JSON | per blob: u32 len (or absent) + bytes
    | [u64 exported [| u32 len + resume record]].

    ``exported`` is written only when set or when a resume record follows,
    so bundles of older versions, which end after the blobs, read as "no
    export". ``resume`` is the encoded resume record (resume.py) of the
    request whose NV change this version commits.
    """

    provisioning: dict[str, Any] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    exported: int = 0
    resume: bytes = b""

    def encode(self) -> bytes:
        meta = json.dumps(self.provisioning, sort_keys=True).encode()
        parts = [struct.pack(">I", len(meta)), meta]
        for name in BLOB_NAMES:
            blob = self.blobs.get(name)
            if blob is None:
                parts.append(struct.pack(">I", _ABSENT))
            else:
                parts += [struct.pack(">I", len(blob)), blob]
        if self.exported or self.resume:
            parts.append(struct.pack(">Q", self.exported))
        if self.resume:
            parts += [struct.pack(">I", len(self.resume)), self.resume]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Bundle:
        try:
            (meta_len,) = struct.unpack_from(">I", data)
            offset = 4 + meta_len
            provisioning = json.loads(data[4:offset])
            blobs: dict[str, bytes] = {}
            for name in BLOB_NAMES:
                (length,) = struct.unpack_from(">I", data, offset)
                offset += 4
                if length == _ABSENT:
                    continue
                if offset + length > len(data):
                    raise ValueError("short blob")
                blobs[name] = data[offset : offset + length]
                offset += length
            exported, resume = 0, b""
            if offset != len(data):
                (exported,) = struct.unpack_from(">Q", data, offset)
                offset += 8
                if offset != len(data):
                    (length,) = struct.unpack_from(">I", data, offset)
                    resume = data[offset + 4 : offset + 4 + length]
                    if offset + 4 + length != len(data) or not length:
                        raise ValueError("trailing bytes")
                elif not exported:
                    raise ValueError("trailing bytes")
        except (struct.error, ValueError, RecursionError) as exc:
            raise SealError("sealed state content is malformed") from exc
        if not isinstance(provisioning, dict):
            raise SealError("sealed state content is malformed")
        return cls(provisioning, blobs, exported, bytes(resume))


class DirectoryBusyError(SgxvtpmError):
    """Another process (an enclave that has not exited yet) holds this state directory.

    Not tampering: the enclave exits and hostd launches it again later.
    """


def lock_directory(directory: Path, timeout: float = 30.0) -> int:
    """Hold ``directory``'s lock for the life of this process (returns the fd).

    After hostd is killed, the enclave it launched may still be finishing a
    write while its replacement starts: the replacement waits here until the
    old process is gone, so two processes never own one sealed file.
    """
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise DirectoryBusyError(f"{directory} is held by another process") from None
            time.sleep(0.02)


class SealedFile:
    """One sealed, counted record in a slot file (util/durable.py): the write order and
    the freshness check of sealing.py.

    Each commit seals version + 1 into the slot that does not hold the current
    version, flushes it, then advances the counter. Loading opens both slots and
    takes the newest that authenticates; a torn write (a crash mid-write) fails
    authentication and leaves the other slot's version, which the counter then
    accepts or refuses as sealing.py says.
    """

    def __init__(
        self, platform: EnclavePlatform, kind: SealKind, owner_id: str, path: Path
    ) -> None:
        self._platform = platform
        self._sealer = Sealer(platform, kind, owner_id)
        self._counter = f"{kind.name.lower()}:{owner_id}"
        self._slots = SlotFile(path)
        self.path = path
        self.version = 0

    def exists(self) -> bool:
        return self.path.exists()

    def counter_value(self) -> int | None:
        """The value of this file's platform counter; None if it was never created.

        The counter is created with the file and outlives it (a destroyed
        instance's id is never used again), and it reaches 1 only after the
        first version is durable. So "no file but a counter above 0" means the
        file was removed behind the enclave's back: tampering or loss, never a
        first start. At 0 the first write never completed (a crash during
        creation), and nothing of it was ever acknowledged. A counter the
        platform cannot read counts as absent here; creating the file over it
        then fails on that counter.
        """
        try:
            return self._platform.counter_read(self._counter)
        except PlatformError:
            return None

    def load(self) -> bytes:
        """The plaintext of the newest version; SealError when damaged, foreign or rolled back."""
        try:
            records = self._slots.read()
        except OSError as exc:
            raise SealError(f"cannot read sealed file: {exc.strerror or exc}") from None
        opened, damaged = [], []
        for slot, blob in enumerate(records):
            if not blob and len(records) > 1:
                continue  # a slot never written, or cut off by a truncation
            try:
                opened.append((slot, *self._sealer.unseal(blob)))
            except SealError as exc:
                damaged.append(str(exc))
        if not opened:
            raise SealError("; ".join(damaged) or "sealed file is truncated: it holds no version")
        slot, header, plaintext = max(opened, key=lambda found: found[1].version)
        try:
            counter = self._platform.counter_read(self._counter)
        except PlatformError as exc:
            raise SealError(f"platform counter unavailable: {exc}") from None
        try:
            advance = check_fresh(header.version, counter)
        except SealError as exc:  # say also why no newer version was taken
            raise SealError("; the other slot: ".join([str(exc), *damaged])) from None
        if advance:
            self._platform.counter_increment(self._counter)
        self._slots.use(slot)
        self.version = header.version
        return plaintext

    def create(self, plaintext: bytes, vm_id: str = "") -> None:
        """Write the first version, above the counter if one exists (it never goes back)."""
        try:
            self.version = self._platform.counter_create(self._counter)
            self._commit(plaintext, vm_id, self._slots.create)
        except PlatformError as exc:
            raise SealError(f"platform counter unavailable: {exc}") from None

    def commit(self, plaintext: bytes, vm_id: str = "") -> None:
        """Write version + 1 durably, then advance the counter; only then return."""
        self._commit(plaintext, vm_id, self._slots.write)

    def _commit(self, plaintext: bytes, vm_id: str, write: Callable[[bytes], None]) -> None:
        version = self.version + 1
        write(self._sealer.seal(plaintext, version, vm_id))
        self._platform.counter_increment(self._counter)
        self.version = version

    def erase(self) -> None:
        self._slots.erase()


class SealedStateStore:
    """An instance's bundle in a SealedFile; also libtpms' state store (via the adapter)."""

    def __init__(self, platform: EnclavePlatform, instance_id: str, path: Path) -> None:
        self.file = SealedFile(platform, SealKind.INSTANCE_STATE, instance_id, path)
        self.bundle = Bundle()
        #: Deferred: a change (libtpms' store, an export) only marks the bundle
        #: dirty; the instance commits it once, after the request, with the
        #: request's resume record (:meth:`flush`), before the response leaves.
        self.deferred = False
        self.dirty = False
        self._committed: tuple[dict[str, bytes], int] = ({}, 0)  # blobs, exported

    def exists(self) -> bool:
        return self.file.exists()

    def load(self) -> Bundle:
        self.bundle = Bundle.decode(self.file.load())
        self._committed = (dict(self.bundle.blobs), self.bundle.exported)
        return self.bundle

    def create(self, provisioning: dict[str, Any]) -> None:
        self.bundle = Bundle(dict(provisioning), {})
        self.file.create(self.bundle.encode(), self._vm_id())

    def commit(self) -> None:
        if self.deferred:
            self.dirty = True
            return
        self.file.commit(self.bundle.encode(), self._vm_id())

    def flush(self, resume: bytes) -> None:
        """Commit the pending changes with ``resume`` (durable, counted) in one write."""
        self.bundle.resume = resume
        self.file.commit(self.bundle.encode(), self._vm_id())
        self.dirty = False
        self._committed = (dict(self.bundle.blobs), self.bundle.exported)

    def rollback(self) -> None:
        """Forget the changes since the last commit (it failed): the bundle is the durable one."""
        blobs, exported = self._committed
        self.bundle.blobs, self.bundle.exported = dict(blobs), exported
        self.dirty = False

    def erase(self) -> None:
        self.file.erase()

    def _vm_id(self) -> str:
        return str(self.bundle.provisioning.get("vm_id", ""))

    def load_blob(self, name: str) -> bytes | None:
        return self.bundle.blobs.get(name)

    def store_blob(self, name: str, data: bytes) -> None:
        previous = self.bundle.blobs.get(name)
        self.bundle.blobs[name] = bytes(data)
        if self.deferred:  # committed after the request; a failed commit ends the process
            self.dirty = True
            return
        try:
            self.commit()
        except BaseException:
            # Not durable, so not acknowledged: libtpms reports an NV failure.
            if previous is None:
                self.bundle.blobs.pop(name, None)
            else:
                self.bundle.blobs[name] = previous
            raise

    def delete_blob(self, name: str) -> None:
        if self.bundle.blobs.pop(name, None) is not None:
            self.commit()


class EngineStoreAdapter:
    """Adapts SealedStateStore to the engine's load/store/delete protocol."""

    def __init__(self, store: SealedStateStore) -> None:
        self._store = store

    def load(self, name: str) -> bytes | None:
        return self._store.load_blob(name)

    def store(self, name: str, data: bytes) -> None:
        self._store.store_blob(name, data)

    def delete(self, name: str) -> None:
        self._store.delete_blob(name)
