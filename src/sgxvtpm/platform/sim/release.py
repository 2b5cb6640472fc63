"""The vendor's build-host step for the sim kinds, and what hostd loads of it.

:func:`sign` measures each enclave spec of the release (the measured closure,
enclaves/specs.py) and signs its SIGSTRUCT (:mod:`.sigstruct`) with the
vendor's key, an ECDSA P-256 key in a PEM file (the sim's SIGSTRUCT stands in
for SGX's RSA-3072 one; :func:`generate_key` makes one). It writes
``ROLE.sigstruct`` and the release manifest (platform/release.py).

:func:`load` is hostd's side: it reads those public files, checks they agree
with the manifest, and gives the SIGSTRUCTs by enclave name to the loader,
which sends them at each launch. The sim CPU then holds no vendor key: EINIT
alone decides (the measured bytes must be what was signed; MRSIGNER is the
hash of the key in the SIGSTRUCT that verified).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.platform.base import EnclaveSpec, PlatformError, PlatformKind
from sgxvtpm.platform.release import (
    ROLES,
    ReleaseError,
    read_manifest,
    write_manifest,
    write_new_key,
)
from sgxvtpm.platform.sim import sigstruct
from sgxvtpm.platform.sim.measure import attributes_of, mrenclave_of, mrsigner_of, read_code

SUFFIX = ".sigstruct"


def generate_key(path: Path) -> bytes:
    """A new vendor key (ECDSA P-256, PKCS#8 PEM, 0600) at ``path``; its MRSIGNER."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_new_key(path, pem)
    return mrsigner_of(_spki(key))


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise PlatformError(f"vendor key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise PlatformError(
            f"vendor key {path}: not an unencrypted PEM private key ({exc})"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve, ec.SECP256R1
    ):
        raise PlatformError(
            f"vendor key {path}: the sim signs with ECDSA P-256 "
            "(sgxvtpm release keygen --platform sim)"
        )
    return key


def sign(
    specs: Sequence[EnclaveSpec], key_path: Path, out: Path, kind: PlatformKind
) -> dict[str, object]:
    """Sign ``specs`` with the vendor key into ``out``; the release manifest written."""
    key = load_key(key_path)
    out.mkdir(parents=True, exist_ok=True)
    mrenclaves = {}
    for spec in specs:
        if spec.name not in ROLES:
            raise PlatformError(f"unknown enclave role {spec.name!r}")
        mrenclave = mrenclave_of(spec.entry, read_code(spec.code_files), spec.config)
        sig = sigstruct.sign(
            key, mrenclave, attributes_of(spec.debug), spec.isv_prod_id, spec.isv_svn
        )
        (out / f"{spec.name}{SUFFIX}").write_bytes(sig.encode())
        mrenclaves[spec.name] = mrenclave
    return write_manifest(out, kind.name, mrenclaves, mrsigner_of(_spki(key)))


def load(directory: Path, kind: PlatformKind) -> dict[str, bytes]:
    """The release's SIGSTRUCTs by enclave name; ReleaseError (one line) if incomplete,
    for another platform, or not what its manifest says."""
    mrenclave, mrsigner = read_manifest(directory, kind.name)
    signed = {}
    for role in ROLES:
        path = Path(directory) / f"{role}{SUFFIX}"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ReleaseError(
                f"the release in {directory} lacks {path.name}: {exc.strerror}"
            ) from None
        try:
            sig = sigstruct.SigStruct.decode(data)
        except sigstruct.SigStructError as exc:
            raise ReleaseError(f"{path}: {exc}") from None
        if sig.mrenclave != mrenclave[role] or mrsigner_of(sig.signer_public_key) != mrsigner:
            raise ReleaseError(f"{path} is not the SIGSTRUCT the release manifest names")
        signed[role] = data
    return signed


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
