"""``sgxvtpm vm attach`` and ``sgxvtpm vm serve``: the VM endpoints over K2.

Both load the VM's binding from a credentials directory
(sgxvtpm/vmm/credentials.py), attach to its instance enclave over K2 before
they listen (the instance serves one endpoint per VM: a second one is
refused unless it asks for a takeover) and serve until SIGTERM/SIGINT. They
run in the main thread (no event loop): connections are served by threads.

Whoever can connect to an endpoint's socket uses the VM's TPM. Unix sockets
are the endpoint user's only by default (mode 0600; ``access`` changes mode,
owner and group). TCP (tcti-swtpm over TCP, tcti-mssim) listens on loopback
only and still lets every local user in, so it needs ``allow_any_local_user``.
"""

from __future__ import annotations

from pathlib import Path

from sgxvtpm.endpoint.k2 import K2Busy, K2Client, K2Destroyed, VmBinding
from sgxvtpm.endpoint.lifecycle import StopFlag, run_until_signal
from sgxvtpm.endpoint.listeners import OWNER_ONLY, SocketAccess, loopback_host
from sgxvtpm.endpoint.qemu import QemuEndpoint
from sgxvtpm.endpoint.tss import EndpointError, MssimEndpoint, SwtpmTssEndpoint
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.util import log
from sgxvtpm.vmm.credentials import Credentials

TAKEOVER_HINT = "use --takeover to replace it"
ANY_LOCAL_USER_FLAG = "--allow-any-local-user"


def _host_port(option: str, text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65534:
        raise ValueError(f"{option}: expected HOST:PORT, got {text!r}")
    try:
        return loopback_host(host), int(port)
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}") from None


class _Ending:
    """Ends the endpoint once its VM turns out to be destroyed (K2Destroyed)."""

    def __init__(self) -> None:
        self.stopped: StopFlag | None = None
        self.destroyed: K2Destroyed | None = None

    def __call__(self, exc: K2Destroyed) -> None:
        self.destroyed = exc
        if self.stopped is not None:
            self.stopped.set()

    def check(self) -> None:
        """Raise the VM's destruction, if that is why the endpoint ended (one line, status 1)."""
        if self.destroyed is not None:
            raise self.destroyed


def _attached(
    state: StateDir, name: str, label: str, takeover: bool, credentials: Credentials | None,
    ending: _Ending,
) -> K2Client:
    """A K2 client of VM ``name`` that holds its TPM (the instance refuses a second one)."""
    binding = VmBinding.load(state, name, credentials=credentials)
    client = K2Client(binding, takeover=takeover, label=label, on_destroyed=ending)
    try:
        client.connect()
    except K2Busy as exc:
        raise exc.with_hint(TAKEOVER_HINT) from None
    return client


def attach(
    state: StateDir,
    name: str,
    ctrl: Path,
    *,
    access: SocketAccess = OWNER_ONLY,
    takeover: bool = False,
    credentials: Credentials | None = None,
    terminate: bool = False,
) -> None:
    """Serve VM ``name``'s vTPM to QEMU on the swtpm control socket ``ctrl``;
    with ``terminate``, only until CMD_SHUTDOWN (as swtpm)."""
    ending = _Ending()
    backend = _attached(state, name, f"vm attach --ctrl {ctrl}", takeover, credentials, ending)
    endpoint = QemuEndpoint(backend, ctrl, access=access, exit_on_shutdown=terminate)
    ending.stopped = endpoint.stopped
    try:
        endpoint.start()
        print(f"attached {name}: -chardev socket,id=chrtpm,path={ctrl} "
              "-tpmdev emulator,id=tpm0,chardev=chrtpm", flush=True)
        log.log("endpoint.attached", vm=name, ctrl=str(ctrl))
        run_until_signal(endpoint)
    finally:
        endpoint.close()
        endpoint.tpm.close()
    ending.check()


def serve_tss(
    state: StateDir,
    name: str,
    *,
    swtpm: Path | None = None,
    swtpm_tcp: str | None = None,
    mssim: str | None = None,
    access: SocketAccess | None = None,
    allow_any_local_user: bool = False,
    takeover: bool = False,
    credentials: Credentials | None = None,
) -> None:
    """Serve VM ``name``'s vTPM on tcti-swtpm (unix or TCP) or tcti-mssim sockets.

    ``access`` applies to the unix sockets of ``swtpm``; TCP needs
    ``allow_any_local_user``. Everything is checked before K2 is opened.
    """
    tcp: tuple[str, str] | None = None
    if swtpm_tcp is not None:
        tcp = ("--swtpm-tcp", swtpm_tcp)
    elif mssim is not None:
        tcp = ("--mssim", mssim)
    elif swtpm is None:
        raise ValueError("give one of swtpm, swtpm_tcp, mssim")
    address: tuple[str, int] | None = None
    if tcp is not None:
        address = _host_port(*tcp)
        if access is not None:
            raise EndpointError("--mode/--owner/--group apply to unix sockets (--swtpm PATH); "
                                "TCP has no permissions")
        if not allow_any_local_user:
            raise EndpointError(
                f"{tcp[0]} lets every local user use {name}'s TPM (TCP has no permissions); "
                f"add {ANY_LOCAL_USER_FLAG} to accept that, or serve --swtpm PATH")
    label = f"vm serve {tcp[0]} {tcp[1]}" if tcp is not None else f"vm serve --swtpm {swtpm}"
    ending = _Ending()
    backend = _attached(state, name, label, takeover, credentials, ending)
    endpoint: SwtpmTssEndpoint | MssimEndpoint
    if swtpm is not None:
        endpoint = SwtpmTssEndpoint(backend, path=swtpm, access=access or OWNER_ONLY)
        where = f"swtpm:path={swtpm}"
    elif swtpm_tcp is not None:
        assert address is not None
        endpoint = SwtpmTssEndpoint(backend, host=address[0], port=address[1])
    else:
        assert address is not None
        endpoint = MssimEndpoint(backend, host=address[0], port=address[1])
    ending.stopped = endpoint.stopped
    try:
        endpoint.start()
        if not isinstance(endpoint, SwtpmTssEndpoint) or endpoint.path is None:
            kind = "mssim" if isinstance(endpoint, MssimEndpoint) else "swtpm"
            where = f"{kind}:host={endpoint.host},port={endpoint.port}"
        print(f"serving {name}: TPM2TOOLS_TCTI={where}", flush=True)
        log.log("endpoint.serving", vm=name, tcti=where)
        run_until_signal(endpoint)
    finally:
        endpoint.close()
        endpoint.tpm.close()
    ending.check()


def tpm_command(
    state: StateDir, name: str, command: bytes, *, credentials: Credentials | None = None
) -> bytes:
    """``sgxvtpm vm tpm NAME HEX``: one raw TPM command over K2, its raw response.

    It attaches without a takeover and never powers the TPM on or off: a
    running TPM keeps its state, and a TPM that is not started answers what
    a stopped TPM answers (TPM_RC_FAILURE). Refused, naming the holder, while
    another endpoint holds the VM's TPM.
    """
    binding = VmBinding.load(state, name, credentials=credentials)
    client = K2Client(binding, label="vm tpm")
    try:
        client.connect()
    except K2Busy as exc:
        raise exc.with_hint(
            "`vm tpm` does not take the TPM over: send the command through that endpoint, "
            "or stop it first"
        ) from None
    try:
        return client.transact(command)
    finally:
        client.close()
