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
import contextlib
import datetime
import hmac
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
from sgxvtpm.enclaves import portable
from sgxvtpm.enclaves.ekcert import (
    DEFAULT_MANUFACTURER,
    DEFAULT_MODEL,
    DEFAULT_VERSION,
    TpmSpecification,
    issue_ek_certificate,
    issue_platform_certificate,
)
from sgxvtpm.enclaves.fleet import FleetError, FleetState, accepted_peer
from sgxvtpm.enclaves.migration import VM_STATES as migration_states
from sgxvtpm.enclaves.registry import VM_CN_PREFIX, InstanceRecord, RegistryStore, check_vm_name
from sgxvtpm.enclaves.runtime import EnclaveRuntime, platform_verifier
from sgxvtpm.enclaves.sealing import SealError
from sgxvtpm.enclaves.specs import peer_policy
from sgxvtpm.enclaves.state import DirectoryBusyError, lock_directory
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.mux.aio import RelayMux
from sgxvtpm.platform.base import EnclavePlatform, QuoteVerifier, VerifiedQuote
from sgxvtpm.platform.tpm_counters import CountersRefused, open_host_counters
from sgxvtpm.tpm.ek import public_key_from_tpmt
from sgxvtpm.util import log
from sgxvtpm.wire import admin, control, k1
from sgxvtpm.wire import fleet as fleetwire
from sgxvtpm.wire.jsonmsg import Done, Refused, Reply, Request

