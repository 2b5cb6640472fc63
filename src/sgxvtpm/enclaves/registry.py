"""The manager's registry: the pinned operator, the CA key, and every instance.

Sealed at rest like instance state (kind MANAGER_REGISTRY, its own counter),
so a tampered, foreign or rolled-back registry is refused (SECURITY.md
properties 10 and 15).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.enclaves.sealing import SealError, SealKind
from sgxvtpm.enclaves.state import SealedFile
from sgxvtpm.platform.base import EnclavePlatform
from sgxvtpm.util import log

REGISTRY_OWNER = "manager"
#: A VM's client certificate is issued to CN "vm:NAME"; X.509 bounds a CN at 64.
VM_CN_PREFIX = "vm:"
MAX_VM_NAME = 64 - len(VM_CN_PREFIX)
_VM_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_vm_name(name: str) -> str:
    """``name`` if it may name a VM, else ValueError saying what a name must be.

    The manager enclave decides (it keeps the registry); the CLI asks the same
    question first so a bad name fails before anything is sent. A name is also
    one directory (``vms/NAME``) on the host and part of a certificate CN, so
    it must be a single, ordinary path component ('.', '..', hidden or
    option-like names are refused) and short enough for the CN.
    """
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= MAX_VM_NAME
        or not set(name) <= _VM_NAME_CHARS
        or name[0] in ".-"
    ):
        raise ValueError(
            f"bad VM name {name!r}: use 1-{MAX_VM_NAME} characters of [A-Za-z0-9._-],"
            " not starting with '.' or '-'"
        )
    return name


@dataclass
class InstanceRecord:
    name: str
    instance_id: str
    vm_spki_sha256: str
    pcr_banks: list[str]
    ek: list[str]
    created: float
    state: str = "creating"
    mrenclave: str = ""
    mrsigner: str = ""
    ek_certificates: dict[str, str] = field(default_factory=dict)
    # Many hosts: {"phase": "incoming"|"in"|"out", ...} (enclaves/manager.py).
    migration: dict[str, Any] = field(default_factory=dict)


@dataclass
class Registry:
    operator_cert_pem: str
    ca_key_pem: str
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    # The fleet (enclaves/fleet.py: FleetState.to_json); empty: not in one.
    fleet: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        data = {
            "operator_cert_pem": self.operator_cert_pem,
            "ca_key_pem": self.ca_key_pem,
            "instances": {name: asdict(rec) for name, rec in self.instances.items()},
        }
        if self.fleet:
            data["fleet"] = self.fleet
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Registry:
        try:
            raw: dict[str, Any] = json.loads(data)
            instances = {
                name: InstanceRecord(**rec) for name, rec in raw.get("instances", {}).items()
            }
            fleet = raw.get("fleet", {})
            if not isinstance(fleet, dict):
                raise TypeError("fleet is not an object")
            return cls(raw["operator_cert_pem"], raw["ca_key_pem"], instances, fleet)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise SealError("manager registry content is malformed") from exc

    def ca_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.ca_key_pem.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SealError("manager registry holds an unexpected CA key type")
        return key


class RegistryStore:
    def __init__(self, platform: EnclavePlatform, path: Path) -> None:
        self.file = SealedFile(platform, SealKind.MANAGER_REGISTRY, REGISTRY_OWNER, path)

    def open(self, operator_cert_pem: str, *, reset: bool = False) -> tuple[Registry, str]:
        """The registry, and how it came to be: "opened", "created" or "reset".

        "created" is the first start on this platform: no file and no counter;
        it pins ``operator_cert_pem``. A missing file whose counter exists is
        not a first start: someone removed it, or it was lost; starting afresh
        then would silently orphan every VM on the host (their instances only
        answer the manager that provisioned them) and pin whichever operator
        key hostd offers. So that is refused (SealError), as is a damaged or
        rolled-back file, unless ``reset``: the operator's explicit command to
        start a new, empty registry in place of a missing or unreadable one.
        A reset registry starts above the counter, so no older copy can come
        back, and an intact registry is never reset.
        """
        if self.file.exists():
            try:
                registry = Registry.decode(self.file.load())
            except SealError as exc:
                if not reset:
                    raise
                refused = str(exc)
            else:
                if reset:
                    raise SealError(
                        "the manager registry is intact, so it is not reset: start hostd"
                        " without --reset-manager"
                    )
                return registry, "opened"
        else:
            counter = self.file.counter_value()
            if not counter:  # never created, or its creation never completed
                return self._create(operator_cert_pem), "created"
            refused = (
                f"the manager registry {self.file.path.name} is missing, but its platform"
                f" counter shows it was written {counter} times: it was removed (tampering)"
                " or lost"
            )
            if not reset:
                raise SealError(
                    f"{refused}. Restore it from a backup; or, to give up every VM"
                    " registered on this host, start hostd once with --reset-manager"
                )
        log.log("manager.registry_reset", refused=refused,
                lost="every VM registered on this host before the reset")
        return self._create(operator_cert_pem), "reset"

    def _create(self, operator_cert_pem: str) -> Registry:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        registry = Registry(operator_cert_pem=operator_cert_pem, ca_key_pem=pem)
        self.file.create(registry.encode())
        return registry

    def save(self, registry: Registry) -> None:
        self.file.commit(registry.encode())
