"""Structured logs (structlog's habit, on the standard library).

Every record is one JSON object: ``{"event": "instance.created", "vm": "vm1", ...}``.
One processor, :func:`scrub`, removes anything that could be secret before a
record is written: fields whose name says key/secret/seed/auth/blob/plaintext,
and every ``bytes`` value (TPM traffic and key material are bytes). Tests
capture events with :func:`capture`.
"""

from __future__ import annotations

import json
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


def configure(component: str, stream: IO[str] | None = sys.stderr) -> None:
    """Name the process (``hostd``, ``manager``, ``instance``) and choose where lines go."""
    global _component, _stream
    _component = component
    _stream = stream


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


def log(event: str, **fields: Any) -> None:
    record = scrub({"event": event, **fields})
    record["component"] = _component
    for sink in list(_sinks):
        sink(record)
    if _stream is not None:
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
