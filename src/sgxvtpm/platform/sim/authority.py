"""A simulated provisioning authority: one root for many sim platforms (``sgxvtpm sim-root``).

On SGX every platform's PCK certificate chains to Intel's root, and the
vendor signs its enclaves once, so MRSIGNER is the same on every host. A sim
platform provisioned on its own has its own root and its own signer: its
quotes verify only against itself. A platform provisioned *under* an
authority (``hostd --sim-root DIR``) gets its PCK certificate from the
authority's root key and takes the authority's vendor signing key, while its
fuse key, platform id, PCK and attestation keys stay its own.

Layout of an authority directory (mode 0700):

  authority.key   32-byte secret, mode 0600 (the authority's one clear secret,
                  as fuse.key is a platform's)
  keys.json       root CA and vendor signer keys, wrapped under it (keywrap)
  root_ca.pem     the root certificate (public: what verifiers pin)
  authority.json  format, root certificate fingerprint; written last
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.platform.base import PlatformError
from sgxvtpm.platform.sim import keywrap, provision
from sgxvtpm.util.durable import atomic_write

SECRET = "authority.key"
KEYS = "keys.json"
ROOT_PEM = "root_ca.pem"
META = "authority.json"
_FORMAT = 1


@dataclass(frozen=True)
class SimAuthority:
    """The authority's root key and certificate, and the vendor's enclave signing key."""

    path: Path
    root_key: ec.EllipticCurvePrivateKey
    root_pem: bytes
    # None when opened for a pre-signed release (hostd --release DIR --sim-root):
    # the vendor signed elsewhere, and the sim CPU need not hold its key.
    signer: ec.EllipticCurvePrivateKey | None

    @property
    def root_sha256(self) -> str:
        return hashlib.sha256(self.root_pem).hexdigest()

    @classmethod
    def init(cls, path: Path, *, now: datetime.datetime | None = None) -> SimAuthority:
        """Create a new authority in ``path`` (which must be absent or empty)."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise PlatformError(f"{path} is not empty: a sim root is created in a new directory")
        now = now if now is not None else datetime.datetime.now(datetime.UTC)
        secret = os.urandom(32)
        root_key = ec.generate_private_key(ec.SECP256R1())
        signer = ec.generate_private_key(ec.SECP256R1())
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)
        atomic_write(path / SECRET, secret, 0o600)
        wrap = keywrap.derive_wrap_key(secret)
        wrapped = {
            "root_ca": keywrap.wrap_private_key(wrap, "root_ca", root_key).hex(),
            "signer": keywrap.wrap_private_key(wrap, "signer", signer).hex(),
        }
        atomic_write(path / KEYS, json.dumps(wrapped, indent=1).encode(), 0o600)
        root_pem = provision.root_certificate(root_key, now).public_bytes(
            serialization.Encoding.PEM
        )
        atomic_write(path / ROOT_PEM, root_pem, 0o644)
        meta = {"format": _FORMAT, "root_sha256": hashlib.sha256(root_pem).hexdigest()}
        atomic_write(path / META, json.dumps(meta, indent=1).encode(), 0o644)
        return cls.open(path)

    @classmethod
    def open(cls, path: Path, *, with_signer: bool = True) -> SimAuthority:
        """Open the authority in ``path``; PlatformError (one line) if it is not one.

        ``with_signer=False``: leave the vendor's signing key wrapped (a pre-signed
        release needs only the root).
        """
        path = Path(path)
        try:
            st = (path / SECRET).stat()
            if stat.S_IMODE(st.st_mode) & 0o077:
                raise PlatformError(f"{path / SECRET} is readable by group or others; chmod 0600")
            secret = (path / SECRET).read_bytes()
            meta = json.loads((path / META).read_text())
            if meta.get("format") != _FORMAT:
                raise PlatformError(f"{path}: unsupported sim root format {meta.get('format')}")
            keys = json.loads((path / KEYS).read_text())
            wrapped = {k: bytes.fromhex(v) for k, v in keys.items()}
            root_pem = (path / ROOT_PEM).read_bytes()
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise PlatformError(
                f"{path} is not a sim root (sgxvtpm sim-root init): {exc}"
            ) from None
        if hashlib.sha256(root_pem).hexdigest() != meta.get("root_sha256"):
            raise PlatformError(f"{path / ROOT_PEM} does not match {path / META}")
        wrap = keywrap.derive_wrap_key(secret)
        try:
            root_key = keywrap.unwrap_private_key(wrap, "root_ca", wrapped["root_ca"])
            signer = (
                keywrap.unwrap_private_key(wrap, "signer", wrapped["signer"])
                if with_signer
                else None
            )
        except KeyError as exc:
            raise PlatformError(f"{path / KEYS} lacks the key {exc}") from None
        return cls(path=path, root_key=root_key, root_pem=root_pem, signer=signer)

    def platform_keys(self) -> provision.PlatformKeys:
        """Keys for a new platform under this authority: its own PCK and attestation key."""
        return provision.PlatformKeys(
            root_ca=self.root_key,
            pck=ec.generate_private_key(ec.SECP256R1()),
            attestation=ec.generate_private_key(ec.SECP256R1()),
            signer=self.signer,
        )

    def signer_public_der(self) -> bytes:
        """The vendor key's SubjectPublicKeyInfo, b"" if opened without it."""
        return provision.spki_der(self.signer.public_key()) if self.signer is not None else b""
