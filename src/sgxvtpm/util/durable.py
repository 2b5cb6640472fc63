"""Durable files (SECURITY.md property 16): a write has reached the disk when it returns.

Two ways:

- :func:`atomic_write` replaces a whole file: temp file, fsync, rename over the
  old file, fsync the directory. A crash at any point leaves either the old or
  the new file, never a torn one. Three journal commits: for files written now
  and then (keys, certificates, the first version of a record).
- :class:`SlotFile` keeps one record that changes often (sealed state, a
  monotonic counter) in place: the file holds two slots and each write goes
  into the slot that does not hold the current record, then one fdatasync; no
  rename, no directory sync (one flush instead of three: 0.1 ms against 0.5-0.7
  ms on this project's machine). A crash can tear only the slot being written;
  the other still holds the previous record, and the reader tells them apart
  by the record's own authentication (every record kept in slots is MAC'd or
  sealed and carries its version).

The temp file gets an unpredictable name and is created with O_EXCL and
O_NOFOLLOW: state directories may be writable by a less trusted user (hostd's),
who could otherwise plant a symlink at a predictable temp name and have a
write (a key, a sealed blob) land in a file of their choosing. A slot file is
opened with O_NOFOLLOW and must be a regular file, for the same reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import struct
from pathlib import Path

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` durably, the new file having exactly ``mode``.

    OSError (e.g. ENOSPC) leaves the old file. A symlink at ``path`` is replaced
    by the file, never followed.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, _CREATE, mode & 0o600)  # never more open than the owner while written
    try:
        # The umask may have taken bits away (0o644 under umask 077): set the
        # exact mode on the descriptor, before any data is in the file.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_durably(path: Path) -> None:
    """Unlink ``path`` (if present) and make the unlink durable."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


SLOT_MAGIC = b"SGXVSLT1"
SLOT_HEADER = 512  # magic, capacity; written only by atomic_write, never in place
_GRANULE = 512
_SLOT_HEAD = struct.Struct("<8sI")
_LEN = struct.Struct("<I")


def slot_capacity(size: int) -> int:
    """The slot size for a record of ``size`` bytes: its length field, the record and a
    quarter more (a record that outgrows its slot costs one whole-file rewrite)."""
    return -(-(_LEN.size + size + size // 4 + _GRANULE) // _GRANULE) * _GRANULE


def slot_layout(data: bytes) -> tuple[int, ...] | None:
    """The offsets of a slot file's two records (after each one's length field), or
    None if ``data`` is not a slot file (a file of one record, written whole)."""
    if len(data) < _SLOT_HEAD.size:
        return None
    magic, capacity = _SLOT_HEAD.unpack_from(data)
    if magic != SLOT_MAGIC or capacity < _GRANULE:
        return None
    return tuple(SLOT_HEADER + i * capacity + _LEN.size for i in range(2))


def read_slots(data: bytes) -> list[bytes]:
    """The records a slot file's bytes hold, in slot order: b"" for a slot never
    written (or cut off before its length), what is left of one cut short. Bytes
    that are not a slot file are one record, whole (files written before slot
    files, or by :func:`atomic_write`). Only the record's own check (a MAC, a
    seal) tells a whole record from a torn one."""
    layout = slot_layout(data)
    if layout is None:
        return [data]
    return [
        data[start : start + _LEN.unpack_from(data, start - _LEN.size)[0]]
        if len(data) >= start else b""
        for start in layout
    ]  # fmt: skip


class SlotFile:
    """One record, rewritten in place, durably; see the module doc.

    Use: :meth:`read` the records, choose the current one by its content and
    tell :meth:`use` which slot held it; :meth:`write` then goes into the other
    slot. :meth:`create` (and a record that outgrows its slot, or a file that is
    not a slot file yet) rewrites the whole file with :func:`atomic_write`.
    The file stays open from :meth:`read` or :meth:`create` to :meth:`close`.
    Not thread-safe; one writer per file (its owner, or under a lock).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None  # open for writing; its inode cannot be reused meanwhile
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of self._fd
        self._layout: tuple[int, ...] | None = None
        self._current = 0

    def read(self) -> list[bytes]:
        """The file's records (:func:`read_slots`); OSError if it cannot be read."""
        self.close()
        writable = True
        try:
            fd = self._open(os.O_RDWR)
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            fd, writable = self._open(os.O_RDONLY), False  # a write will need a new file
        try:
            data = _read_all(fd)
        except BaseException:
            os.close(fd)
            raise
        if writable:
            self._hold(fd)
        else:
            os.close(fd)
        self._layout = slot_layout(data)
        self._current = 0
        return read_slots(data)

    def use(self, slot: int) -> None:
        """Slot ``slot`` of what :meth:`read` returned holds the current record."""
        self._current = slot

    def create(self, record: bytes) -> None:
        """A new file: ``record`` in the first slot, the other empty. OSError (a full
        disk) leaves the file as it was, and the next write goes into it again."""
        capacity = slot_capacity(len(record))
        head = _SLOT_HEAD.pack(SLOT_MAGIC, capacity).ljust(SLOT_HEADER, b"\0")
        first = (_LEN.pack(len(record)) + record).ljust(capacity, b"\0")
        atomic_write(self.path, head + first + bytes(capacity))  # both slots allocated
        self.close()
        self._layout = slot_layout(head)
        self._current = 0
        self._hold(self._open(os.O_RDWR))

    def write(self, record: bytes) -> None:
        """Replace the current record with ``record``, durably; OSError leaves the
        current one (a failed in-place write can tear only the other slot).

        A file removed or replaced behind this object's back is not written
        into (the write would be lost with the old inode): the record then
        goes into a new file at the path, as :meth:`create` writes it.
        """
        layout, fd = self._layout, self._fd
        if (
            layout is None or fd is None or not self._ours()
            or _LEN.size + len(record) > layout[1] - layout[0]
        ):  # fmt: skip
            self.create(record)
            return
        slot = 1 - self._current
        data = _LEN.pack(len(record)) + record
        start = layout[slot] - _LEN.size
        view = memoryview(data)
        while view:
            view = view[os.pwrite(fd, view, start + len(data) - len(view)) :]
        os.fdatasync(fd)
        self._current = slot

    def erase(self) -> None:
        self.close()
        remove_durably(self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._file = None

    def _hold(self, fd: int) -> None:
        st = os.fstat(fd)
        self._fd, self._file = fd, (st.st_dev, st.st_ino)

    def _ours(self) -> bool:
        """The path still names the file this object holds open."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._file

    def _open(self, flags: int) -> int:
        fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{self.path} is not a regular file")
        return fd


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)
