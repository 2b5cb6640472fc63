"""The manager's registry: the pinned operator, the CA key, and every instance.

Sealed at rest like instance state (kind MANAGER_REGISTRY, its own counter),
so a tampered, foreign or rolled-back registry is refused (S5, S6).
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

REGISTRY_OWNER = "manager"


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


@dataclass
class Registry:
    operator_cert_pem: str
    ca_key_pem: str
    instances: dict[str, InstanceRecord] = field(default_factory=dict)

    def encode(self) -> bytes:
        data = {
            "operator_cert_pem": self.operator_cert_pem,
            "ca_key_pem": self.ca_key_pem,
            "instances": {name: asdict(rec) for name, rec in self.instances.items()},
        }
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Registry:
        try:
            raw: dict[str, Any] = json.loads(data)
            instances = {
                name: InstanceRecord(**rec) for name, rec in raw.get("instances", {}).items()
            }
            return cls(raw["operator_cert_pem"], raw["ca_key_pem"], instances)
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

    def open_or_create(self, operator_cert_pem: str) -> tuple[Registry, bool]:
        """The registry, and whether it was created now (first start pins the operator)."""
        if self.file.exists():
            return Registry.decode(self.file.load()), False
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        registry = Registry(operator_cert_pem=operator_cert_pem, ca_key_pem=pem)
        self.file.create(registry.encode())
        return registry, True

    def save(self, registry: Registry) -> None:
        self.file.commit(registry.encode())
