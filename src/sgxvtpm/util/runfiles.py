"""``--log file=PATH[,level=LEVEL]`` and ``--pid file=PATH``, in swtpm's syntax.

hostd and the VM endpoints take them as swtpm does (``swtpm socket --log
file=...,level=... --pid file=...``), so a libvirt-style supervisor runs them
unchanged. The log file receives every JSON line the process and its
children (hostd's sim CPU, zygote and enclaves) write to stderr: it replaces
file descriptor 2. The pid file holds the pid and is removed on a clean exit.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sgxvtpm.util import log


def _options(option: str, text: str, allowed: tuple[str, ...]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if key not in allowed or not sep or not value:
            raise ValueError(
                f"{option}: expected {', '.join(k + '=...' for k in allowed)}, got {part!r}"
            )
        fields[key] = value
    if "file" not in fields:
        raise ValueError(f"{option}: file=PATH is required")
    return fields


@dataclass(frozen=True)
class LogSpec:
    """Where the JSON log lines go, and the lowest level written."""

    file: Path
    level: str = "info"

    @classmethod
    def parse(cls, text: str) -> LogSpec:
        """``file=PATH[,level=debug|info|warning|error]``; ValueError naming the option."""
        fields = _options("--log", text, ("file", "level"))
        level = fields.get("level", "info")
        if level not in log.LEVELS:
            raise ValueError(f"--log: level must be one of {', '.join(log.LEVELS)}, "
                             f"got {level!r}")
        return cls(Path(fields["file"]), level)

    def apply(self) -> IO[str]:
        """Send this process's stderr (file descriptor 2, which children inherit) to
        the file, appending; a stream on the old stderr, for the one line a failing
        command prints to its user."""
        fd = os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        console = os.fdopen(os.dup(2), "w", buffering=1)
        sys.stderr.flush()
        os.dup2(fd, 2)
        os.close(fd)
        log.set_level(self.level)
        return console


def parse_pid_option(text: str) -> Path:
    """``file=PATH`` (swtpm's ``--pid``); ValueError naming the option."""
    return Path(_options("--pid", text, ("file",))["file"])


@contextlib.contextmanager
def pid_file(path: Path | None) -> Iterator[None]:
    """Write this process's pid to ``path`` for the block; remove it on the way out."""
    if path is None:
        yield
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # e.g. hostd dropped the privileges it needs
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()
