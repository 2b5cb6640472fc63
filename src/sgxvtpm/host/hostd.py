"""hostd: the patent's SGX module, loaded by the host (untrusted).

It loads the platform backend, sends the *first creation request* (the
loader measures and launches the manager enclave E1), relays every K1/K2
session as opaque frames, launches instance enclaves when E1 asks (the
*second creation request*), relaunches enclaves that die, and stops cleanly
on SIGTERM. It never holds K1, K2, or any plaintext TPM traffic: it sees
relay frames whose DATA payloads are TLS records.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import resource
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.channel import ClientCredential
from sgxvtpm.enclaves.specs import instance_spec, manager_spec
from sgxvtpm.host.relay import Connection, Relay
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.platform.base import EnclaveHandle, EnclaveSpec, Loader, PlatformError
from sgxvtpm.platform.sim.platform_dir import SimPlatformDir
from sgxvtpm.util import log
from sgxvtpm.util.keyfile import write_private_key

PRELOAD = ("sgxvtpm.enclaves.manager", "sgxvtpm.enclaves.instance")
# An enclave that dies is relaunched; one that keeps dying right after launch
# (within CRASH_UPTIME) is relaunched with exponential backoff, up to
# MAX_BACKOFF seconds, and `vm show` says it is crash-looping.
CRASH_UPTIME = 2.0
MAX_BACKOFF = 5.0


RESET_EFFECT = (
    "a new, empty manager registry replaces a missing or unreadable one: every VM"
    " registered on this host becomes unrecoverable (its vTPM state can never be"
    " opened again) and the operator key offered now is pinned"
)


class HostdError(Exception):
    """hostd cannot start; the message says why (one line for the CLI)."""


def ensure_operator_identity(state: StateDir) -> ClientCredential:
    """The operator's key and self-signed certificate (0600), created on first use."""
    if state.operator_key.exists() and state.operator_cert.exists():
        return ClientCredential.load(state.operator_key, state.operator_cert)
    key = ec.generate_private_key(ec.SECP256R1())
    credential = ClientCredential.self_signed(key, "sgxvtpm operator")
    write_private_key(state.operator_key, key)
    state.operator_cert.write_bytes(credential.cert_pem)
    return credential


def open_platform_dir(path: Path) -> SimPlatformDir:
    """The platform at ``path``; a new one only when there is no directory at all.

    Every sealed file and counter on this host hangs off the platform's secrets:
    provisioning a new platform over a damaged one would silently make every
    VM's state unreadable (and pin a new attestation root). So a directory that
    exists but is incomplete is an error for the operator to resolve.
    """
    if not path.exists() and not path.is_symlink():
        return SimPlatformDir.open_or_create(path)
    try:
        return SimPlatformDir(path)
    except PlatformError as exc:
        raise HostdError(
            f"the platform directory {path} exists but is incomplete or damaged ({exc}); "
            "restore it from a backup. hostd does not provision a new platform over it: "
            "that would make the sealed state of every VM on this host unreadable"
        ) from None


@dataclass
class Enclave:
    """One enclave hostd launched: how to launch it again, and its current process."""

    name: str
    spec: EnclaveSpec
    args: dict[str, Any]
    handle: EnclaveHandle | None = None
    task: asyncio.Task[None] | None = None
    launched_at: float = 0.0
    quick_deaths: int = 0
    wanted: bool = True
    reason: str = ""


