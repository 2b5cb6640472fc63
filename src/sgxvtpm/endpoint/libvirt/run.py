"""The heavy half of ``swtpm socket``: attach to the VM's instance, serve the bound socket.

The VM is the one ``swtpm_setup`` made for this libvirt TPM state directory
(its marker names the VM and hostd's state directory; the binding, the VM's
key and certificates, is in the same directory). Serving is ``vm attach``'s
:class:`~sgxvtpm.endpoint.qemu.QemuEndpoint` on the socket swtpm.py already
listens on; like swtpm, it ends on CMD_SHUTDOWN, on SIGTERM, and with
``--terminate`` when the data channel's peer (QEMU) goes. Failures go to the log
(libvirt's ``--log file=``) as one line, and the socket is removed so that
QEMU fails at once instead of waiting.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

from sgxvtpm.endpoint.backend import VmTpm
from sgxvtpm.endpoint.ctrl import CtrlHandler
from sgxvtpm.endpoint.k2 import K2Busy, K2Client, VmBinding
from sgxvtpm.endpoint.libvirt.config import ConfigError, Marker
from sgxvtpm.endpoint.libvirt.options import SwtpmSocketArgs
from sgxvtpm.endpoint.lifecycle import run_until_signal
from sgxvtpm.endpoint.qemu import QemuEndpoint
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.util import log
from sgxvtpm.vmm.credentials import Credentials
from sgxvtpm.wire.swtpm_ctrl import CtrlCmd, CtrlRequest, CtrlResponse
from sgxvtpm.wire.vtpm import BlobType

#: A swtpm of the same VM that libvirt is stopping may still hold the VM's
#: TPM (the instance serves one endpoint): wait this long for it to let go.
BUSY_WAIT = 5.0
_PASSWORD_MAX = 65536


def _drain(fds: tuple[int, ...]) -> None:
    """Read and drop the state-encryption passwords libvirt writes (the state is
    sealed to the instance enclave; a password would add nothing), so that
    libvirt's writer is never blocked."""

    def run(fd: int) -> None:
        with contextlib.suppress(OSError):
            total = 0
            while total < _PASSWORD_MAX and (chunk := os.read(fd, 4096)):
                total += len(chunk)
        with contextlib.suppress(OSError):
            os.close(fd)

    for fd in fds:
        threading.Thread(target=run, args=(fd,), daemon=True).start()


def _attach(args: SwtpmSocketArgs, label: str) -> tuple[Marker, K2Client]:
    marker = Marker.read(args.tpmstate_dir)
    if marker is None:
        raise ConfigError(f"{args.tpmstate_dir} holds no sgxvtpm binding: run sgxvtpm's "
                          "swtpm_setup first (libvirt does when it creates the directory)")
    if marker.pending_incoming:  # an incoming domain from another fleet member
        import asyncio

        from sgxvtpm.endpoint.libvirt.setup import libvirt_domain, make_incoming

        marker = asyncio.run(make_incoming(Path(args.tpmstate_dir),
                                           libvirt_domain(args.log_file)))
    state = StateDir.at(marker.state_dir)
    binding = VmBinding.load(state, marker.vm, credentials=Credentials.at(args.tpmstate_dir))
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        client = K2Client(binding, label=label)
        try:
            client.connect()
            return marker, client
        except K2Busy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def refused_reason(marker: Marker, blob_type: int) -> str:
    """Why the VM's instance refused a state blob, for libvirt's swtpm log."""
    try:
        kind = BlobType(blob_type).name.lower()
    except ValueError:
        kind = f"type {blob_type}"
    if marker.fleet_incoming:
        return (f"the {kind} state blob was refused by VM {marker.vm}'s incoming instance: "
                "it takes this VM's newest export from another fleet member, once, and "
                "nothing older, nor another VM's; hostd's log (vtpm.state_refused) says why")
    if marker.incoming_new:
        return (f"the {kind} state blob was refused: VM {marker.vm} was made new for this "
                "incoming domain (swtpm_setup --overwrite found no VM of this TPM state "
                "directory on this host), and state saved by another instance (another host, "
                "or a VM destroyed since) is sealed to that instance")
    return (f"the {kind} state blob was refused by VM {marker.vm}'s instance: it takes back "
            "only its own latest export, unused since (not an older save, not one the guest "
            "ran on after, not another instance's); hostd's log (vtpm.state_refused) says which")


class _LoggingCtrlHandler(CtrlHandler):
    """The endpoint's control handler, logging why a SET_STATEBLOB failed (QEMU only
    reports "a parameter is bad")."""

    def __init__(self, tpm: VmTpm, marker: Marker) -> None:
        super().__init__(tpm)
        self.marker = marker

    def handle(self, req: CtrlRequest) -> CtrlResponse:
        rsp = super().handle(req)
        if req.code == CtrlCmd.SET_STATEBLOB and rsp.result != 0:
            log.log("libvirt.swtpm_state_refused", vm=self.marker.vm, result=rsp.result,
                    reason=refused_reason(self.marker, req.blob_type))
        return rsp


def serve(args: SwtpmSocketArgs, listener: socket.socket) -> int:
    """Attach and serve until the endpoint ends; the exit status."""
    log.configure("swtpm")
    path = args.ctrl_path or str(listener.getsockname())
    _drain(args.password_fds)
    try:
        marker, client = _attach(args, f"libvirt swtpm --ctrl {path}")
    except (SgxvtpmError, ConfigError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        log.log("libvirt.swtpm_failed", tpmstate=args.tpmstate_dir, reason=reason)
        if args.ctrl_path:
            with contextlib.suppress(OSError):
                os.unlink(args.ctrl_path)
        listener.close()
        return 1
    endpoint = QemuEndpoint(client, Path(path), listener=listener, exit_on_shutdown=True,
                            terminate=args.terminate)
    endpoint._handler = _LoggingCtrlHandler(endpoint.tpm, marker)  # same handler, logging
    vm = marker.vm
    try:
        endpoint.start()
        log.log("libvirt.swtpm_serving", vm=vm, ctrl=path, pid=os.getpid())
        run_until_signal(endpoint)
    finally:
        endpoint.close()
        endpoint.tpm.close()
    log.log("libvirt.swtpm_ended", vm=vm)
    return 0

