"""hostd: the patent's SGX module, loaded by the host (untrusted).

It loads the platform backend, sends the *first creation request* (the
loader measures and launches the manager enclave E1), relays every K1/K2
session as opaque frames, launches instance enclaves when E1 asks (the
*second creation request*), relaunches enclaves that die, and stops cleanly
on SIGTERM. It never holds K1, K2, or any plaintext TPM traffic: it sees
relay frames whose DATA payloads are TLS records. Nor does it hold the
operator's or a VM's private key (sgxvtpm/vmm/credentials.py): it passes the
operator's *certificate* to the manager, which pins it.

Started as root, it opens what needs root (the platform, the loader) and then
runs as the unprivileged ``--user`` (swtpm's ``--runas``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401 - asyncio.to_thread's; see drop_privileges
import contextlib
import fcntl
import grp
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from sgxvtpm.enclaves.specs import instance_spec, manager_spec
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.host.host_tpm import HostTpm, HostTpmError
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.host.switch import FLEET_IN, FLEET_OUT, Connection, Relay
from sgxvtpm.platform import DEFAULT_PLATFORM, open_platform
from sgxvtpm.platform.base import EnclaveHandle, EnclaveSpec, PlatformError
from sgxvtpm.util import log
from sgxvtpm.util.durable import atomic_write
from sgxvtpm.wire import control
from sgxvtpm.wire.control import Refused
from sgxvtpm.wire.relay import DESTROYED

if TYPE_CHECKING:
    from sgxvtpm.host.collateral import CollateralRefresher

PRELOAD = ("sgxvtpm.enclaves.manager", "sgxvtpm.enclaves.instance")
RELEASE = "sgxvtpm.enclaves.specs:release"
_INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")

# An enclave that dies is relaunched; one that keeps dying right after launch
# (within CRASH_UPTIME) is relaunched with exponential backoff, up to
# MAX_BACKOFF seconds, and `vm show` says it is crash-looping.
CRASH_UPTIME = 2.0
MAX_BACKOFF = 5.0
STOP_TIMEOUT = 5.0
#: The key the enclaves salt their host-TPM sessions to: the RSA EK's
#: persistent handle in TCG's EK Credential Profile (2.2.1.4).
DEFAULT_COUNTERS_KEY = 0x81010001
_MANAGER_ONLY = "only the manager enclave may ask that"


RESET_EFFECT = (
    "a new, empty manager registry replaces a missing or unreadable one: every VM"
    " registered on this host becomes unrecoverable (its vTPM state can never be"
    " opened again) and the operator key offered now is pinned"
)


class HostdError(SgxvtpmError):
    """hostd cannot start; the message says why (one line for the CLI).

    Fix what it names (a user, a file, another hostd on the same state
    directory) and start hostd again.
    """


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user and group hostd runs as once root is no longer needed."""

    user: str
    uid: int
    gid: int

    @classmethod
    def parse(cls, spec: str) -> RunAs:
        """``USER[:GROUP]``, names or numbers; GROUP defaults to USER's primary group."""
        user, _, group = spec.partition(":")
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise HostdError(f"--user: no such user {user!r}") from None
        gid = entry.pw_gid
        if group:
            try:
                named = grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
                gid = named.gr_gid
            except KeyError:
                raise HostdError(f"--user: no such group {group!r}") from None
        if entry.pw_uid == 0 or gid == 0:
            raise HostdError("--user must name an unprivileged user and group, not root")
        return cls(entry.pw_name, entry.pw_uid, gid)


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


@dataclass(frozen=True)
class HostdOptions:
    """hostd's command line (cli.py): the platform and where its parts come from.

    ``platform``: the backend (sgxvtpm.platform.open_platform). ``reset_manager``:
    start a new, empty manager registry after it was lost. ``counters``: ``sim``
    or ``tpm:DEVICE_OR_TCTI``, the host TPM the enclaves keep their counters in,
    through sessions salted to ``counters_key``. ``sim_root``: the simulated
    provisioning authority (sim only). ``fleet_listen``: relay fleet sessions on
    this TCP address. ``signed_release``: the vendor's pre-signed build (nothing
    is signed here). ``pccs``: fetch and refresh the platform's collateral from
    that PCCS (host/collateral.py), at most every ``pccs_refresh`` seconds if given.
    """

    platform: str = DEFAULT_PLATFORM
    reset_manager: bool = False
    counters: str = "sim"
    counters_key: int | None = None
    sim_root: Path | None = None
    fleet_listen: tuple[str, int] | None = None
    signed_release: Path | None = None
    pccs: str | None = None
    pccs_refresh: float | None = None