FLEET_IN = "fleet"  # hostd's label of a session from its fleet port (host/switch.py)
# An instance answers in milliseconds; RSA EK generation at create takes well
# under a second. A dead or wedged instance must not hold the manager longer.
CALL_TIMEOUT = 20.0
# How often the manager looks whether an incoming VM runs here yet (to tell its source).
MIGRATION_POLL = 0.5


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
            platform, k1.CA_COMMON_NAME, key=self.ca_key, is_ca=True
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
        try:
            self.fleet = FleetState.from_json(self.registry.fleet)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SealError(f"manager registry holds a malformed fleet: {exc}") from None
        self._platform_id = ""
        # VM name -> (monotonic time of the next report attempt, last delay).
        self._report_due: dict[str, tuple[float, float]] = {}

    # -- sessions ------------------------------------------------------------
    def new_session(self, source: str = "") -> ServerSession:
        if source == FLEET_IN:
            # Another manager, through hostd --fleet-listen: anonymous to TLS, it
            # proves itself in its Join (enclaves/fleet.py). The label is the
            # host's word only: a session of either kind gets nothing without
            # its own proof (operator key, or token and attested evidence).
            return ServerSession(self.credential, ClientTrust([], in_band=True))
        trust = ClientTrust(
            anchors_pem=[self.registry.operator_cert_pem.encode()],
            pinned_spki_sha256=frozenset({self.operator_spki}),
        )
        return ServerSession(self.credential, trust)

    async def handle(self, peer: PeerCertificate, data: bytes) -> bytes:
        if peer.spki_sha256 == b"" and peer.cert_der == b"":
            return await self.handle_fleet(data)
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
        if isinstance(request, k1.GetCaCertificate):
            return k1.CaCertificate(self.credential.cert_pem.decode())
        if isinstance(request, k1.MigrateVm):
            return await self.migrate(request)
        if isinstance(request, k1.MigrateCancel):
            record = self._record(request.name)
            await self._call(record.instance_id, admin.CancelMigration())
            log.log("manager.migration_cancelled", vm=record.name, was=record.migration)
            record.migration = {}
            self.store.save(self.registry)
            return k1.Shown(await self.describe(record))
        return await self.dispatch_fleet(request)

    # -- the fleet (docs/ARCHITECTURE.md, "Many hosts"; enclaves/fleet.py) -----
    @property
    def platform_id(self) -> str:
        """This platform's id, as our own quote shows it (what other members call us)."""
        if not self._platform_id:
            quote = self.platform.quote(bytes(64))
            self._platform_id = self.verifier.verify(quote).platform_id.hex()
        return self._platform_id

    def _save_fleet(self) -> None:
        self.registry.fleet = self.fleet.to_json() if self.fleet.member else {}
        self.store.save(self.registry)

    async def dispatch_fleet(self, request: k1.K1Request) -> Reply:
        try:
            if isinstance(request, k1.FleetInvite):
                token, expires = self.fleet.invite(
                    self.platform_id, self.platform.identity, request.address, time.time()
                )
                self._save_fleet()
                log.log("manager.fleet_invited", fleet=self.fleet.fleet_id, expires=expires)
                return k1.FleetInvitation(token=token, expires=expires)
            if isinstance(request, k1.FleetJoin):
                await self._join(request)
            elif isinstance(request, k1.FleetLeave):
                log.log("manager.fleet_left", fleet=self.fleet.fleet_id)
                self.fleet.leave()
                self._save_fleet()
            elif isinstance(request, k1.FleetRemove):
                self.fleet.remove(request.member, self.platform_id)
                self._save_fleet()
                log.log("manager.fleet_removed", member=request.member)
        except FleetError as exc:
            raise ManagerError(str(exc)) from None
        return k1.FleetStatus(self.fleet.info(self.platform_id))

    async def _fleet_call(self, host: str, port: int, request: Request[_R]) -> _R | Refused:
        """One request to the manager behind the fleet port ``host``:``port``, after
        checking its quote (our root, signer, manager product, our MRENCLAVE)."""
        dialled = await self._control(control.FleetDial(host, port))
        if isinstance(dialled, Refused):
            raise FleetError(dialled.error)
        assert self.mux is not None
        client = self._client_to("manager", k1.CA_COMMON_NAME)
        try:
            session = await asyncio.wait_for(self.mux.open(dialled.target, client), CALL_TIMEOUT)
        except (ChannelError, ConnectionError, TimeoutError, EOFError) as exc:
            raise FleetError(f"the fleet member at {host}:{port} "
                             f"is refused or unreachable: {exc}") from None
        try:
            peer = session.peer
            if not isinstance(peer, VerifiedQuote):
                raise FleetError("the fleet member is not attested")
            why = accepted_peer(self.platform.identity, peer.identity)
            if why is not None:
                raise FleetError(f"the fleet member is refused: {why}")
            await session.send(fleetwire.encode_request(request))
            return fleetwire.decode_reply(
                request, await asyncio.wait_for(session.recv(), CALL_TIMEOUT)
            )
        except (ChannelError, ConnectionError, TimeoutError, EOFError) as exc:
            raise FleetError(f"the fleet member closed the session: {exc}") from None
        except fleetwire.FleetProtocolError as exc:
            raise FleetError(f"the fleet member answered nonsense: {exc}") from None
        finally:
            await session.close()

    async def _join(self, request: k1.FleetJoin) -> None:
        if self.fleet.member:
            raise FleetError(
                f"this manager is in fleet {self.fleet.fleet_id} already: fleet leave first"
            )
        evidence = self.credential.certificate.public_bytes(serialization.Encoding.DER)
        join = fleetwire.Join(token=request.token, evidence=evidence, address=request.address)
        reply = await self._fleet_call(request.host, request.port, join)
        if isinstance(reply, Refused):
            raise FleetError(f"the fleet member refused the join: {reply.error}")
        self.fleet.joined(request.token, reply, self.ca_key)
        if reply.member_id != self.platform_id:
            self.fleet.leave()
            raise FleetError("the fleet member recorded another platform id for this host")
        self._save_fleet()
        log.log("manager.fleet_joined", fleet=self.fleet.fleet_id,
                members=len(self.fleet.members))
        for record in self._records():
            try:
                await self._push_blob_key(record)
            except _UNREACHABLE as exc:
                # Its next start (manager restore) gives it the key again.
                log.log("manager.blob_key_failed", vm=record.name, reason=str(exc))

    async def _push_blob_key(self, record: InstanceRecord) -> admin.InstanceStatus | None:
        """Give the VM's instance its per-VM fleet key (portable state blobs)."""
        if not self.fleet.member:
            return None
        return await self._call(
            record.instance_id,
            admin.SetBlobKey(
                key=self.fleet.vm_key(record.name), vm=record.name, origin=self.platform_id
            ),
            failed="the instance did not take its fleet key",
        )

    # -- migrations: the destination tells the source (docs/ARCHITECTURE.md) -----
    async def watch_migrations(self) -> None:
        """Until the enclave ends: tell each incoming VM's source once it runs here."""
        while True:
            await asyncio.sleep(MIGRATION_POLL)
            if not any(r.migration.get("phase") == "incoming" for r in self._records()):
                continue
            async with self.lock:
                for record in self._records():
                    due = self._report_due.get(record.name, (0.0, 0.0))
                    if record.migration.get("phase") != "incoming" or time.monotonic() < due[0]:
                        continue
                    try:
                        await self._check_incoming(record)
                    except (*_UNREACHABLE, FleetError, SealError, OSError, ValueError) as exc:
                        # Back off (up to a minute): an unreachable source must not
                        # hold the manager's lock every poll; and a failure here
                        # never ends the manager (it serves the operator meanwhile).
                        delay = min(60.0, max(1.0, due[1] * 2))
                        self._report_due[record.name] = (time.monotonic() + delay, delay)
                        log.log("manager.migration_report_failed", vm=record.name,
                                reason=str(exc), retry_in=delay)
                    else:
                        self._report_due.pop(record.name, None)

    async def _check_incoming(self, record: InstanceRecord) -> None:
        status = await self._call(record.instance_id, admin.GetStatus())
        if not status.imported:
            return
        member = self.fleet.members.get(status.origin, {})
        address = str(member.get("address", ""))
        moved = fleetwire.Moved(
            vm=record.name,
            version=status.imported,
            to=self.platform_id,
            proof=self.fleet.moved_proof(record.name, status.imported, self.platform_id),
        )
        if status.origin != self.platform_id:
            if not address:
                raise FleetError(f"the source platform {status.origin} has no fleet address")
            host, _, port = address.rpartition(":")
            reply = await self._fleet_call(host.strip("[]"), int(port), moved)
            if isinstance(reply, Refused):
                raise FleetError(f"the source refused: {reply.error}")
        record.migration = {"phase": "in", "from": status.origin, "version": status.imported}
        record.state = status.state
        self.store.save(self.registry)
        log.log("manager.migration_completed", vm=record.name, source=status.origin,
                version=status.imported)

    async def migrate(self, request: k1.MigrateVm) -> k1.Shown:
        """A cold move: the stopped TPM's portable blobs to the member at host:port."""
        record = self._record(request.name)
        if not self.fleet.member:
            raise ManagerError("this host is not in a fleet (sgxvtpm fleet join)")
        exported = await self._call(record.instance_id, admin.ExportState(),
                                    failed="the instance did not export its state")
        move = fleetwire.Move(
            vm=record.name,
            origin=self.platform_id,
            blobs=exported.blobs,
            proof=self.fleet.move_proof(record.name, self.platform_id, exported.blobs),
        )
        try:
            reply = await self._fleet_call(request.host, request.port, move)
        except FleetError as exc:
            raise ManagerError(str(exc)) from None
        if isinstance(reply, Refused):
            raise ManagerError(f"the destination refused the VM: {reply.error}")
        version = portable_version(exported.blobs)
        await self._call(record.instance_id, admin.MarkMigrated(version, reply.to))
        record.migration = {"phase": "out", "to": reply.to, "version": version}
        self.store.save(self.registry)
        log.log("manager.migrated_out", vm=record.name, to=reply.to, version=version)
        return k1.Shown(await self.describe(record))

    async def _move_in(self, request: fleetwire.Move) -> Reply:
        record = self.registry.instances.get(request.vm)
        if record is None or record.migration.get("phase") != "incoming":
            raise FleetError(
                f"no incoming VM named {request.vm!r} here (vm create {request.vm} --incoming)"
            )
        expected = self.fleet.move_proof(request.vm, request.origin, request.blobs)
        if not hmac.compare_digest(expected, request.proof):
            raise FleetError("the move is not from a member of this fleet")
        status = await self._call(record.instance_id, admin.ImportState(request.blobs),
                                  failed="the VM's instance refused the state")
        record.migration = {"phase": "in", "from": request.origin, "version": status.imported}
        record.state = status.state
        log.log("manager.migration_completed", vm=record.name, source=request.origin,
                version=status.imported)
        return fleetwire.MovedIn(to=self.platform_id)

    async def _moved(self, request: fleetwire.Moved) -> Reply:
        record = self.registry.instances.get(request.vm)
        if record is None:
            raise FleetError(f"no VM named {request.vm!r} here")
        expected = self.fleet.moved_proof(request.vm, request.version, request.to)
        if not hmac.compare_digest(expected, request.proof):
            raise FleetError("the migration report is not from a member of this fleet")
        try:
            await self._call(record.instance_id, admin.MarkMigrated(request.version, request.to))
        except _UNREACHABLE as exc:
            raise FleetError(f"the VM's instance did not take it: {exc}") from None
        record.migration = {"phase": "out", "to": request.to, "version": request.version}
        log.log("manager.migrated_out", vm=record.name, to=request.to, version=request.version)
        return Done()

    async def handle_fleet(self, data: bytes) -> bytes:
        """A request of another manager on a fleet session (wire/fleet.py)."""
        reply: Reply | Refused
        try:
            request = fleetwire.decode_request(data)
        except fleetwire.FleetProtocolError as exc:
            return fleetwire.encode_reply(Refused(str(exc)))
        async with self.lock:
            try:
                if isinstance(request, fleetwire.Moved):
                    reply = await self._moved(request)
                elif isinstance(request, fleetwire.Move):
                    reply = await self._move_in(request)
                else:
                    reply = self.fleet.admit(
                        request, self.platform.identity, self.verifier, time.time()
                    )
                    log.log("manager.fleet_admitted", member=reply.member_id)
            except (FleetError, ManagerError) as exc:
                log.log("manager.fleet_request_refused", op=request.OP, reason=str(exc))
                reply = Refused(str(exc))
            # A join's token is burnt whatever the outcome; a move is recorded:
            # sealed before the answer leaves.
            self._save_fleet()
        return fleetwire.encode_reply(reply)

    # -- the flows of docs/ARCHITECTURE.md, "Flows" ----------------------------
    async def restore(self) -> None:
        """After a (re)start: relaunch every instance; each unseals its own state."""
        for record in self._records():
            try:
                await self._launch(record.instance_id)
                record.state = (await self._call(record.instance_id, admin.GetStatus())).state
                if record.state in migration_states:
                    await self._push_blob_key(record)
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
        if request.incoming and not self.fleet.member:
            raise ManagerError(
                "an incoming VM needs this host in a fleet (sgxvtpm fleet join): its state"
                " comes from another member"
            )
        launched = await self._launch(record.instance_id)
        # All or nothing: whatever fails after the launch (provisioning, certification,
        # the registry's save, the VM's certificate) stops and erases the instance and
        # leaves no registration, so the name is free again.
        try:
            if request.incoming:
                status = await self._call(
                    record.instance_id,
                    admin.ProvisionIncoming(
                        vm_id=name,
                        vm_spki_sha256=bytes.fromhex(record.vm_spki_sha256),
                        pcr_banks=tuple(record.pcr_banks),
                    ),
                    failed="provisioning failed",
                )
                record.ek = []
                record.migration = {"phase": "incoming"}
            else:
                status = await self._manufacture(record)
            status = await self._push_blob_key(record) or status
            record.state = status.state
            record.mrenclave = status.mrenclave
            record.mrsigner = status.mrsigner
            vm_cert_pem = self._issue_vm_certificate(name, vm_key)
            self.registry.instances[name] = record
            try:
                self.store.save(self.registry)
            except OSError as exc:
                raise ManagerError(f"the manager's registry could not be saved: {exc}") from None
            created = k1.Created(
                instance=await self.describe(record, known=(launched.pid, status)),
                vm_cert_pem=vm_cert_pem,
                ca_cert_pem=self.credential.cert_pem.decode(),
            )
        except BaseException as exc:
            await self._undo_create(record, exc)
            raise
        log.log("manager.instance_created", vm=name, instance=record.instance_id,
                pid=launched.pid)
        return created

    async def _undo_create(self, record: InstanceRecord, exc: BaseException) -> None:
        log.log("manager.create_undone", vm=record.name, instance=record.instance_id,
                reason=str(exc) or type(exc).__name__)
        if self.registry.instances.get(record.name) is record:
            del self.registry.instances[record.name]
            with contextlib.suppress(SealError, OSError):
                self.store.save(self.registry)
        await self._stop(record.instance_id, erase=True)

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
        # The TPM's own manufacturer, model and version (tpm/ek.py, certificate_attributes);
        # an older instance sends none, and gets the defaults.
        manufacturer = tpm.manufacturer or DEFAULT_MANUFACTURER
        model = tpm.model or DEFAULT_MODEL
        version = tpm.version or DEFAULT_VERSION
        certs: dict[str, bytes] = {}
        first_key = None
        for ek in provisioned.eks:
            # TPM2B_PUBLIC: a u16 size, then the TPMT_PUBLIC the EK certificate is for.
            key = public_key_from_tpmt(ek.public_area[2:])
            first_key = first_key or key
            certs[ek.alg] = issue_ek_certificate(
                self.ca_key, self.credential.certificate, key, spec=spec,
                manufacturer=manufacturer, model=model, version=version,
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

    async def describe(
        self, record: InstanceRecord, known: tuple[int, admin.InstanceStatus] | None = None
    ) -> k1.InstanceInfo:
        """VM ``record`` as it is now; ``known``: its process and the status it answered
        just now (create), which are not asked again."""
        status: admin.InstanceStatus | None = None
        if known is not None:
            host = control.InstanceProcess(alive=True, pid=known[0])
            status = known[1]
        else:
            reply = await self._control(control.QueryInstance(record.instance_id))
            host = (control.InstanceProcess(alive=False, pid=None, reason=reply.error)
                    if isinstance(reply, Refused) else reply)
        state, reason = "stopped", host.reason
        if status is None and host.alive:
            try:
                status = await self._call(record.instance_id, admin.GetStatus())
            except _UNREACHABLE as exc:
                state, reason = "error", f"unreachable: {exc}"
        if status is not None:
            state, reason = status.state, status.reason
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

    def _client_to(self, role: str, common_name: str) -> ClientSession:
        """A client session to an enclave of this release in ``role``, named ``common_name``."""
        return ClientSession(
            peer_policy(self.platform.identity.mrsigner, role),
            self.verifier,
            self.as_client,
            expected_cn=common_name,
        )

    async def _call(
        self, instance_id: str, request: Request[_R], failed: str = "the instance refused"
    ) -> _R:
        """One request over an attested session to an instance enclave (both quotes checked);
        ManagerError(``failed``: why) if the instance refuses it or answers nonsense."""
        assert self.mux is not None
        client = self._client_to("instance", instance_id)
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


def portable_version(blobs: Mapping[str, bytes]) -> int:
    """The export version of a set of portable blobs (all of one export)."""
    versions = {portable.parse_header(blob)[0].version for blob in blobs.values()}
    if len(versions) != 1:
        raise ManagerError(f"the exported blobs are of several versions {sorted(versions)}")
    return versions.pop()


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
    # Host TPM counters when hostd relays a host TPM (platform/tpm_counters.py).
    try:
        platform, stream, tap = open_host_counters(platform, stream, args)
    except CountersRefused as exc:
        # Its state's counters are in a host TPM it cannot reach, or its pin is gone.
        log.log("manager.counters_refused", reason=str(exc))
        _tell_host_refused(exc.stream, str(exc))
        if exc.tap is not None:
            exc.tap.close()
        raise SystemExit(3) from None
    try:
        _serve(platform, stream, args)
    finally:
        if tap is not None:
            tap.close()


def _serve(platform: EnclavePlatform, stream: socket.socket, args: Mapping[str, Any]) -> None:
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
        await manager.watch_migrations()

    asyncio.run(runtime.run(after_start))
