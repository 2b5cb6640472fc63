"""The manager enclave (E1): the patent's second vTPM emulator.

It pins the operator key at first start, keeps the sealed instance registry,
and answers the VMM over K1 (JSON requests, one per message):

- ``create``  {name, vm_spki_der (hex), pcr_banks}: the *second creation
  request* to the loader (CONTROL launch_instance), then an attested session
  to the new instance enclave (its quote must show our signer's instance
  product), provisioning it with its instance id and bound VM key; answers
  with the instance's identity and a client certificate for the VM key
  issued by the manager's CA;
- ``destroy`` {name}, ``list``, ``show`` {name}, ``ca``.

The manager's one key is both its TLS identity and its CA; the certificate
carries the manager's quote, and is reissued with a fresh quote each start.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sgxvtpm.channel import (
    ChannelError,
    ClientCredential,
    ClientSession,
    ClientTrust,
    EnclaveCredential,
    PeerCertificate,
    ServerSession,
    spki_sha256,
)
from sgxvtpm.enclaves.ekcert import (
    TpmSpecification,
    issue_ek_certificate,
    issue_platform_certificate,
)
from sgxvtpm.enclaves.registry import VM_CN_PREFIX, InstanceRecord, RegistryStore, check_vm_name
from sgxvtpm.enclaves.runtime import EnclaveRuntime, platform_verifier
from sgxvtpm.enclaves.sealing import SealError
from sgxvtpm.enclaves.specs import peer_policy
from sgxvtpm.enclaves.state import lock_directory
from sgxvtpm.mux.aio import RelayMux
from sgxvtpm.platform.base import EnclavePlatform, QuoteVerifier
from sgxvtpm.tpm.ek import public_key_from_tpmt
from sgxvtpm.util import log

CA_COMMON_NAME = "sgxvtpm manager CA"
# An instance answers in milliseconds; RSA EK generation at create takes well
# under a second. A dead or wedged instance must not hold the manager longer.
CALL_TIMEOUT = 20.0


class ManagerError(Exception):
    """A VMM request was refused; the message goes back to the VMM."""


# How a call to an instance enclave fails when the instance is dead, restarting or wedged.
_UNREACHABLE = (ChannelError, ManagerError, ConnectionError, TimeoutError, EOFError)


class ManagerEnclave:
    def __init__(self, platform: EnclavePlatform, args: Mapping[str, Any]) -> None:
        self.platform = platform
        self.verifier: QuoteVerifier = platform_verifier(platform, args)
        self._lock = lock_directory(Path(args["state_dir"]))
        self.store = RegistryStore(platform, Path(args["state_dir"]) / "registry.sealed")
        self.registry, how = self.store.open(
            str(args["operator_cert_pem"]), reset=bool(args.get("reset_registry"))
        )
        if how != "opened":
            log.log("manager.operator_pinned", registry=how)
        operator = x509.load_pem_x509_certificate(self.registry.operator_cert_pem.encode())
        self.operator_spki = spki_sha256(operator)
        self.ca_key = self.registry.ca_key()
        self.credential = EnclaveCredential.create(
            platform, CA_COMMON_NAME, key=self.ca_key, is_ca=True
        )
        # Towards instances the manager authenticates with a leaf its CA issues to
        # its own key, not with its self-signed RA-TLS certificate: that one is new
        # at every start, while an instance that outlives a manager restart still
        # anchors the certificate it was launched with. A CA-issued leaf chains to
        # any of them (same subject, same key) and carries the pinned key.
        self.as_client = ClientCredential(
            self.ca_key, self._issue_client_certificate("manager", self.ca_key.public_key())
        )
        self.mux: RelayMux | None = None
        self.lock = asyncio.Lock()

    # -- sessions ------------------------------------------------------------
    def new_session(self) -> ServerSession:
        trust = ClientTrust(
            anchors_pem=[self.registry.operator_cert_pem.encode()],
            pinned_spki_sha256=frozenset({self.operator_spki}),
        )
        return ServerSession(self.credential, trust)

    async def handle(self, peer: PeerCertificate, data: bytes) -> bytes:
        if peer.spki_sha256 != self.operator_spki:
            raise PermissionError("not the operator")
        try:
            request = json.loads(data)
            async with self.lock:
                reply = await self.dispatch(request)
        except (ManagerError, SealError, ValueError, KeyError, TypeError) as exc:
            reply = {"ok": False, "error": str(exc)}
        return json.dumps(reply).encode()

    async def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "create":
            return await self.create(request)
        if op == "destroy":
            return await self.destroy(str(request["name"]))
        if op == "list":
            return {"ok": True, "instances": [await self.describe(r) for r in self._records()]}
        if op == "show":
            return {"ok": True, "instance": await self.describe(self._record(request["name"]))}
        if op == "ca":
            return {"ok": True, "ca_cert_pem": self.credential.cert_pem.decode()}
        raise ManagerError(f"unknown op {op!r}")

    # -- the flows of docs/ARCHITECTURE.md, "Flows" ----------------------------
    async def restore(self) -> None:
        """After a (re)start: relaunch every instance; each unseals its own state."""
        for record in self._records():
            try:
                await self._launch(record.instance_id)
                status = await self._call(record.instance_id, {"op": "status"})
                record.state = status.get("state", "unknown")
            except _UNREACHABLE as exc:
                record.state = "error"
                log.log("manager.restore_failed", vm=record.name, reason=str(exc))
            log.log("manager.restored", vm=record.name, state=record.state)

    async def create(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            name = check_vm_name(request["name"])
        except ValueError as exc:
            raise ManagerError(str(exc)) from None
        if name in self.registry.instances:
            raise ManagerError(f"VM {name!r} already exists")
        vm_key = serialization.load_der_public_key(bytes.fromhex(request["vm_spki_der"]))
        if not isinstance(vm_key, ec.EllipticCurvePublicKey):
            raise ManagerError("the VM key must be an ECDSA public key")
        vm_spki = _spki_sha256_of(vm_key)
        banks = [str(b) for b in request.get("pcr_banks", ["sha256"])]
        record = InstanceRecord(
            name=name,
            instance_id=os.urandom(16).hex(),
            vm_spki_sha256=vm_spki.hex(),
            pcr_banks=banks,
            ek=[str(e) for e in request.get("ek", [])],
            created=time.time(),
        )
        launched = await self._launch(record.instance_id)
        try:
            reply = await self._manufacture(record)
        except BaseException:
            await self._stop(record.instance_id, erase=True)
            raise
        record.state = reply["state"]
        record.mrenclave = reply["mrenclave"]
        record.mrsigner = reply["mrsigner"]
        self.registry.instances[name] = record
        self.store.save(self.registry)
        log.log("manager.instance_created", vm=name, instance=record.instance_id,
                pid=launched.get("pid"))
        return {
            "ok": True,
            "instance": await self.describe(record),
            "vm_cert_pem": self._issue_vm_certificate(name, vm_key),
            "ca_cert_pem": self.credential.cert_pem.decode(),
        }

    async def _manufacture(self, record: InstanceRecord) -> dict[str, Any]:
        """Provision the new instance: bind the VM, create and certify its EKs."""
        reply = await self._call(
            record.instance_id,
            {
                "op": "provision",
                "vm_id": record.name,
                "vm_spki_sha256": record.vm_spki_sha256,
                "pcr_banks": record.pcr_banks,
                "ek": record.ek,
            },
        )
        if not reply.get("ok"):
            raise ManagerError(f"provisioning failed: {reply.get('error')}")
        spec = TpmSpecification(**reply["tpm_spec"])
        certs: dict[str, str] = {}
        first_key = None
        for ek in reply["eks"]:
            # TPM2B_PUBLIC: a u16 size, then the TPMT_PUBLIC the EK certificate is for.
            key = public_key_from_tpmt(bytes.fromhex(ek["public_area"])[2:])
            first_key = first_key or key
            der = issue_ek_certificate(
                self.ca_key, self.credential.certificate, key, spec=spec
            )
            certs[ek["alg"]] = der.hex()
        assert first_key is not None
        platform = issue_platform_certificate(self.ca_key, self.credential.certificate, first_key)
        reply = await self._call(
            record.instance_id,
            {"op": "certify", "ek_certificates": certs, "platform_certificate": platform.hex()},
        )
        if not reply.get("ok"):
            raise ManagerError(f"EK certification failed: {reply.get('error')}")
        record.ek = list(certs)
        record.ek_certificates = certs
        return reply

    async def destroy(self, name: str) -> dict[str, Any]:
        record = self._record(name)
        try:
            await self._call(record.instance_id, {"op": "destroy"})
        except _UNREACHABLE as exc:
            # An instance that cannot be reached (dead, refusing its state)
            # is still destroyed: hostd removes its files below.
            log.log("manager.destroy_unreachable", vm=name, reason=str(exc))
        await self._stop(record.instance_id, erase=True)
        del self.registry.instances[name]
        self.store.save(self.registry)
        log.log("manager.instance_destroyed", vm=name, instance=record.instance_id)
        return {"ok": True}

    async def describe(self, record: InstanceRecord) -> dict[str, Any]:
        info = asdict(record)
        info.pop("vm_spki_sha256", None)
        host = await self._control({"op": "instance_info", "instance_id": record.instance_id})
        info["pid"] = host.get("pid")
        info["alive"] = bool(host.get("alive"))
        if info["alive"]:
            try:
                status = await self._call(record.instance_id, {"op": "status"})
                info["state"] = status.get("state", "unknown")
                info["reason"] = status.get("reason", "")
            except _UNREACHABLE as exc:
                info["state"], info["reason"] = "error", f"unreachable: {exc}"
        else:
            info["state"], info["reason"] = "stopped", host.get("reason", "")
        return info

    # -- helpers ------------------------------------------------------------
    def _records(self) -> list[InstanceRecord]:
        return sorted(self.registry.instances.values(), key=lambda r: r.name)

    def _record(self, name: object) -> InstanceRecord:
        record = self.registry.instances.get(str(name))
        if record is None:
            raise ManagerError(f"no VM named {name!r}")
        return record

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.mux is not None
        return await self.mux.control(request)

    async def _launch(self, instance_id: str) -> dict[str, Any]:
        reply = await self._control(
            {
                "op": "launch_instance",
                "instance_id": instance_id,
                "manager_cert_pem": self.credential.cert_pem.decode(),
            }
        )
        if not reply.get("ok"):
            raise ManagerError(f"the loader could not launch the instance: {reply.get('error')}")
        return reply

    async def _stop(self, instance_id: str, erase: bool = False) -> None:
        await self._control({"op": "stop_instance", "instance_id": instance_id, "erase": erase})

    async def _call(self, instance_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """One request over an attested session to an instance enclave (both quotes checked)."""
        assert self.mux is not None
        client = ClientSession(
            peer_policy(self.platform.identity.mrsigner, "instance"),
            self.verifier,
            self.as_client,
            expected_cn=instance_id,
        )
        session = await asyncio.wait_for(self.mux.open(instance_id, client), CALL_TIMEOUT)
        try:
            await session.send(json.dumps(request).encode())
            reply: dict[str, Any] = json.loads(
                await asyncio.wait_for(session.recv(), CALL_TIMEOUT)
            )
        except EOFError:
            raise ManagerError("the instance closed the session") from None
        finally:
            await session.close()
        return reply

    def _issue_vm_certificate(self, name: str, vm_key: ec.EllipticCurvePublicKey) -> str:
        cert = self._issue_client_certificate(VM_CN_PREFIX + name, vm_key)
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    def _issue_client_certificate(
        self, common_name: str, key: ec.EllipticCurvePublicKey
    ) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.credential.certificate.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .sign(self.ca_key, hashes.SHA256())
        )


def _spki_sha256_of(key: ec.EllipticCurvePublicKey) -> bytes:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashes_sha256(der)


def hashes_sha256(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def _tell_host_refused(stream: socket.socket, reason: str) -> None:
    """Tell hostd why the manager will not run, so it can stop relaunching it and say so.

    Only a courtesy to the operator: the refusal itself is that this enclave
    exits without ever serving a request, whatever hostd does with the message.
    """

    async def tell() -> None:
        stream.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=stream)
        mux = RelayMux(reader, writer)
        mux.start()
        try:
            # Waiting for the answer: hostd has acted on it before it sees us exit.
            await asyncio.wait_for(mux.control({"op": "manager_refused", "reason": reason}), 10)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            await mux.aclose()

    asyncio.run(tell())


def main(platform: EnclavePlatform, stream: socket.socket, args: Mapping[str, Any]) -> None:
    """Entry point (base.EnclaveEntry)."""
    log.configure("manager")
    try:
        manager = ManagerEnclave(platform, args)
    except SealError as exc:
        # A damaged, rolled-back or missing registry: refuse to run, say why
        # (SECURITY.md properties 10 and 15).
        log.log("manager.registry_refused", reason=str(exc))
        _tell_host_refused(stream, str(exc))
        raise SystemExit(3) from None
    runtime = EnclaveRuntime(stream, manager.new_session, manager.handle)

    async def after_start(mux: RelayMux) -> None:
        manager.mux = mux
        async with manager.lock:
            await manager.restore()
        await mux.control({"op": "manager_ready"})

    asyncio.run(runtime.run(after_start))
