"""The manager enclave (E1): the patent's second vTPM emulator.

It pins the operator key at first start, keeps the sealed instance registry,
and answers the VMM over K1 (sgxvtpm/wire/k1.py, one request per message):

- ``create`` (CreateVm): the *second creation request* to the loader
  (CONTROL launch_instance, sgxvtpm/wire/control.py), then an attested
  session to the new instance enclave (its quote must show our signer's
  instance product), provisioning it with its instance id and bound VM key
  (sgxvtpm/wire/admin.py); answers with the instance's identity and a client
  certificate for the VM key issued by the manager's CA;
- ``destroy``, ``list``, ``show``, ``ca``.

The manager's one key is both its TLS identity and its CA; the certificate
carries the manager's quote, and is reissued with a fresh quote each start.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

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
from sgxvtpm.enclaves.state import DirectoryBusyError, lock_directory
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.mux.aio import RelayMux
from sgxvtpm.platform.base import EnclavePlatform, QuoteVerifier
from sgxvtpm.tpm.ek import public_key_from_tpmt
from sgxvtpm.util import log
from sgxvtpm.wire import admin, control, k1
from sgxvtpm.wire.jsonmsg import Refused, Reply, Request

CA_COMMON_NAME = "sgxvtpm manager CA"
# An instance answers in milliseconds; RSA EK generation at create takes well
# under a second. A dead or wedged instance must not hold the manager longer.
CALL_TIMEOUT = 20.0


class ManagerError(SgxvtpmError):
    """A VMM request was refused; the message goes back to the VMM, which shows it.

    The message says what to change (another VM name, a supported key type)
    or which part failed (the loader, the instance enclave).
    """


# How a call to an instance enclave fails when the instance is dead, restarting or wedged.
_UNREACHABLE = (ChannelError, ManagerError, ConnectionError, TimeoutError, EOFError)
_R = TypeVar("_R", bound=Reply)


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
        reply: Reply | Refused
        try:
            request = k1.decode_request(data)
            async with self.lock:
                reply = await self.dispatch(request)
        except (ManagerError, SealError, k1.K1ProtocolError, ValueError) as exc:
            reply = Refused(str(exc))
        return k1.encode_reply(reply)

    async def dispatch(self, request: k1.K1Request) -> Reply:
        if isinstance(request, k1.CreateVm):
            return await self.create(request)
        if isinstance(request, k1.DestroyVm):
            return await self.destroy(request.name)
        if isinstance(request, k1.ListVms):
            return k1.Instances(tuple([await self.describe(r) for r in self._records()]))
        if isinstance(request, k1.ShowVm):
            return k1.Shown(await self.describe(self._record(request.name)))
        return k1.CaCertificate(self.credential.cert_pem.decode())

    # -- the flows of docs/ARCHITECTURE.md, "Flows" ----------------------------
    async def restore(self) -> None:
        """After a (re)start: relaunch every instance; each unseals its own state."""
        for record in self._records():
            try:
                await self._launch(record.instance_id)
                record.state = (await self._call(record.instance_id, admin.GetStatus())).state
            except _UNREACHABLE as exc:
                record.state = "error"
                log.log("manager.restore_failed", vm=record.name, reason=str(exc))
            log.log("manager.restored", vm=record.name, state=record.state)

    async def create(self, request: k1.CreateVm) -> k1.Created:
        try:
            name = check_vm_name(request.name)
        except ValueError as exc:
            raise ManagerError(str(exc)) from None
        if name in self.registry.instances:
            raise ManagerError(f"VM {name!r} already exists")
        vm_key = serialization.load_der_public_key(request.vm_spki_der)
        if not isinstance(vm_key, ec.EllipticCurvePublicKey):
            raise ManagerError("the VM key must be an ECDSA public key")
        vm_spki = _spki_sha256_of(vm_key)
        record = InstanceRecord(
            name=name,
            instance_id=os.urandom(16).hex(),
            vm_spki_sha256=vm_spki.hex(),
            pcr_banks=list(request.pcr_banks),
            ek=list(request.ek),
            created=time.time(),
        )
        launched = await self._launch(record.instance_id)
        try:
            status = await self._manufacture(record)
        except BaseException:
            await self._stop(record.instance_id, erase=True)
            raise
        record.state = status.state
        record.mrenclave = status.mrenclave
        record.mrsigner = status.mrsigner
        self.registry.instances[name] = record
        self.store.save(self.registry)
        log.log("manager.instance_created", vm=name, instance=record.instance_id,
                pid=launched.pid)
        return k1.Created(
            instance=await self.describe(record),
            vm_cert_pem=self._issue_vm_certificate(name, vm_key),
            ca_cert_pem=self.credential.cert_pem.decode(),
        )

    async def _manufacture(self, record: InstanceRecord) -> admin.InstanceStatus:
        """Provision the new instance: bind the VM, create and certify its EKs."""
        provisioned = await self._call(
            record.instance_id,
            admin.Provision(
                vm_id=record.name,
                vm_spki_sha256=bytes.fromhex(record.vm_spki_sha256),
                pcr_banks=tuple(record.pcr_banks),
                ek=tuple(record.ek),
            ),
            failed="provisioning failed",
        )
        tpm = provisioned.tpm_spec
        spec = TpmSpecification(family=tpm.family, level=tpm.level, revision=tpm.revision)
        certs: dict[str, bytes] = {}
        first_key = None
        for ek in provisioned.eks:
            # TPM2B_PUBLIC: a u16 size, then the TPMT_PUBLIC the EK certificate is for.
            key = public_key_from_tpmt(ek.public_area[2:])
            first_key = first_key or key
            certs[ek.alg] = issue_ek_certificate(
                self.ca_key, self.credential.certificate, key, spec=spec
            )
        if first_key is None:
            raise ManagerError("provisioning failed: the instance created no EK")
        platform = issue_platform_certificate(self.ca_key, self.credential.certificate, first_key)
        status = await self._call(
            record.instance_id,
            admin.Certify(ek_certificates=certs, platform_certificate=platform),
            failed="EK certification failed",
        )
        record.ek = list(certs)
        record.ek_certificates = {alg: der.hex() for alg, der in certs.items()}
        return status

    async def destroy(self, name: str) -> k1.Done:
        record = self._record(name)
        try:
            await self._call(record.instance_id, admin.Destroy())
        except _UNREACHABLE as exc:
            # An instance that cannot be reached (dead, refusing its state)
            # is still destroyed: hostd removes its files below.
            log.log("manager.destroy_unreachable", vm=name, reason=str(exc))
        await self._stop(record.instance_id, erase=True)
        del self.registry.instances[name]
        self.store.save(self.registry)
        log.log("manager.instance_destroyed", vm=name, instance=record.instance_id)
        return k1.Done()

    async def describe(self, record: InstanceRecord) -> k1.InstanceInfo:
        host = await self._control(control.QueryInstance(record.instance_id))
        if isinstance(host, Refused):
            host = control.InstanceProcess(alive=False, pid=None, reason=host.error)
        status: admin.InstanceStatus | None = None
        if host.alive:
            try:
                status = await self._call(record.instance_id, admin.GetStatus())
                state, reason = status.state, status.reason
            except _UNREACHABLE as exc:
                state, reason = "error", f"unreachable: {exc}"
        else:
            state, reason = "stopped", host.reason
        return k1.InstanceInfo(
            name=record.name,
            instance_id=record.instance_id,
            pcr_banks=tuple(record.pcr_banks),
            ek=tuple(record.ek),
            created=record.created,
            state=state,
            mrenclave=record.mrenclave,
            mrsigner=record.mrsigner,
            ek_certificates=dict(record.ek_certificates),
            pid=host.pid,
            alive=host.alive,
            reason=reason,
            endpoint_pid=status.endpoint_pid if status is not None else None,
            endpoint=status.endpoint if status is not None else "",
            endpoint_since=status.endpoint_since if status is not None else 0.0,
        )

    # -- helpers ------------------------------------------------------------
    def _records(self) -> list[InstanceRecord]:
        return sorted(self.registry.instances.values(), key=lambda r: r.name)

    def _record(self, name: object) -> InstanceRecord:
        record = self.registry.instances.get(str(name))
        if record is None:
            raise ManagerError(f"no VM named {name!r}")
        return record

    async def _control(self, request: Request[_R]) -> _R | Refused:
        assert self.mux is not None
        return await control_call(self.mux, request)

    async def _launch(self, instance_id: str) -> control.Launched:
        reply = await self._control(
            control.LaunchInstance(instance_id, self.credential.cert_pem.decode())
        )
        if isinstance(reply, Refused):
            raise ManagerError(f"the loader could not launch the instance: {reply.error}")
        return reply

    async def _stop(self, instance_id: str, erase: bool = False) -> None:
        await self._control(control.StopInstance(instance_id, erase=erase))

    async def _call(
        self, instance_id: str, request: Request[_R], failed: str = "the instance refused"
    ) -> _R:
        """One request over an attested session to an instance enclave (both quotes checked);
        ManagerError(``failed``: why) if the instance refuses it or answers nonsense."""
        assert self.mux is not None
        client = ClientSession(
            peer_policy(self.platform.identity.mrsigner, "instance"),
            self.verifier,
            self.as_client,
            expected_cn=instance_id,
        )
        session = await asyncio.wait_for(self.mux.open(instance_id, client), CALL_TIMEOUT)
        try:
            await session.send(admin.encode_request(request))
            reply = admin.decode_reply(
                request, await asyncio.wait_for(session.recv(), CALL_TIMEOUT)
            )
        except EOFError:
            raise ManagerError("the instance closed the session") from None
        except admin.AdminProtocolError as exc:
            raise ManagerError(f"{failed}: {exc}") from None
        finally:
            await session.close()
        if isinstance(reply, Refused):
            raise ManagerError(f"{failed}: {reply.error}")
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


async def control_call(mux: RelayMux, request: Request[_R]) -> _R | Refused:
    """Ask hostd ``request`` over CONTROL; its reply (ControlProtocolError if malformed)."""
    return control.reply_from_json(request, await mux.control(control.request_to_json(request)))


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
            await asyncio.wait_for(control_call(mux, control.ManagerRefused(reason)), 10)
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
    except DirectoryBusyError as exc:
        # The previous manager is still finishing: hostd relaunches us later.
        log.log("manager.state_busy", reason=str(exc))
        raise SystemExit(4) from None
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
        await control_call(mux, control.ManagerReady())

    asyncio.run(runtime.run(after_start))
