"""The operator's pins for a Gramine host: which builds and which attestation root to trust.

A client cannot compute the MRENCLAVE of a Gramine build (gramine-sgx-sign
hashes the enclave's pages, Gramine's own binaries included), and hostd is
untrusted, so the ``.sig`` files in its directory prove nothing. The
operator copies what ``gramine-sgx-sign`` printed for a trusted build (or
``sgxvtpm gramine pins MANAGER.sig INSTANCE.sig``, which reads the same
values from that build's SIGSTRUCTs) into a JSON file::

    {
      "mrenclave": {"manager": "<64 hex>", "instance": "<64 hex>"},
      "mrsigner": "<64 hex>",
      "root": "intel",
      "pccs": "https://pccs.example:8081"
    }

``root``: ``intel`` (the default: Intel's SGX Root CA, pinned by its
SHA-256 in platform/dcap.py) or the path of a PEM root certificate
(relative to the file), for a DCAP platform under another root. The file is
``$SGXVTPM_MEASUREMENTS`` if set, else ``gramine.json`` in the credentials
directory (vmm/credentials.py). Clients whose platform kind is ``gramine``
(``SGXVTPM_PLATFORM=gramine``) accept an enclave only if its MRENCLAVE is
the pinned one for its role AND its MRSIGNER is the pinned signer.
``pccs`` (optional; ``$SGXVTPM_PCCS_URL`` overrides it): the PCCS the clients
fetch DCAP collateral from when no collateral file is given (platform/pccs.py: on the
first quote, then cached until its nextUpdate).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.platform.base import EnclaveIdentity, MeasurementPolicy

ENV = "SGXVTPM_MEASUREMENTS"
FILE = "gramine.json"
ROLES = ("manager", "instance")
INTEL = "intel"


class PinsError(SgxvtpmError):
    """The pins file is missing or malformed (one line naming the file and the fix)."""


@dataclass
class PinnedPolicy(MeasurementPolicy):
    """A MeasurementPolicy that also requires the pinned MRSIGNER (AND, not OR)."""

    required_mrsigner: bytes = field(default=b"")

    def accepts(self, identity: EnclaveIdentity) -> bool:
        return identity.mrsigner == self.required_mrsigner and super().accepts(identity)


@dataclass(frozen=True)
class GraminePins:
    mrenclave: dict[str, bytes]
    mrsigner: bytes
    root: str  # "intel" or the PEM certificate's bytes, decoded
    source: Path
    pccs: str = ""  # a PCCS URL, or "" for none

    def policy(self, role: str) -> PinnedPolicy:
        return PinnedPolicy(
            mrenclaves=frozenset({self.mrenclave[role]}), required_mrsigner=self.mrsigner
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "mrenclave": {role: self.mrenclave[role].hex() for role in ROLES},
                "mrsigner": self.mrsigner.hex(),
                "root": self.root,
            } | ({"pccs": self.pccs} if self.pccs else {}),
            indent=2,
        ) + "\n"


def pins_path(credentials_root: Path) -> Path:
    env = os.environ.get(ENV)
    return Path(env) if env else credentials_root / FILE


def load(credentials_root: Path) -> GraminePins:
    """The pins in ``$SGXVTPM_MEASUREMENTS`` or ``CREDENTIALS/gramine.json``; PinsError if none."""
    path = pins_path(credentials_root)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PinsError(
            f"no Gramine measurement pins in {path} ({reason}): write the MRENCLAVE of the "
            "trusted manager and instance builds and their MRSIGNER there (`sgxvtpm gramine "
            f"pins MANAGER.sig INSTANCE.sig > {path}` on the build host), or set ${ENV}"
        ) from None
    return parse(text, path)


def parse(text: str, path: Path) -> GraminePins:
    try:
        data = json.loads(text)
        mrenclave = {role: _hash(data["mrenclave"][role], f"mrenclave.{role}") for role in ROLES}
        mrsigner = _hash(data["mrsigner"], "mrsigner")
        root = data.get("root", INTEL)
        if not isinstance(root, str) or not root:
            raise ValueError("root must be 'intel' or the path of a PEM certificate")
        pccs = data.get("pccs", "")
        if not isinstance(pccs, str) or (pccs and not pccs.startswith(("https://", "http://"))):
            raise ValueError("pccs must be an http(s) URL")
    except (ValueError, KeyError, TypeError) as exc:
        raise PinsError(f"{path}: not Gramine measurement pins ({_what(exc)})") from None
    if root != INTEL:
        pem_path = path.parent / root
        try:
            root = pem_path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise PinsError(f"{path}: root {pem_path}: {_what(exc)}") from None
    return GraminePins(mrenclave, mrsigner, root, path, pccs)


def _hash(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a hex string")
    raw = bytes.fromhex(value)
    if len(raw) != 32:
        raise ValueError(f"{name} is not 32 bytes")
    return raw


def _what(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing {exc.args[0]!r}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def pins_from_sigs(manager_sig: Path, instance_sig: Path, root: str = INTEL) -> str:
    """The pins file (JSON) for a trusted build: MRENCLAVEs and MRSIGNER from its SIGSTRUCTs.

    Run on the build host, on the ``.sig`` files gramine-sgx-sign wrote; PinsError
    if they do not parse or name two signers.
    """
    from sgxvtpm.platform.gramine import sigstruct

    parsed = {}
    for role, path in (("manager", manager_sig), ("instance", instance_sig)):
        try:
            parsed[role] = sigstruct.parse(path.read_bytes())
        except OSError as exc:
            raise PinsError(f"{path}: {_what(exc)}") from None
        except sigstruct.SigStructError as exc:
            raise PinsError(f"{path}: {exc}") from None
    signers = {sig.mrsigner for sig in parsed.values()}
    if len(signers) != 1:
        raise PinsError(f"{manager_sig} and {instance_sig} are signed by different keys")
    pins = GraminePins({role: sig.mrenclave for role, sig in parsed.items()},
                       signers.pop(), root, manager_sig)
    return pins.to_json()
