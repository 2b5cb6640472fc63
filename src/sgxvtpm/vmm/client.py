"""The VMM: the operator's client of the manager enclave, over K1.

Every request opens an attested session through hostd's relay: the manager's
certificate must carry a quote, from this platform's attestation root, of
the manager code installed here (the MRENCLAVE this client computes itself),
bound to the certificate's key; the operator key authenticates us
(SECURITY.md properties 13 and 14).
The operator identity, the pinned attestation root and the VM bindings
``vm create`` writes are in the operator's credentials directory
(sgxvtpm/vmm/credentials.py), never in hostd's state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.channel import ClientCredential, ClientSession
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.mux.aio import open_client_session
from sgxvtpm.platform.base import MeasurementPolicy, QuoteVerifier
from sgxvtpm.tpm.ek import check_pcr_banks
from sgxvtpm.vmm.credentials import Credentials, CredentialsError, verifier_for
from sgxvtpm.wire import k1
from sgxvtpm.wire.jsonmsg import Refused, Reply, Request

CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 120.0


_R = TypeVar("_R", bound=Reply)


class VmmError(SgxvtpmError):
    """The manager refused a request or could not be reached; the message says why.

    A refusal names what to change (the VM's name, its key); an unreachable
    hostd or a changed platform names the socket or the pinned file to check.
    """


class VmmClient:
    def __init__(
        self,
        state: StateDir,
        *,
        credentials: Credentials | None = None,
        operator: ClientCredential | None = None,
        policy: MeasurementPolicy | None = None,
        verifier: QuoteVerifier | None = None,
    ) -> None:
        """``operator``, ``policy`` and ``verifier`` replace what the credentials directory
        and the code installed here would give (a remote verifier brings its own)."""
        self.state = state
        self.credentials = credentials or Credentials.at(None)
        self.host = self.credentials.host(state)
        self._operator = operator
        self._policy = policy
        self._root_pem = b""
        self._verifier = verifier

    def _credential(self) -> ClientCredential:
        if self._operator is None:
            try:
                self._operator = self.credentials.operator()
            except CredentialsError as exc:
                raise VmmError(str(exc)) from None
        return self._operator

    async def verifier(self) -> QuoteVerifier:
        """A verifier of this host's pinned attestation root, read (or pinned) once."""
        if self._verifier is None:
            pem = await self.pinned_root()
            try:
                self._verifier = verifier_for(self.host, pem)
            except CredentialsError as exc:
                raise VmmError(str(exc)) from None
        return self._verifier

    async def pinned_root(self) -> bytes:
        if not self._root_pem:
            try:
                self._root_pem = await asyncio.to_thread(self.host.attestation_root)
            except CredentialsError as exc:
                raise VmmError(str(exc)) from None
        return self._root_pem

    async def request(self, request: Request[_R]) -> _R:
        """One K1 request (sgxvtpm/wire/k1.py) to the manager; VmmError if it is refused."""
        try:
            policy = self._policy or self.host.policy("manager")
        except CredentialsError as exc:
            raise VmmError(str(exc)) from None
        session = ClientSession(
            policy,
            await self.verifier(),
            self._credential(),
            expected_cn=k1.CA_COMMON_NAME,
        )
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.state.socket)), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            raise VmmError(
                f"cannot reach hostd at {self.state.socket}: start it with "
                f"`sgxvtpm hostd --state-dir {self.state.root}`"
            ) from None
        wrapped = await asyncio.wait_for(
            open_client_session(reader, writer, session, "manager"), CONNECT_TIMEOUT
        )
        try:
            await wrapped.send(k1.encode_request(request))
            data = await asyncio.wait_for(wrapped.recv(), REQUEST_TIMEOUT)
            reply = k1.decode_reply(request, data)
        except k1.K1ProtocolError as exc:
            raise VmmError(f"the manager's reply is not understood: {exc}") from None
        finally:
            await wrapped.close()
        if isinstance(reply, Refused):
            raise VmmError(reply.error)
        return reply

    # -- the operations -------------------------------------------------------
    async def create(
        self,
        name: str,
        *,
        pcr_banks: list[str] | None = None,
        ek: list[str] | None = None,
        vm_public_key: ec.EllipticCurvePublicKey | None = None,
        export: Credentials | None = None,
        incoming: bool = False,
    ) -> k1.InstanceInfo:
        """Create VM ``name``; its binding goes to this client's credentials directory,
        or to ``export`` (for whoever runs the VM's endpoint) with this host's pinned root."""
        try:  # before anything is contacted
            check_pcr_banks(pcr_banks or ())
        except ValueError as exc:
            raise VmmError(str(exc)) from None
        host = self.host if export is None else export.host(self.state)
        try:  # before the manager creates anything: a binding that cannot be stored is lost
            if export is not None:
                host.pin(await self.pinned_root())
            host.ensure()
        except (CredentialsError, OSError) as exc:
            raise VmmError(str(exc)) from None
        key: ec.EllipticCurvePrivateKey | None = None
        if vm_public_key is None:
            key = ec.generate_private_key(ec.SECP256R1())
            vm_public_key = key.public_key()
        spki = vm_public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        created = await self.request(
            k1.CreateVm(
                name,
                spki,
                pcr_banks=tuple(pcr_banks or k1.DEFAULT_PCR_BANKS),
                ek=tuple(ek or ()),
                incoming=incoming,
            )
        )
        try:
            host.write_binding(
                name,
                key=key,
                vm_cert_pem=created.vm_cert_pem,
                ca_cert_pem=created.ca_cert_pem,
                instance=created.instance,
            )
        except (CredentialsError, OSError) as exc:
            # All or nothing: a VM whose binding is lost could never be used, and would
            # hold its name. Remove what was written, and the VM.
            with contextlib.suppress(OSError):
                host.remove_binding(name)
            try:
                await self.request(k1.DestroyVm(name))
            except (VmmError, OSError, TimeoutError) as undo:
                raise VmmError(
                    f"{name}: its binding could not be stored ({exc}), and the VM could not "
                    f"be removed ({undo}): run `sgxvtpm vm destroy {name}`"
                ) from None
            raise VmmError(
                f"{name} was not created: its binding could not be stored: {exc}"
            ) from None
        return created.instance

    async def destroy(self, name: str, *, export: Credentials | None = None) -> None:
        await self.request(k1.DestroyVm(name))
        self.host.remove_binding(name)
        if export is not None:
            export.host(self.state).remove_binding(name)

    async def list(self) -> list[k1.InstanceInfo]:
        return list((await self.request(k1.ListVms())).instances)

    async def show(self, name: str) -> k1.InstanceInfo:
        return (await self.request(k1.ShowVm(name))).instance

    async def ca_certificate(self) -> x509.Certificate:
        pem = (await self.request(k1.GetCaCertificate())).ca_cert_pem
        return x509.load_pem_x509_certificate(pem.encode())