class Hostd:
    def __init__(
        self, state: StateDir, operator_cert_pem: bytes, options: HostdOptions = HostdOptions()
    ) -> None:
        self.state = state
        self.options = options
        self.fleet_listen = options.fleet_listen
        self._fleet_server: asyncio.Server | None = None
        self._fleet_dialled = 0
        self._fleet_tasks: set[asyncio.Task[None]] = set()
        self.reset_manager = options.reset_manager
        state.ensure()
        self._lock_fd = os.open(state.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HostdError(f"another hostd is running on {state.root}") from None
        self.operator_cert_pem = operator_cert_pem
        # --counters tpm:SPEC: the enclaves keep their counters in this TPM,
        # through TPM frames hostd relays unread (host/host_tpm.py).
        self.host_tpm: HostTpm | None = None
        self.counters_key = (
            DEFAULT_COUNTERS_KEY if options.counters_key is None else options.counters_key
        )
        counters = options.counters
        if counters != "sim":
            kind, _, spec = counters.partition(":")
            try:
                if kind != "tpm" or not spec:
                    raise HostTpmError(
                        f"--counters {counters!r}: give sim, or tpm:/dev/tpmrm0, "
                        "tpm:swtpm:path=SOCKET"
                    )
                self.host_tpm = HostTpm(spec)
            except HostTpmError as exc:
                os.close(self._lock_fd)
                raise HostdError(str(exc)) from None
        # The platform backend's loader starts the platform's own process (the
        # sim CPU), which alone opens the platform directory (hostd never holds
        # a platform secret) and signs the release's enclaves from its own
        # installed code (platform/sim/cpu.py).
        try:
            # --release DIR: the vendor's pre-signed build; nothing is signed here.
            self.platform = open_platform(
                options.platform, state.platform, preload=PRELOAD, release=RELEASE,
                sim_root=options.sim_root, signed_release=options.signed_release,
            )  # fmt: skip
        except PlatformError as exc:
            os.close(self._lock_fd)
            raise HostdError(str(exc)) from None
        publish_collateral(state)
        # --pccs: the platform's collateral from the PCCS, before any enclave
        # starts, then kept fresh by a background task (host/collateral.py).
        self.collateral: CollateralRefresher | None = None
        self._collateral_task: asyncio.Task[None] | None = None
        if options.pccs:
            # Only here: the DCAP verifier and an HTTP client cost hostd ~4 MB
            # that a hostd without --pccs never uses (before drop_privileges).
            from sgxvtpm.host.collateral import CollateralRefresher, CollateralUnavailable

            self.collateral = CollateralRefresher(
                options.pccs, self.platform, state.collateral, max_interval=options.pccs_refresh
            )
            try:
                self.collateral.start()
            except CollateralUnavailable as exc:
                self.platform.close()
                os.close(self._lock_fd)
                raise HostdError(str(exc)) from None
        self.manager_spec = self.platform.signed(manager_spec(self.platform))
        self.instance_spec = self.platform.signed(instance_spec(self.platform))
        self.relay = Relay(
            self.on_control, on_tpm=self._host_tpm if self.host_tpm is not None else None
        )
        self.relay.why_absent = self._why_absent
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
        log.log("hostd.starting", state_dir=str(self.state.root), platform=self.platform.name)
        args: dict[str, Any] = {
            "state_dir": str(self.state.manager),
            "operator_cert_pem": self.operator_cert_pem.decode(),
        }
        self._counter_args(args)
        if self.reset_manager:
            log.log("hostd.manager_reset_requested", effect=RESET_EFFECT)
            args["reset_registry"] = True
        # The first creation request: the loader measures and launches E1.
        manager = Enclave("manager", self.manager_spec, args)
        self.enclaves["manager"] = manager
        await self._launch(manager)
        if self.collateral is not None:
            self._collateral_task = asyncio.create_task(self.collateral.run())
        with contextlib.suppress(FileNotFoundError):
            self.state.socket.unlink()
        self._server = await asyncio.start_unix_server(self._client, path=str(self.state.socket))
        os.chmod(self.state.socket, 0o660)
        log.log("hostd.listening", socket=str(self.state.socket))
        if self.fleet_listen is not None:
            host, port = self.fleet_listen
            self._fleet_server = await asyncio.start_server(self._fleet_client, host, port)
            log.log("hostd.fleet_listening", host=host, port=port)

    async def stop(self) -> None:
        self.stopping = True
        if self._collateral_task is not None:
            self._collateral_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collateral_task
        if self._server is not None:
            self._server.close()
        if self._fleet_server is not None:
            self._fleet_server.close()
        # Instances first, the manager last; each saves its state on SIGTERM.
        order = [e for n, e in self.enclaves.items() if n != "manager"]
        order += [e for n, e in self.enclaves.items() if n == "manager"]
        for enclave in order:
            enclave.wanted = False
            await asyncio.to_thread(self._stop_process, enclave)
        await self.relay.aclose()
        # Every enclave was asked to end above; one that would still need a
        # signal cannot get it from an unprivileged hostd, and ends with its stream.
        with contextlib.suppress(PermissionError):
            self.platform.close()
        if self.host_tpm is not None:
            self.host_tpm.close()
        with contextlib.suppress(FileNotFoundError):
            self.state.socket.unlink()
        log.log("hostd.stopped")

    def _stop_process(self, enclave: Enclave) -> None:
        handle = enclave.handle
        if handle is None:
            return
        # The end of its stream asks an enclave to end (it saves its state first);
        # signals are only the fallback, and hostd has no right to send them to
        # the root-owned enclaves once it runs as --user.
        with contextlib.suppress(OSError):
            handle.stream.shutdown(socket.SHUT_RDWR)
        handle.wait(STOP_TIMEOUT)
        try:
            handle.stop()
        except PermissionError:
            handle.stream.close()
            log.log("hostd.enclave_not_signalled", enclave=enclave.name, pid=handle.pid)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.relay.serve(reader, writer, kind="client")

    def _counter_args(self, args: dict[str, Any]) -> None:
        """Ask an enclave for host TPM counters (platform/tpm_counters.py)."""
        if self.host_tpm is not None:
            args["tpm_counters"] = {"key_handle": self.counters_key}

    async def _host_tpm(self, command: bytes) -> bytes:
        assert self.host_tpm is not None
        return await asyncio.to_thread(self.host_tpm.transact, command)
    async def _fleet_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Another host's manager, through its hostd: sessions to our manager only."""
        await self.relay.serve(reader, writer, kind=FLEET_IN)

    async def _fleet_dial(self, host: str, port: int) -> control.FleetTarget | Refused:
        """A relay connection to another hostd's fleet port, as a target for our manager."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (OSError, TimeoutError) as exc:
            return Refused(f"cannot reach the fleet port {host}:{port}: {exc or 'timeout'}")
        self._fleet_dialled += 1
        name = f"fleet-{self._fleet_dialled}"
        task = asyncio.create_task(
            self.relay.serve(reader, writer, kind=FLEET_OUT, name=name, close_when_idle=True)
        )
        self._fleet_tasks.add(task)
        task.add_done_callback(self._fleet_tasks.discard)
        while name not in self.relay.targets and not task.done():
            await asyncio.sleep(0)
        log.log("hostd.fleet_dialled", host=host, port=port, target=name)
        return control.FleetTarget(name)

    # -- launching ------------------------------------------------------------
    async def _launch(self, enclave: Enclave) -> EnclaveHandle:
        handle = await asyncio.to_thread(self.platform.loader.launch, enclave.spec, enclave.args)
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
        handoff = enclave.name != "manager" and self.platform.connection_handoff
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
        log.log("hostd.enclave_died", level="warning", enclave=enclave.name, relaunch_in=delay)
        if enclave.name == "manager":
            self.manager_ready.clear()
        await asyncio.sleep(delay)
        if self.stopping or not enclave.wanted:
            return
        try:
            await self._launch(enclave)
        except Exception as exc:  # the loader failed: say so, keep serving others
            enclave.reason = f"relaunch failed: {exc}"
            log.log("hostd.relaunch_failed", level="error", enclave=enclave.name, reason=str(exc))

    # -- the manager's requests (CONTROL frames) ------------------------------
    async def on_control(self, conn: Connection, obj: dict[str, Any]) -> dict[str, Any]:
        """The switch's handler of CONTROL requests (sgxvtpm/wire/control.py)."""
        try:
            request = control.request_from_json(obj)
        except control.ControlProtocolError as exc:
            if conn.name != "manager":  # as before: a client learns no more than that
                return control.reply_to_json(Refused(_MANAGER_ONLY))
            return control.reply_to_json(Refused(str(exc)))
        return control.reply_to_json(await self._answer(conn, request))

    async def _answer(
        self, conn: Connection, request: control.ControlRequest
    ) -> control.Reply | Refused:
        if isinstance(request, control.Ping):
            return control.Pong(manager_ready=self.manager_ready.is_set())
        if isinstance(request, control.WaitReady):
            await asyncio.wait_for(self.manager_ready.wait(), 60)
            return control.Done()
        if isinstance(request, control.GetPlatformRoot):
            # Public, and only a claim: clients pin it on first contact and later
            # compare, they never verify against what hostd says now.
            return control.PlatformRoot(self.platform.attestation_root_pem.decode())
        if conn.name != "manager":
            return Refused(_MANAGER_ONLY)
        if isinstance(request, control.ManagerReady):
            self.manager_ready.set()
            self.manager_ever_ready = True
            # The reset was done once; a relaunch after a crash opens the new registry.
            self.enclaves["manager"].args.pop("reset_registry", None)
            return control.Done()
        if isinstance(request, control.ManagerRefused):
            return self._manager_refused(request.reason)
        if isinstance(request, control.LaunchInstance):
            return await self._launch_instance(request.instance_id, request.manager_cert_pem)
        if isinstance(request, control.FleetDial):
            return await self._fleet_dial(request.host, request.port)
        if isinstance(request, control.StopInstance):
            return await self._stop_instance(request.instance_id, request.erase)
        if isinstance(request, control.QueryInstance):
            return self._instance_info(request.instance_id)
        # Handoff: the switch answers it before this handler sees it.
        return Refused(f"{request.OP} is not hostd's to answer")

    def _manager_refused(self, reason: str) -> control.Done:
        """The manager will not run on this registry (missing, damaged, rolled back).

        At start-up hostd gives up with that reason as its one line: relaunching
        would only repeat it. Once a manager has run, the refusal is logged and
        the relaunches go on (with backoff), so the VMs whose instances run keep
        serving and the manager comes back as soon as its file is restored.
        """
        log.log("hostd.manager_refused", level="error", reason=reason,
                at_start=not self.manager_ever_ready)
        if not self.manager_ever_ready:
            self.enclaves["manager"].wanted = False
            self.fatal = f"the manager enclave refused to start: {reason}"
            self.stop_requested.set()
        return control.Done()

    async def _launch_instance(
        self, instance_id: str, manager_cert_pem: str
    ) -> control.Launched | Refused:
        x509.load_pem_x509_certificate(manager_cert_pem.encode())  # well-formed, at least
        enclave = self.enclaves.get(instance_id)
        if enclave is not None and enclave.handle is not None and instance_id in self.relay.targets:
            enclave.args["manager_cert_pem"] = manager_cert_pem
            return control.Launched(enclave.handle.pid, already_running=True)
        directory = self.state.instance(instance_id)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        enclave = Enclave(
            instance_id,
            self.instance_spec,
            {
                "instance_id": instance_id,
                "state_dir": str(directory),
                "manager_cert_pem": manager_cert_pem,
            },
        )
        self._counter_args(enclave.args)
        self.enclaves[instance_id] = enclave
        try:
            handle = await self._launch(enclave)
        except Exception as exc:
            return Refused(str(exc))
        return control.Launched(handle.pid, mrenclave=handle.identity.mrenclave.hex())

    async def _stop_instance(self, instance_id: str, erase: bool) -> control.Done:
        enclave = self.enclaves.pop(instance_id, None)
        if enclave is not None:
            enclave.wanted = False
            await asyncio.to_thread(self._stop_process, enclave)
        if erase:
            shutil.rmtree(self.state.instance(instance_id), ignore_errors=True)
        return control.Done()

    def _why_absent(self, name: str) -> bytes:
        """OPEN's CLOSE reason for an absent target: an instance whose directory is
        gone was destroyed (its endpoints exit); else it is (re)starting."""
        if _INSTANCE_NAME.fullmatch(name) and not self.state.instance(name).exists():
            return DESTROYED
        return b"no such target"

    def _instance_info(self, instance_id: str) -> control.InstanceProcess:
        enclave = self.enclaves.get(instance_id)
        if enclave is None or enclave.handle is None:
            return control.InstanceProcess(alive=False, pid=None, reason="not launched")
        alive = instance_id in self.relay.targets
        return control.InstanceProcess(alive=alive, pid=enclave.handle.pid, reason=enclave.reason)


def _raise_fd_limit() -> None:
    """hostd holds two descriptors per enclave plus clients: lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def publish_collateral(state: StateDir) -> None:
    """Copy the platform's DCAP collateral out of platform/ (root's, 0700) to a 0644
    file every client can read: the bytes are public and signed under the root
    the clients pinned, so hostd (untrusted) may hold them (SECURITY.md)."""
    for name in StateDir.PLATFORM_COLLATERAL:
        try:
            data = (state.platform / name).read_bytes()
        except FileNotFoundError:
            continue
        atomic_write(state.collateral, data, 0o644)
        return


def drop_privileges(state: StateDir, run_as: RunAs) -> None:
    """Give hostd's files to ``run_as`` (platform/ stays root's alone), then become it.

    Called once the platform is open and the loader's zygote runs: they keep
    the platform secrets, and hostd no longer needs to read them. Every module
    hostd uses is imported before (asyncio.to_thread's executor included, at
    the top of this file): the interpreter's own library may not be readable
    by that user (a Python installed under root's home).
    """
    _hand_over(state, run_as)
    os.setgroups([])
    os.setresgid(run_as.gid, run_as.gid, run_as.gid)
    os.setresuid(run_as.uid, run_as.uid, run_as.uid)
    try:
        os.setresuid(0, 0, 0)
    except PermissionError:
        pass
    else:
        raise HostdError("could not drop root: setresuid(0) still succeeds")
    if not os.access(state.root, os.R_OK | os.W_OK | os.X_OK):
        raise HostdError(f"--user {run_as.user} cannot use {state.root}: every directory "
                         "above it must let that user through")
    log.log("hostd.dropped_privileges", user=run_as.user, uid=run_as.uid, gid=run_as.gid)


def _hand_over(state: StateDir, run_as: RunAs) -> None:
    """chown the state directory to ``run_as``, except platform/ which becomes root's, 0700.

    Walked through directory descriptors without following symlinks: the tree
    was writable by that user on an earlier run, and root must not be steered
    into chowning something outside it (a planted symlink or hard link).
    """
    root = state.root.resolve()
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root / state.platform.name, flags)
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    for top, dirs, files, dirfd in os.fwalk(root, follow_symlinks=False):
        if top == str(root):
            if state.platform.name in dirs:
                dirs.remove(state.platform.name)
            # The socket's group may reach it (and nothing else: no read permission).
            os.fchmod(dirfd, 0o710)
        os.fchown(dirfd, run_as.uid, run_as.gid)
        for name in files:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                log.log("hostd.hard_link_skipped", path=os.path.join(top, name))
                continue
            os.chown(name, run_as.uid, run_as.gid, dir_fd=dirfd, follow_symlinks=False)


async def serve(
    state: StateDir,
    ready: asyncio.Event | None = None,
    *,
    operator_cert: Callable[[], bytes],
    options: HostdOptions = HostdOptions(),
    run_as: RunAs | None = None,
) -> None:
    """Run hostd as ``options`` say (:class:`HostdOptions`) until SIGTERM/SIGINT.

    ``operator_cert`` gives the operator's certificate for the manager to pin
    (the command line's: sgxvtpm/vmm/credentials.py, hostd_operator_certificate);
    it is called once the privilege checks passed, before the platform opens,
    as the invoking user. HostdError if the manager refuses to start.
    """
    state.check()  # before anything starts: StateDirError names the path and the fix
    if run_as is not None and os.geteuid() != 0:
        raise HostdError(
            f"--user {run_as.user} needs hostd to start as root (it runs as uid {os.geteuid()})"
        )
    operator_cert_pem = operator_cert()
    _raise_fd_limit()
    hostd = Hostd(state, operator_cert_pem, options)
    if run_as is not None:
        drop_privileges(state, run_as)
    elif os.geteuid() == 0:
        log.log("hostd.running_as_root", level="warning",
                warning="hostd is untrusted and needs no root after start: give --user")
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
