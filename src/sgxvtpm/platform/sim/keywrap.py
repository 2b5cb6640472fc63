"""Private keys at rest, wrapped under a key derived from the fuse key.

AES-256-GCM, nonce || ciphertext; the AAD names the key so that wrapped keys
cannot be swapped for one another. Only the fuse key itself is stored in the
clear (it models fuses, which hardware cannot encrypt either).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgxvtpm.platform.base import PlatformError

_AAD_PREFIX = b"sgxvtpm-sim wrapped private key v1\x00"


def derive_wrap_key(root_secret: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"sgxvtpm-sim key wrapping key"
    ).derive(root_secret)


def wrap_private_key(wrap_key: bytes, name: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    nonce = os.urandom(12)
    return nonce + AESGCM(wrap_key).encrypt(nonce, der, _AAD_PREFIX + name.encode())


def unwrap_private_key(wrap_key: bytes, name: str, blob: bytes) -> ec.EllipticCurvePrivateKey:
    """Unwrap; PlatformError if the blob was altered or belongs to another platform."""
    try:
        der = AESGCM(wrap_key).decrypt(blob[:12], blob[12:], _AAD_PREFIX + name.encode())
    except (InvalidTag, ValueError) as exc:
        raise PlatformError(
            f"wrapped key {name!r} does not unwrap: damaged, or from another platform directory"
        ) from exc
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PlatformError(f"wrapped key {name!r} is not an EC key")
    return key
