"""The VMM: the operator's client of the manager enclave, over K1.

Every request opens an attested session through hostd's relay: the manager's
certificate must carry a quote, from this platform's attestation root, of
the manager code installed here (the MRENCLAVE this client computes itself),
bound to the certificate's key; the operator key authenticates us (S3, S4).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.channel import ClientCredential, ClientSession
from sgxvtpm.enclaves.manager import CA_COMMON_NAME
from sgxvtpm.enclaves.specs import expected_policy
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.mux.aio import open_client_session
from sgxvtpm.platform.base import MeasurementPolicy, QuoteVerifier
from sgxvtpm.platform.sim.quote import SimQuoteVerifier
from sgxvtpm.util.keyfile import write_private_key

CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 120.0


class VmmError(Exception):
    """The manager refused a request or could not be reached; the message says why."""


def platform_verifier(state: StateDir) -> QuoteVerifier:
    """The verifier for this host's enclaves: its platform's attestation root."""
    try:
        root = (state.platform / "root_ca.pem").read_bytes()
    except OSError:
        raise VmmError(f"no platform at {state.platform}: is hostd running?") from None
    return SimQuoteVerifier(root)


class VmmClient:
    def __init__(
        self,
        state: StateDir,
        *,
        operator: ClientCredential | None = None,
        policy: MeasurementPolicy | None = None,
    ) -> None:
        self.state = state
        self._operator = operator
        self._policy = policy

    def _credential(self) -> ClientCredential:
        if self._operator is None:
            try:
                self._operator = ClientCredential.load(
                    self.state.operator_key, self.state.operator_cert
                )
            except OSError:
                raise VmmError(f"no operator key in {self.state.root}") from None
        return self._operator

    async def request(self, request: dict[str, Any]) -> dict[str, Any]:
        session = ClientSession(
            self._policy or expected_policy("manager"),
            platform_verifier(self.state),
            self._credential(),
            expected_cn=CA_COMMON_NAME,
        )
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.state.socket)), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            raise VmmError(f"cannot reach hostd at {self.state.socket}") from None
        wrapped = await asyncio.wait_for(
            open_client_session(reader, writer, session, "manager"), CONNECT_TIMEOUT
        )
        try:
            await wrapped.send(json.dumps(request).encode())
            reply: dict[str, Any] = json.loads(
                await asyncio.wait_for(wrapped.recv(), REQUEST_TIMEOUT)
            )
        finally:
            await wrapped.close()
        if not reply.get("ok"):
            raise VmmError(str(reply.get("error", "request refused")))
        return reply

    # -- the operations -------------------------------------------------------
    async def create(
        self,
        name: str,
        *,
        pcr_banks: list[str] | None = None,
        ek: list[str] | None = None,
        vm_public_key: ec.EllipticCurvePublicKey | None = None,
    ) -> dict[str, Any]:
        vm_dir = self.state.vm(name)
        key: ec.EllipticCurvePrivateKey | None = None
        if vm_public_key is None:
            key = ec.generate_private_key(ec.SECP256R1())
            vm_public_key = key.public_key()
        spki = vm_public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        reply = await self.request(
            {
                "op": "create",
                "name": name,
                "vm_spki_der": spki.hex(),
                "pcr_banks": pcr_banks or ["sha256"],
                "ek": ek or [],
            }
        )
        vm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if key is not None:
            write_private_key(vm_dir / "vm.key", key)
        (vm_dir / "vm.crt").write_text(reply["vm_cert_pem"])
        (vm_dir / "ca.crt").write_text(reply["ca_cert_pem"])
        (vm_dir / "instance.json").write_text(json.dumps(reply["instance"], indent=2) + "\n")
        return dict(reply["instance"])

    async def destroy(self, name: str) -> None:
        await self.request({"op": "destroy", "name": name})
        vm_dir = self.state.vm(name)
        for child in ("vm.key", "vm.crt", "ca.crt", "instance.json"):
            (vm_dir / child).unlink(missing_ok=True)
        if vm_dir.exists() and not any(vm_dir.iterdir()):
            vm_dir.rmdir()

    async def list(self) -> list[dict[str, Any]]:
        return list((await self.request({"op": "list"}))["instances"])

    async def show(self, name: str) -> dict[str, Any]:
        return dict((await self.request({"op": "show", "name": name}))["instance"])

    async def ca_certificate(self) -> x509.Certificate:
        pem = (await self.request({"op": "ca"}))["ca_cert_pem"]
        return x509.load_pem_x509_certificate(pem.encode())
