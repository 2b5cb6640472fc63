"""The instance enclave (E2..En): one VM's vTPM, libtpms inside, state sealed.

Who may talk to it (SECURITY.md property 14), decided by the client
certificate's key:
- the manager (its CA certificate is the trust anchor; its key is pinned):
  provisioning, status, EK manufacturing, destroy;
- the VM bound at creation (a certificate the manager's CA issued for the
  VM's key, pinned by SPKI): vTPM requests (sgxvtpm.wire.vtpm), from one
  session at a time (:class:`EndpointSeat`).

An instance whose sealed state is refused (tampered, foreign, rolled back)
stays up in the ``error`` state: it tells the manager why and serves no VM.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sgxvtpm.channel import (
    ClientTrust,
    EnclaveCredential,
    ServerSession,
    spki_sha256,
    verify_enclave_certificate,
    warmup,
)
from sgxvtpm.enclaves import migration
from sgxvtpm.enclaves.blobcipher import SealedBlobCipher
from sgxvtpm.enclaves.loop import InstanceLoop, Session
from sgxvtpm.enclaves.resume import (
    COMMAND_AUDIT_DEFAULT,
    QUIET,
    RECORD,
    REPLAYED,
    QuietCommands,
    ResumeRecord,
    ResumeSlots,
    decide,
    new_epoch,
    replay_check,
)
from sgxvtpm.enclaves.runtime import platform_verifier
from sgxvtpm.enclaves.sealing import SealError
from sgxvtpm.enclaves.specs import peer_policy
from sgxvtpm.enclaves.state import EngineStoreAdapter, SealedStateStore, lock_directory
from sgxvtpm.enclaves.vtpm_core import VtpmCore
from sgxvtpm.platform.base import EnclaveIdentity, EnclavePlatform, QuoteVerifier
from sgxvtpm.platform.tpm_counters import open_host_counters
from sgxvtpm.tpm import ek as ekmod
from sgxvtpm.tpm import wire as tpmwire
from sgxvtpm.tpm.constants import TPM2_CC, TPM2_RC, TPM2_SU
from sgxvtpm.tpm.engine import EngineError, EngineMisuseError, LibtpmsEngine
from sgxvtpm.tpm.nv import execute
from sgxvtpm.util import log
from sgxvtpm.wire import admin, vtpm
from sgxvtpm.wire.jsonmsg import Refused, Reply
from sgxvtpm.wire.resume import (
    REPLAY_MAX_BYTES,
    REPLAY_MAX_REQUESTS,
    AttachReply,
    ResumeToken,
    encode_attach_reply,
    token_of,
)
from sgxvtpm.wire.vtpm import (
    ATTACH_FLAG_TAKEOVER,
    TpmResult,
    VtpmOp,
    VtpmProtocolError,
    VtpmRequest,
    VtpmResponse,
)

_ABOUT_TEXT = 120  # characters kept of an endpoint's description of itself
#: Exit status of an instance interrupted while committing a request's state
#: (not an I/O error: those answer a TPM failure): it must not answer.
EXIT_COMMIT_FAILED = 75
_SHUTDOWN = int(TPM2_CC.Shutdown)  # read per request: a module int, not an Enum member


class EndpointSeat:
    """Which authenticated session of the VM is its endpoint: one at a time.

    A TPM has one platform: whoever holds the seat can reset it (INIT) and
    sees every PCR the VM measured. swtpm refuses a second process on the
    same state; here the rule lives in the enclave, the only place that knows
    every authenticated session, so a client that skips the endpoint process
    cannot get around it. A VM session must ATTACH before anything else;
    ATTACH is refused while another live session holds the seat unless it
    asks for a takeover, which ends that session. The loop reports every
    session that ends (:meth:`closed`), so an endpoint that died or
    disconnected never blocks the VM and can come back.
    """

    def __init__(self) -> None:
        self.holder: Session | None = None
        self.about: dict[str, Any] = {}
        #: Ends a session (the loop's): set once the loop exists.
        self.end_session: Callable[[Session], None] | None = None

    def attach(self, session: Session, request: VtpmRequest) -> VtpmResponse:
        holder = self.holder
        if holder is not None and holder is not session:
            if not request.flags & ATTACH_FLAG_TAKEOVER:
                log.log("instance.endpoint_refused", held_by=self.about)
                return self.refusal()
            log.log("instance.endpoint_replaced", previous=self.about)
            if self.end_session is not None:
                self.end_session(holder)  # calls closed(holder)
            self.holder = None
        self.holder = session
        # The endpoint's word (pid, what it serves) is only shown to the next
        # endpoint that is refused; the time is the enclave's own.
        self.about = {**_describe(request.data), "since": round(time.time())}
        log.log("instance.endpoint_attached", **self.about)
        return VtpmResponse.ok()

    def refusal(self) -> VtpmResponse:
        """The answer to a session that is not the endpoint: TPM_RESOURCES while
        another holds the seat (with who and since when), TPM_BAD_ORDINAL before ATTACH."""
        if self.holder is None:
            return VtpmResponse.error(TpmResult.BAD_ORDINAL)
        return VtpmResponse(TpmResult.RESOURCES, json.dumps(self.about).encode())

    def closed(self, session: Session) -> None:
        if session is self.holder:
            log.log("instance.endpoint_detached", **self.about)
            self.holder, self.about = None, {}


def _describe(info: bytes) -> dict[str, Any]:
    """The fields of an ATTACH description worth keeping (a pid, a short text)."""
    try:
        claimed = json.loads(info.decode("utf-8")) if info else {}
    except (UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(claimed, dict):
        return {}
    about: dict[str, Any] = {}
    pid = claimed.get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31:
        about["pid"] = pid
    text = claimed.get("endpoint")
    if isinstance(text, str):
        about["endpoint"] = "".join(c for c in text if c.isprintable())[:_ABOUT_TEXT]
    return about


class InstanceEnclave:
    def __init__(self, platform: EnclavePlatform, args: Mapping[str, Any]) -> None:
        self.platform = platform
        self.instance_id = str(args["instance_id"])
        manager_cert = x509.load_pem_x509_certificate(str(args["manager_cert_pem"]).encode())
        # The manager's certificate came through the untrusted host: trust it
        # only once its quote shows the manager of our own signer (SECURITY.md
        # property 13).
        verify_enclave_certificate(
            manager_cert.public_bytes(Encoding.DER),
            peer_policy(platform.identity.mrsigner, "manager"),
            platform_verifier(platform, args),
        )
        self.manager_cert_pem = str(args["manager_cert_pem"]).encode()
        self.manager_spki = spki_sha256(manager_cert)
        state_dir = Path(args["state_dir"])
        self._lock = lock_directory(state_dir)
        self.store = SealedStateStore(platform, self.instance_id, state_dir / "state.sealed")
        self.credential = EnclaveCredential.create(platform, self.instance_id)
        self.state = "unprovisioned"
        self.reason = ""
        self.vm_spki: bytes | None = None
        self.core: VtpmCore | None = None
        self.seat = EndpointSeat()
        self._manufacturing: LibtpmsEngine | None = None
        self.slots = ResumeSlots(platform, self.instance_id, state_dir)
        #: The record of the seat holder's last recorded request (None: none since
        #: this process started; then a resume reads the sealed ones). Every
        #: request after it, up to ``_seq``, was quiet and left it as it is.
        self._live: ResumeRecord | None = None
        self._seq = 0  # the seat holder's requests answered in its epoch
        self._unsaved = False  # the slot write of ``_live`` failed: write the next one
        # The requests the endpoint keeps since ``_live`` (none recorded), their
        # bytes, whether one changed the VOLATILE state, and the last answer.
        self._unrecorded = 0
        self._unrecorded_bytes = 0
        self._changed = False
        self._answer = b""
        self._quiet = QuietCommands(command_audit_default=False)  # set by _new_core
        if self.store.exists():
            self._restore()
        else:
            self._check_never_provisioned()

    # -- state ---------------------------------------------------------------
    def _check_never_provisioned(self) -> None:
        """No state file: unprovisioned only if this instance never wrote one.

        Its counter is created with the state file and survives it, so a counter
        without the file means the file was deleted (or lost). Reporting that as
        "unprovisioned" would hide the tampering and invite provisioning a fresh
        TPM under the VM's name.
        """
        counter = self.store.file.counter_value()
        if not counter:  # never created, or its creation never completed
            return
        self.state = "error"
        self.reason = (
            f"sealed state file is missing but its platform counter is at {counter}:"
            " removed (tampering) or lost; restore state.sealed from a backup or destroy the VM"
        )
        log.log("instance.state_refused", instance=self.instance_id, reason=self.reason)

    def _restore(self) -> None:
        try:
            bundle = self.store.load()
        except SealError as exc:
            self.state, self.reason = "error", str(exc)
            log.log("instance.state_refused", instance=self.instance_id, reason=str(exc))
            return
        prov = bundle.provisioning
        if prov.get("instance_id") != self.instance_id:
            self.state, self.reason = "error", "sealed state names another instance"
            return
        if bytes.fromhex(prov.get("manager_spki", "")) != self.manager_spki:
            self.state, self.reason = "error", "sealed state was provisioned by another manager"
            return
        self.vm_spki = bytes.fromhex(prov["vm_spki_sha256"])
        self.core = self._new_core()
        self.state = migration.state_of(prov)
        log.log("instance.restored", instance=self.instance_id, version=self.store.file.version)

    def _new_core(self) -> VtpmCore:
        adapter = EngineStoreAdapter(self.store)
        self.store.deferred = True  # one commit per request, with its resume record
        audit = self.store.bundle.provisioning.get("command_audit")
        self._quiet = QuietCommands(command_audit_default=audit == COMMAND_AUDIT_DEFAULT)
        return VtpmCore(
            lambda: LibtpmsEngine(adapter),
            SealedBlobCipher(self.platform, self.instance_id, self.store),
        )

    def trust(self) -> ClientTrust:
        pins = {self.manager_spki}
        if self.vm_spki is not None and self.state in migration.VM_STATES:
            pins.add(self.vm_spki)
        return ClientTrust(anchors_pem=[self.manager_cert_pem], pinned_spki_sha256=frozenset(pins))

    def new_session(self) -> ServerSession:
        return ServerSession(self.credential, self.trust())

    def serve(self, stream: socket.socket) -> None:
        """Serve sessions until the host closes ``stream``."""
        loop = InstanceLoop(stream, self.new_session, self.handle, on_close=self.seat.closed)
        self.seat.end_session = loop.end
        loop.run()

    # -- requests ------------------------------------------------------------
    def handle(self, session: Session, data: bytes) -> bytes:
        peer = session.peer
        if peer is None:  # the loop passes only authenticated sessions
            raise PermissionError("not authenticated")
        if peer.spki_sha256 == self.manager_spki:
            return admin.encode_reply(self.answer_manager(data))
        if self.core is None or peer.spki_sha256 != self.vm_spki:
            raise PermissionError("not the bound VM")
        if session is not self.seat.holder:
            return vtpm.encode_response(self._not_attached(session, data))
        command = vtpm.tpm_command_of(data)
        if self.state == "migrated":
            response = migration.refuse(self.store.bundle.provisioning)
        else:
            response = self.core.answer(data, command)
        live = self._live
        assert live is not None  # set by every ATTACH that gives the seat
        self._seq = seq = self._seq + 1
        kind = self._quiet.kind_of(command[0] if command is not None else None, response)
        if not self._quiet.command_audit_default:
            self.store.bundle.provisioning.pop("command_audit", None)  # with the next commit
        kept = len(data) if kind == REPLAYED else None
        if kind != RECORD and self._may_skip_record(live, kept):
            if kept is not None:
                self._unrecorded += 1
                self._unrecorded_bytes += kept
                self._changed = True
            self._answer = response
            return vtpm.unrecorded(response, keep=kept is not None)
        if self._record(live.epoch, seq, response, kind == QUIET and not self._changed):
            return response
        # Its change could not be made durable: an error answer, recorded as such.
        if command is not None:
            response = vtpm.encode_tpm_response(tpmwire.error_response(TPM2_RC.FAILURE))
        else:
            response = vtpm.encode_response(VtpmResponse.error(TpmResult.IOERROR))
        self._record(live.epoch, seq, response)
        return response

    def _may_skip_record(self, live: ResumeRecord, kept: int | None) -> bool:
        """After a request QuietCommands lets go unrecorded (``kept``: the size of one
        the endpoint must keep for a resume to run again; None: a quiet one): True
        if a resume from ``live``, the last record, and the kept requests since it
        brings the TPM back as it is now, so none is written (the answer says so).

        Not when NV changed (the commit carries a record), when the TPM was not
        running, when ``live`` never reached its slot file (a failed write), when
        the last command code that record keeps matters (None or TPM2_Shutdown
        decide whether a later INIT sends a Shutdown: VtpmCore._orderly_shutdown),
        or when the endpoint's token would keep more than a resume runs again
        (REPLAY_MAX_REQUESTS, REPLAY_MAX_BYTES).
        """
        return (
            live.running and not self.store.dirty and not self._unsaved
            and live.last_code is not None and live.last_code != _SHUTDOWN
            and (kept is None or (
                self._unrecorded < REPLAY_MAX_REQUESTS
                and self._unrecorded_bytes + kept <= REPLAY_MAX_BYTES))
        )  # fmt: skip

    # -- resume (sgxvtpm/enclaves/resume.py) ----------------------------------
    def _record(self, epoch: str, seq: int, response: bytes, unchanged: bool = False) -> bool:
        """Record the core after request ``seq`` before its response leaves: with the
        NV commit if the request changed NV, else in a slot file.

        False if the commit failed (a full or failing disk): the bundle is rolled
        back, the TPM is in failure mode (:meth:`VtpmCore.fail`) and ``response``
        must not leave; record the error answer instead. Failing stop here
        instead would turn a full disk into a crash loop of resends.

        ``unchanged``: the TPM's VOLATILE state is the last record's
        (resume.QuietCommands), which is not read again.
        """
        assert self.core is not None
        store = self.store
        previous = self._live
        self._unrecorded = self._unrecorded_bytes = 0
        self._changed = False
        if (
            unchanged and previous is not None and previous.running and not store.dirty
            and previous.epoch == epoch  # every request since it was quiet (_still_recorded)
        ):  # fmt: skip
            running, volatile, last_code = self.core.snapshot(previous.volatile)
        else:
            running, volatile, last_code = self.core.snapshot()
        version = store.file.version + (1 if store.dirty else 0)
        record = ResumeRecord(epoch, seq, version, running, volatile, last_code, response)
        self._live = record
        if store.dirty:
            try:
                store.flush(record.encode())
            except Exception as exc:
                log.log("instance.commit_failed", instance=self.instance_id, reason=str(exc))
                store.rollback()
                self.core.fail()
                return False
            except BaseException:  # never answer for a change that is not durable
                os._exit(EXIT_COMMIT_FAILED)
            self._unsaved = False
            return True
        try:
            self.slots.write(record)
        except OSError as exc:  # only a later resume suffers: it will be refused
            log.log("instance.resume_record_failed", instance=self.instance_id,
                    reason=str(exc))
            self._unsaved = True  # until a record is written, none is skipped
        else:
            self._unsaved = False
        return True

    def _attached(self, request: VtpmRequest) -> VtpmResponse:
        """The ATTACH reply for the new seat holder: a new epoch, or the resumed one."""
        reason = ""
        try:
            token = token_of(request.data)
        except VtpmProtocolError as exc:
            token, reason = None, f"invalid resume token: {exc}"
        if token is not None:
            found = self._resume(token)
            if not isinstance(found, str):
                record, seq, replay = found
                self._seq = seq
                log.log("instance.resumed", instance=self.instance_id, seq=seq,
                        recorded=record.seq, replayed=replay is not None,
                        running=record.running)
                self._record(record.epoch, seq, replay or b"")
                return VtpmResponse.ok(encode_attach_reply(
                    AttachReply(record.epoch, seq, True, response=replay)))
            reason = found
            log.log("instance.resume_refused", instance=self.instance_id, reason=reason)
        epoch = new_epoch()
        self._seq = 0
        self._record(epoch, 0, b"")
        return VtpmResponse.ok(encode_attach_reply(AttachReply(epoch, 0, False, reason)))

    def _resume(self, token: ResumeToken) -> tuple[ResumeRecord, int, bytes | None] | str:
        """Where ``token`` resumes, with the core brought back there: (the record it
        starts from, the endpoint's count after it, the in-flight request's answer
        if that request ran); or why not."""
        assert self.core is not None
        live = self._live
        # A live instance served the endpoint: its TPM is as it left it.
        found = self._load(token) if live is None else decide(
            token, live.state_version, [live])
        if isinstance(found, str):
            return found
        if found.seq == token.seq + 1:  # the in-flight request ran and was recorded
            return found, found.seq, found.response
        if live is not None:
            if token.in_flight and self._seq == token.seq + 1:  # it ran, unrecorded
                return found, self._seq, self._answer
            if self._seq != token.seq:
                return (f"the endpoint counts {token.seq} requests answered,"
                        f" the instance {self._seq}")
            return found, token.seq, None
        why = self._run_again(token)
        if why:
            self.core.fail()  # never a TPM that is neither the old one nor off
            return why
        return found, token.seq, None

    def _load(self, token: ResumeToken) -> ResumeRecord | str:
        """In a fresh process: the sealed record ``token`` resumes from, with the core
        brought back to it; or why not."""
        assert self.core is not None
        if self.core.running:
            return "the TPM was started since this process began"
        records = self.slots.read()
        if self.store.bundle.resume:
            with contextlib.suppress(SealError):
                records.append(ResumeRecord.decode(self.store.bundle.resume))
        found = decide(token, self.store.file.version, records)
        if isinstance(found, str):
            return found
        self.slots.resumed_from(found)
        try:
            self.core.resume(found.running, found.volatile, found.last_code)
        except (EngineError, EngineMisuseError) as exc:
            return f"libtpms refused the resume record: {exc}"
        return found

    def _run_again(self, token: ResumeToken) -> str:
        """Run the token's unrecorded requests again on the record it names; why
        that did not bring the TPM back, or empty."""
        assert self.core is not None
        for entry in token.unrecorded:  # in order, after token.base (ResumeToken checks)
            command = vtpm.tpm_command_of(entry.request)
            if command is None:
                return f"request {entry.seq} to run again is not a TPM command"
            answer = self.core.answer(entry.request, command)
            why = replay_check(command[0], entry, answer, self._quiet.kind_of(command[0], answer))
            if why:
                return f"request {entry.seq} run again: {why}"
        return ""

    def _not_attached(self, session: Session, data: bytes) -> VtpmResponse:
        """ATTACH, or a refusal: nothing reaches the TPM from a session that is not its
        endpoint (a second one could reset it, or read what the VM's endpoint keeps)."""
        try:
            request = vtpm.decode_request(data)
        except VtpmProtocolError:
            return VtpmResponse.error(TpmResult.BAD_PARAMETER)
        if request.op is VtpmOp.ATTACH:
            answer = self.seat.attach(session, request)
            if answer.success:
                return self._attached(request)
            return answer
        return self.seat.refusal()

    def answer_manager(self, data: bytes) -> Reply | Refused:
        """The manager's request in ``data`` (sgxvtpm/wire/admin.py), answered."""
        op = "?"
        try:
            request = admin.decode_request(data)
            op = request.OP
            if isinstance(request, admin.GetStatus):
                return self.status()
            if isinstance(request, admin.Provision):
                return self.provision(request)
            if isinstance(request, admin.Certify):
                return self.certify(request)
            if isinstance(request, admin.Destroy):
                return self.destroy()
            return self.migration_request(request)
        except (SealError, OSError, ValueError, admin.AdminProtocolError) as exc:
            log.log("instance.admin_failed", instance=self.instance_id, op=op, reason=str(exc))
            return Refused(str(exc))

    def status(self) -> admin.InstanceStatus:
        identity = self.platform.identity
        prov = self.store.bundle.provisioning
        if self.state in migration.VM_STATES:
            self.state = migration.state_of(prov)  # an import ends "incoming"
        imported = prov.get("imported") or {}
        return admin.InstanceStatus(
            state=self.state,
            reason=self.reason or migration.reason_of(prov),
            mrenclave=identity.mrenclave.hex(),
            mrsigner=identity.mrsigner.hex(),
            version=self.store.file.version,
            imported=int(imported.get("version", 0)),
            origin=str(imported.get("origin", "")),
            endpoint_pid=self.seat.about.get("pid"),
            endpoint=str(self.seat.about.get("endpoint", "")),
            endpoint_since=float(self.seat.about.get("since", 0.0)),
        )

    def migration_request(
        self,
        request: admin.ProvisionIncoming | admin.SetBlobKey | admin.MarkMigrated
        | admin.CancelMigration | admin.ExportState | admin.ImportState,
    ) -> admin.InstanceStatus | admin.PortableState | Refused:
        """The fleet's requests (enclaves/migration.py): incoming, blob key, migrated,
        a cold move's export and import."""
        try:
            if isinstance(request, admin.ExportState) and self.core is not None:
                return migration.export_state(self.core, self.store.bundle.provisioning)
            if isinstance(request, admin.ImportState) and self.core is not None:
                migration.import_state(self.core, self.store, request.blobs)
        except migration.MigrationError as exc:
            return Refused(str(exc))
        if isinstance(request, admin.ProvisionIncoming):
            if self.state != "unprovisioned":
                return Refused(f"instance is {self.state}, not unprovisioned")
            self.store.create(migration.incoming_provisioning(
                self.instance_id, self.manager_spki, request
            ))
            self.vm_spki = request.vm_spki_sha256
            self.core = self._new_core()
        elif self.core is None:
            return Refused(f"instance is {self.state}: no VM state")
        elif not isinstance(request, admin.ExportState | admin.ImportState):
            migration.apply(self.store, request)
        self.state = migration.state_of(self.store.bundle.provisioning)
        log.log("instance.migration", instance=self.instance_id, op=request.OP, state=self.state)
        return self.status()

    def provision(self, request: admin.Provision) -> admin.Provisioned | Refused:
        """Step 1 of manufacturing: bind the VM, start a fresh TPM, create the EKs.

        The EK public areas go back to the manager, whose CA certifies them
        (step 2, :meth:`certify`); the CA key never leaves the manager.
        """
        if self.state != "unprovisioned":
            return Refused(f"instance is {self.state}, not unprovisioned")
        algs = list(request.ek) or ["rsa2048", "ecc-p256"]
        for alg in algs:
            ekmod.profile(alg)  # unknown names are refused before anything is written
        self.store.create(
            {
                "command_audit": COMMAND_AUDIT_DEFAULT,  # a fresh TPM's (resume.py)
                "instance_id": self.instance_id,
                "vm_id": request.vm_id,
                "vm_spki_sha256": request.vm_spki_sha256.hex(),
                "manager_spki": self.manager_spki.hex(),
                "pcr_banks": list(request.pcr_banks),
            }
        )
        self.vm_spki = request.vm_spki_sha256
        # Manufacturing answers nobody but the manager, and only certify's answer says
        # the TPM exists: libtpms' stores (one per NV write) wait for certify's one commit.
        self.store.deferred = True
        engine = LibtpmsEngine(EngineStoreAdapter(self.store))
        engine.start()
        self._manufacturing = engine
        execute(engine.process, tpmwire.startup(TPM2_SU.CLEAR))
        eks = [ekmod.create_ek(engine.process, alg) for alg in algs]
        spec = ekmod.read_tpm_spec(engine.process)
        self.state = "manufacturing"
        return admin.Provisioned(
            eks=tuple(admin.EkPublicArea(e.alg, e.public_area) for e in eks),
            tpm_spec=admin.TpmSpec(spec.family, spec.level, spec.revision,
                                   *spec.certificate_attributes()),
        )

    def certify(self, request: admin.Certify) -> admin.InstanceStatus | Refused:
        """Step 2: store the EK and platform certificates (NV, write-locked), allocate
        the PCR banks, and power the TPM off so the VM's first boot starts it."""
        engine = self._manufacturing
        if engine is None or self.state != "manufacturing":
            return Refused(f"instance is {self.state}, not manufacturing")
        for alg, der in request.ek_certificates.items():
            ekmod.write_ek_certificate(engine.process, alg, der)
        if request.platform_certificate:
            ekmod.write_platform_certificate(engine.process, request.platform_certificate)
        banks = [str(b) for b in self.store.bundle.provisioning.get("pcr_banks", ["sha256"])]
        ekmod.allocate_pcr_banks(engine.process, banks)
        execute(engine.process, tpmwire.shutdown(TPM2_SU.CLEAR))
        engine.stop()
        self.store.flush(self.store.bundle.resume)  # the manufactured TPM, durable and counted
        self._manufacturing = None
        self.core = self._new_core()
        self.state = "running"
        log.log("instance.provisioned", instance=self.instance_id)
        return self.status()

    def destroy(self) -> admin.Done:
        if self.core is not None:
            self.core.close()
            self.core = None
        self.store.erase()
        self.slots.erase()
        self._live = None
        self.state = "destroyed"
        log.log("instance.destroyed", instance=self.instance_id)
        return admin.Done()

    def close(self) -> None:
        if self.core is not None:
            self.core.close()
            self.core = None



def zygote_warm_up(
    platform_for: Callable[[EnclaveIdentity], EnclavePlatform], verifier: QuoteVerifier
) -> None:
    """Run once by the sim zygote before it forks instances (shared library tables)."""
    warmup.exercise(platform_for, verifier)


def main(platform: EnclavePlatform, stream: socket.socket, args: Mapping[str, Any]) -> None:
    """Entry point (base.EnclaveEntry): serve sessions until the host closes the stream."""
    log.configure(f"instance-{str(args.get('instance_id', ''))[:8]}")
    # Host TPM counters when hostd relays a host TPM (platform/tpm_counters.py);
    # CountersRefused ends the instance (hostd logs its exit).
    platform, stream, tap = open_host_counters(platform, stream, args)
    try:
        enclave = InstanceEnclave(platform, args)
        # hostd went away (stopped, crashed) or stopped this enclave: exit without
        # touching the TPM. A Shutdown here would make the state newer than the
        # last resume record, and the VM's endpoint could not resume it
        # (SECURITY.md property 19). Orderly shutdowns stay with the VM's
        # platform (INIT, STOP, SHUTDOWN) and with destroy.
        enclave.serve(stream)
    finally:
        if tap is not None:
            tap.close()