class Hostd:
    def __init__(self, state: StateDir, *, reset_manager: bool = False) -> None:
        self.state = state
        self.reset_manager = reset_manager
        state.ensure()
        self._lock_fd = os.open(state.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HostdError(f"another hostd is running on {state.root}") from None
        self.platform = open_platform_dir(state.platform)
        self.operator = ensure_operator_identity(state)
        self.loader: Loader = self.platform.loader(preload=PRELOAD)
        self.relay = Relay(self.on_control)
        self.enclaves: dict[str, Enclave] = {}
        self.manager_ready = asyncio.Event()
        self.manager_ever_ready = False
        # Set by SIGTERM/SIGINT, or when the manager refuses to start (then
        # ``fatal`` says why and hostd exits with that line).
        self.stop_requested = asyncio.Event()
        self.fatal = ""
        self.stopping = False
        self._server: asyncio.Server | None = None

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        log.log("hostd.starting", state_dir=str(self.state.root), platform="sim")
        args: dict[str, Any] = {
            "state_dir": str(self.state.manager),
            "operator_cert_pem": self.operator.cert_pem.decode(),
        }
        if self.reset_manager:
            log.log("hostd.manager_reset_requested", effect=RESET_EFFECT)
            args["reset_registry"] = True
        # The first creation request: the loader measures and launches E1.
        manager = Enclave("manager", manager_spec(self.platform.signer_public_key), args)
        self.enclaves["manager"] = manager
        await self._launch(manager)
        with contextlib.suppress(FileNotFoundError):
            self.state.socket.unlink()
        self._server = await asyncio.start_unix_server(self._client, path=str(self.state.socket))
        os.chmod(self.state.socket, 0o660)
        log.log("hostd.listening", socket=str(self.state.socket))

    async def stop(self) -> None:
        self.stopping = True
        if self._server is not None:
            self._server.close()
        # Instances first, the manager last; each saves its state on SIGTERM.
        order = [e for n, e in self.enclaves.items() if n != "manager"]
        order += [e for n, e in self.enclaves.items() if n == "manager"]
        for enclave in order:
            enclave.wanted = False
            await asyncio.to_thread(self._stop_process, enclave)
        await self.relay.aclose()
        self.loader.close()
        with contextlib.suppress(FileNotFoundError):
            self.state.socket.unlink()
        log.log("hostd.stopped")

    def _stop_process(self, enclave: Enclave) -> None:
        if enclave.handle is not None:
            enclave.handle.stop()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.relay.serve(reader, writer, kind="client")

    # -- launching ------------------------------------------------------------
    async def _launch(self, enclave: Enclave) -> EnclaveHandle:
        handle = await asyncio.to_thread(self.loader.launch, enclave.spec, enclave.args)
        enclave.handle = handle
        enclave.reason = ""
        enclave.launched_at = time.monotonic()
        handle.stream.setblocking(False)
        # The loop's transport gets its own fd (a dup): handle.stop() closes
        # handle.stream from a worker thread, and if that closed the transport's
        # fd, the number could be reused by a new connection whose fd the
        # transport would then unregister or close (K1 sessions hung after a
        # vm destroy). The transport closes its dup itself on EOF.
        stream = socket.socket(fileno=os.dup(handle.stream.fileno()))
        reader, writer = await asyncio.open_unix_connection(sock=stream)
        enclave.task = asyncio.create_task(self._run_enclave(enclave, reader, writer))
        log.log("hostd.enclave_launched", enclave=enclave.name, pid=handle.pid,
                mrenclave=handle.identity.mrenclave.hex())
        return handle

    async def _run_enclave(
        self, enclave: Enclave, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Instances (loop.InstanceLoop) take over their clients' connections.
        handoff = enclave.name != "manager"
        await self.relay.serve(
            reader, writer, kind="enclave", name=enclave.name, accepts_handoff=handoff
        )
        # The stream ended: the enclave exited or was killed.
        if self.stopping or not enclave.wanted:
            return
        if time.monotonic() - enclave.launched_at < CRASH_UPTIME:
            enclave.quick_deaths += 1
        else:
            enclave.quick_deaths = 0
        delay = min(MAX_BACKOFF, 0.05 * (1 << min(enclave.quick_deaths, 10)))
        if enclave.quick_deaths >= 5:
            enclave.reason = f"crash-looping ({enclave.quick_deaths} deaths right after launch)"
        log.log("hostd.enclave_died", enclave=enclave.name, relaunch_in=delay)
        if enclave.name == "manager":
            self.manager_ready.clear()
        await asyncio.sleep(delay)
        if self.stopping or not enclave.wanted:
            return
        try:
            await self._launch(enclave)
        except Exception as exc:  # the loader failed: say so, keep serving others
            enclave.reason = f"relaunch failed: {exc}"
            log.log("hostd.relaunch_failed", enclave=enclave.name, reason=str(exc))

    # -- the manager's requests (CONTROL frames) ------------------------------
    async def on_control(self, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "manager_ready": self.manager_ready.is_set()}
        if op == "wait_ready":
            await asyncio.wait_for(self.manager_ready.wait(), 60)
            return {"ok": True}
        if conn.name != "manager":
            return {"ok": False, "error": "only the manager enclave may ask that"}
        if op == "manager_ready":
            self.manager_ready.set()
            self.manager_ever_ready = True
            # The reset was done once; a relaunch after a crash opens the new registry.
            self.enclaves["manager"].args.pop("reset_registry", None)
            return {"ok": True}
        if op == "manager_refused":
            return self._manager_refused(str(request.get("reason", "")))
        instance_id = str(request.get("instance_id", ""))
        if op in ("launch_instance", "stop_instance", "instance_info") and not _valid_id(
            instance_id
        ):
            return {"ok": False, "error": "bad instance id"}
        if op == "launch_instance":
            return await self._launch_instance(instance_id, str(request["manager_cert_pem"]))
        if op == "stop_instance":
            return await self._stop_instance(instance_id, bool(request.get("erase")))
        if op == "instance_info":
            return self._instance_info(instance_id)
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _manager_refused(self, reason: str) -> dict[str, Any]:
        """The manager will not run on this registry (missing, damaged, rolled back).

        At start-up hostd gives up with that reason as its one line: relaunching
        would only repeat it. Once a manager has run, the refusal is logged and
        the relaunches go on (with backoff), so the VMs whose instances run keep
        serving and the manager comes back as soon as its file is restored.
        """
        log.log("hostd.manager_refused", reason=reason, at_start=not self.manager_ever_ready)
        if not self.manager_ever_ready:
            self.enclaves["manager"].wanted = False
            self.fatal = f"the manager enclave refused to start: {reason}"
            self.stop_requested.set()
        return {"ok": True}

    async def _launch_instance(self, instance_id: str, manager_cert_pem: str) -> dict[str, Any]:
        x509.load_pem_x509_certificate(manager_cert_pem.encode())  # well-formed, at least
        enclave = self.enclaves.get(instance_id)
        if enclave is not None and enclave.handle is not None and instance_id in self.relay.targets:
            enclave.args["manager_cert_pem"] = manager_cert_pem
            return {"ok": True, "pid": enclave.handle.pid, "already_running": True}
        directory = self.state.instance(instance_id)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        enclave = Enclave(
            instance_id,
            instance_spec(self.platform.signer_public_key),
            {
                "instance_id": instance_id,
                "state_dir": str(directory),
                "manager_cert_pem": manager_cert_pem,
            },
        )
        self.enclaves[instance_id] = enclave
        try:
            handle = await self._launch(enclave)
        except Exception as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "pid": handle.pid, "mrenclave": handle.identity.mrenclave.hex()}

    async def _stop_instance(self, instance_id: str, erase: bool) -> dict[str, Any]:
        enclave = self.enclaves.pop(instance_id, None)
        if enclave is not None:
            enclave.wanted = False
            await asyncio.to_thread(self._stop_process, enclave)
        if erase:
            shutil.rmtree(self.state.instance(instance_id), ignore_errors=True)
        return {"ok": True}

    def _instance_info(self, instance_id: str) -> dict[str, Any]:
        enclave = self.enclaves.get(instance_id)
        if enclave is None or enclave.handle is None:
            return {"ok": True, "alive": False, "pid": None, "reason": "not launched"}
        alive = instance_id in self.relay.targets
        return {"ok": True, "alive": alive, "pid": enclave.handle.pid, "reason": enclave.reason}


def _valid_id(instance_id: str) -> bool:
    return len(instance_id) == 32 and all(c in "0123456789abcdef" for c in instance_id)


def _raise_fd_limit() -> None:
    """hostd holds two descriptors per enclave plus clients: lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def serve(
    state: StateDir, ready: asyncio.Event | None = None, *, reset_manager: bool = False
) -> None:
    """Run hostd until SIGTERM/SIGINT; HostdError if the manager refuses to start."""
    _raise_fd_limit()
    hostd = Hostd(state, reset_manager=reset_manager)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, hostd.stop_requested.set)
    await hostd.start()
    if ready is not None:
        ready.set()
    try:
        await hostd.stop_requested.wait()
    finally:
        await hostd.stop()
    if hostd.fatal:
        raise HostdError(hostd.fatal)
