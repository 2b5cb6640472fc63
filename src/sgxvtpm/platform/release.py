"""A pre-signed release: what the vendor's build host ships, and its manifest.

On SGX the enclave's vendor signs at build time, on its own build host; the
serving host only loads the SIGSTRUCTs and EINIT checks each against the
measured enclave. ``sgxvtpm release sign --key VENDOR_KEY.pem --platform KIND
--out DIR`` is that step; ``hostd --release DIR`` loads it and signs nothing.

DIR holds, per enclave role (``manager``, ``instance``), the platform's
signed files (sim kinds: ``ROLE.sigstruct``, platform/sim/release.py;
gramine: ``ROLE.manifest.sgx`` and ``ROLE.sig``, platform/gramine/launcher.py)
and :data:`MANIFEST`, which is also the clients' pins file (vmm/pins.py)::

    {"format": 1, "platform": "sim",
     "mrenclave": {"manager": "<64 hex>", "instance": "<64 hex>"},
     "mrsigner": "<64 hex>", "root": "intel"}

``root`` is read by clients of a ``gramine`` host only. Everything in DIR is
public: the operator copies :data:`MANIFEST` to the clients from the vendor
(``$SGXVTPM_MEASUREMENTS``), never from hostd.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from sgxvtpm.platform.base import PlatformError

MANIFEST = "release.json"
ROLES = ("manager", "instance")
_FORMAT = 1


class ReleaseError(PlatformError):
    """A pre-signed release directory is missing, incomplete, or for another platform.

    Copy the whole directory ``sgxvtpm release sign`` wrote on the build host,
    for the platform hostd runs (``--platform``).
    """


def write_manifest(
    out: Path, platform: str, mrenclave: Mapping[str, bytes], mrsigner: bytes
) -> dict[str, object]:
    """Write ``out/release.json``; the manifest, as written."""
    manifest: dict[str, object] = {
        "format": _FORMAT,
        "platform": platform,
        "mrenclave": {role: mrenclave[role].hex() for role in ROLES},
        "mrsigner": mrsigner.hex(),
        "root": "intel",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: Path, platform: str) -> tuple[dict[str, bytes], bytes]:
    """The release's MRENCLAVE by role and its MRSIGNER; ReleaseError (one line) if
    ``directory`` holds no release for ``platform``."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
        if data.get("format") != _FORMAT:
            raise ValueError(f"unsupported format {data.get('format')!r}")
        mrenclave = {role: bytes.fromhex(data["mrenclave"][role]) for role in ROLES}
        mrsigner = bytes.fromhex(data["mrsigner"])
        kind = data["platform"]
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ReleaseError(
            f"no pre-signed release in {directory} ({MANIFEST}: {reason}): copy the "
            "directory `sgxvtpm release sign` wrote on the build host"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReleaseError(f"{path} is not a release manifest ({exc})") from None
    if kind != platform:
        raise ReleaseError(
            f"the release in {directory} is signed for platform {kind!r}, not {platform!r}"
        )
    if any(len(v) != 32 for v in (*mrenclave.values(), mrsigner)):
        raise ReleaseError(f"{path} is not a release manifest (a hash is not 32 bytes)")
    return mrenclave, mrsigner


def write_new_key(path: Path, pem: bytes) -> None:
    """Write a vendor's private key to a new file ``path``, 0600; never overwrite one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ReleaseError(f"{path} exists: a vendor key is never overwritten") from None
    except OSError as exc:
        raise ReleaseError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
