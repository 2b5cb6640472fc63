"""K2: a VM endpoint's attested session to its instance enclave, through hostd.

The endpoint checks the instance enclave's certificate (quote from this
platform's root, MRENCLAVE of the instance code installed here, key bound
by REPORTDATA, CN = the instance id it expects) and authenticates with the
VM key the manager bound to the instance (S3, S4). Two faces:

- :class:`K2Client`, blocking, for the in-process TCTI and tests;
- :class:`K2Backend`, asyncio, the ``VtpmBackend`` the QEMU and TSS
  endpoints forward to.

After a session breaks (the instance or hostd restarted) the request in
flight fails with :class:`K2Error` and is not resent, since it may have run
(S2); the next request opens a new session.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass
from pathlib import Path

from sgxvtpm.channel import (
    ChannelError,
    ClientCredential,
    ClientSession,
    Closed,
    HandshakeComplete,
    Message,
)
from sgxvtpm.enclaves.specs import expected_policy
from sgxvtpm.host.relay import AsyncSession, open_client_session
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.platform.base import MeasurementPolicy, QuoteVerifier
from sgxvtpm.vmm.client import platform_verifier
from sgxvtpm.wire import relay as frames
from sgxvtpm.wire import vtpm

CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 300.0  # an RSA key generation on a loaded host can take seconds


class K2Error(Exception):
    """The instance could not be reached or the session broke; the message says which."""


@dataclass(frozen=True)
class VmBinding:
    """What a VM endpoint needs: where hostd is, which instance, and the VM's identity."""

    socket_path: Path
    instance_id: str
    credential: ClientCredential
    verifier: QuoteVerifier
    policy: MeasurementPolicy

    @classmethod
    def load(cls, state: StateDir, name: str) -> VmBinding:
        vm_dir = state.vm(name)
        try:
            info = json.loads((vm_dir / "instance.json").read_text())
            credential = ClientCredential.load(vm_dir / "vm.key", vm_dir / "vm.crt")
        except (OSError, ValueError) as exc:
            raise K2Error(f"VM {name!r} has no usable binding in {vm_dir}: {exc}") from None
        return cls(
            socket_path=state.socket,
            instance_id=str(info["instance_id"]),
            credential=credential,
            verifier=platform_verifier(state),
            policy=expected_policy("instance"),
        )

    def new_session(self) -> ClientSession:
        return ClientSession(
            self.policy, self.verifier, self.credential, expected_cn=self.instance_id
        )


class K2Client:
    """A blocking K2 session: ``request(bytes) -> bytes``, one at a time."""

    def __init__(self, binding: VmBinding, timeout: float = REQUEST_TIMEOUT) -> None:
        self.binding = binding
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._session: ClientSession | None = None
        self._decoder = frames.RelayDecoder()
        self._pending: list[bytes] = []

    def connect(self) -> None:
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(str(self.binding.socket_path))
        except OSError as exc:
            sock.close()
            raise K2Error(f"cannot reach hostd at {self.binding.socket_path}: {exc}") from None
        self._sock, self._session = sock, self.binding.new_session()
        self._decoder = frames.RelayDecoder()
        self._pending = []
        sock.sendall(frames.encode(frames.Frame.open(1, self.binding.instance_id)))
        self._flush()
        while True:
            event = self._next_event()
            if isinstance(event, HandshakeComplete):
                break
        sock.settimeout(self.timeout)

    def request(self, payload: bytes) -> bytes:
        if self._session is None:
            self.connect()
        assert self._session is not None
        self._session.send_message(payload)
        self._flush()
        while True:
            event = self._next_event()
            if isinstance(event, Message):
                return event.data

    def call(self, request: vtpm.VtpmRequest) -> vtpm.VtpmResponse:
        return vtpm.decode_response(self.request(vtpm.encode_request(request)))

    def power_on(self, flags: int = 0) -> None:
        """INIT (swtpm's CMD_INIT): start the TPM; the client then sends TPM2_Startup."""
        response = self.call(vtpm.VtpmRequest.init(flags))
        if not response.success:
            raise K2Error(f"the instance refused INIT (result {response.result:#x})")

    def transact(self, command: bytes, locality: int = 0) -> bytes:
        """One raw TPM command, one raw TPM response (TPM errors are responses)."""
        response = self.call(vtpm.VtpmRequest.tpm_command(command, locality))
        if not response.success:
            raise K2Error(f"the instance refused the command (result {response.result:#x})")
        return response.payload

    def close(self) -> None:
        if self._sock is not None:
            if self._session is not None:
                try:
                    self._session.close()
                    self._flush()
                except (OSError, ChannelError):
                    pass
            self._sock.close()
        self._sock = None
        self._session = None

    # -- internals ------------------------------------------------------------
    def _flush(self) -> None:
        assert self._sock is not None and self._session is not None
        out = self._session.data_to_send()
        for start in range(0, len(out), frames.MAX_PAYLOAD):
            chunk = out[start : start + frames.MAX_PAYLOAD]
            self._sock.sendall(frames.encode(frames.Frame.data(1, chunk)))

    def _next_event(self) -> HandshakeComplete | Message:
        assert self._sock is not None and self._session is not None
        while True:
            try:
                event = self._session.next_event()
            except ChannelError:
                self.close()
                raise
            if isinstance(event, HandshakeComplete | Message):
                return event
            if isinstance(event, Closed):
                self.close()
                raise K2Error("the instance closed the session")
            self._receive()

    def _receive(self) -> None:
        assert self._sock is not None and self._session is not None
        while True:
            frame = self._decoder.next_frame()
            if frame is None:
                try:
                    data = self._sock.recv(1 << 16)
                except TimeoutError:
                    self.close()
                    raise K2Error("the instance did not answer in time") from None
                self._decoder.receive_data(data)
                if not data:
                    self._session.receive_data(b"")
                    return
                continue
            if frame.type is frames.FrameType.DATA:
                self._session.receive_data(frame.payload)
                self._flush()
                return
            if frame.type is frames.FrameType.CLOSE:
                self._session.receive_data(b"")
                return

    def __enter__(self) -> K2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class K2Backend:
    """The asyncio VtpmBackend over K2, for the QEMU and TSS endpoints."""

    def __init__(self, binding: VmBinding) -> None:
        self.binding = binding
        self._session: AsyncSession | None = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> AsyncSession:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.binding.socket_path)), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            raise K2Error(f"cannot reach hostd at {self.binding.socket_path}") from None
        return await asyncio.wait_for(
            open_client_session(reader, writer, self.binding.new_session(),
                                self.binding.instance_id),
            CONNECT_TIMEOUT,
        )

    async def call(self, request: vtpm.VtpmRequest) -> vtpm.VtpmResponse:
        async with self._lock:
            if self._session is None:
                self._session = await self._connect()
            session = self._session
            try:
                await session.send(vtpm.encode_request(request))
                data = await asyncio.wait_for(session.recv(), REQUEST_TIMEOUT)
            except (ChannelError, EOFError, TimeoutError, ConnectionError) as exc:
                self._session = None
                await session.close()
                raise K2Error(f"K2 session failed: {type(exc).__name__}") from None
            return vtpm.decode_response(data)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
