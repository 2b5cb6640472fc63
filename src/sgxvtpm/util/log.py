"""Structured logs (structlog's habit, on the standard library).

Every record is one JSON object on one line:
``{"ts": ..., "event": "instance.created", "level": "info", "vm": "vm1", ...}``;
the standard library's ``logging`` records of the ``sgxvtpm`` loggers become such
records too (:class:`_Bridge`), so a log holds nothing but JSON lines.
One processor, :func:`scrub`, removes anything that could be secret before a
record is written: fields whose name says key/secret/seed/auth/blob/plaintext,
and every ``bytes`` value (TPM traffic and key material are bytes). Tests
capture events with :func:`capture`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

_SECRET_WORDS = ("key", "secret", "seed", "auth", "blob", "plaintext", "password", "token")
REDACTED = "<redacted>"

Sink = Callable[[dict[str, Any]], None]
_sinks: list[Sink] = []
_stream: IO[str] | None = sys.stderr
_component = "sgxvtpm"
#: The levels a record may have, lowest first (``--log level=``).
LEVELS = ("debug", "info", "warning", "error")
_threshold = LEVELS.index("info")


def configure(
    component: str, stream: IO[str] | None = sys.stderr, level: str | None = None
) -> None:
    """Name the process (``hostd``, ``manager``, ``instance``), choose where lines go and,
    if ``level`` is given, the lowest level written."""
    global _component, _stream
    _component = component
    _stream = stream
    if level is not None:
        set_level(level)


def set_level(level: str) -> None:
    """Write only records of ``level`` (one of :data:`LEVELS`) and above."""
    global _threshold
    _threshold = LEVELS.index(level)
    logging.getLogger("sgxvtpm").setLevel(logging.DEBUG if level == "debug" else logging.INFO)


def scrub(fields: dict[str, Any]) -> dict[str, Any]:
    """The one processor that strips secrets; applied to every record."""
    clean: dict[str, Any] = {}
    for name, value in fields.items():
        lowered = name.lower()
        secret = any(word in lowered for word in _SECRET_WORDS)
        if secret and not lowered.endswith(("_id", "_hash", "_sha256")):
            clean[name] = REDACTED
        elif isinstance(value, bytes | bytearray | memoryview):
            clean[name] = f"<{len(value)} bytes>"
        elif isinstance(value, dict):
            clean[name] = scrub(value)
        else:
            clean[name] = value
    return clean


def log(event: str, level: str = "info", **fields: Any) -> None:
    """One record: ``event``, its ``level`` (one of :data:`LEVELS`), and ``fields``."""
    record = scrub({"event": event, "level": level, **fields})
    record["component"] = _component
    for sink in list(_sinks):
        sink(record)
    if _stream is not None and LEVELS.index(level) >= _threshold:
        record = {"ts": round(time.time(), 3), **record}
        try:
            _stream.write(json.dumps(record, default=str, sort_keys=False) + "\n")
            _stream.flush()
        except (OSError, ValueError):
            pass


@contextmanager
def capture() -> Iterator[list[dict[str, Any]]]:
    """Collect the records logged inside the block (for tests)."""
    records: list[dict[str, Any]] = []
    _sinks.append(records.append)
    try:
        yield records
    finally:
        _sinks.remove(records.append)


class _Bridge(logging.Handler):
    """The ``logging`` records of the ``sgxvtpm.*`` loggers, as JSON records
    (``event`` is the logger's name without ``sgxvtpm.``, then ``.log``)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            fields: dict[str, Any] = {"message": record.getMessage()}
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                fields["exception"] = f"{type(exc).__name__}: {exc}"
            log(f"{record.name.removeprefix('sgxvtpm.')}.log",
                level=level if level in LEVELS else "error", **fields)
        except Exception:  # a log line must never break the code that logs
            self.handleError(record)


_root = logging.getLogger("sgxvtpm")
if not any(isinstance(h, _Bridge) for h in _root.handlers):
    _root.addHandler(_Bridge())
    _root.setLevel(logging.INFO)
    _root.propagate = False  # never also through logging's plain-text last resort
