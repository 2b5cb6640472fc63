"""Private keys on disk: PEM, mode 0600 from the moment the file exists."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.util.durable import atomic_write


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``key`` to ``path`` as a new 0600 file renamed over whatever was there.

    A fresh file, not a truncated old one: an existing file keeps its mode and
    owner when truncated (a 0644 file would leak the new key), and a symlink
    at ``path`` would be followed.
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(path, pem, 0o600)
