"""Durable, atomic file replacement (SECURITY.md property 16).

A response that reports a state change is released only after this returns:
temp file, fsync, rename over the old file, fsync the directory. A crash at
any point leaves either the old or the new file, never a torn one.

The temp file gets an unpredictable name and is created with O_EXCL and
O_NOFOLLOW: state directories may be writable by a less trusted user (hostd's),
who could otherwise plant a symlink at a predictable temp name and have a
write (a key, a sealed blob) land in a file of their choosing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
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
