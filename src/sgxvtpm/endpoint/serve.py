"""``sgxvtpm vm attach`` and ``sgxvtpm vm serve``: the VM endpoints over K2.

Both load the VM's binding from a credentials directory
(sgxvtpm/vmm/credentials.py), open K2 to its instance enclave lazily (on the
first request) and serve until SIGTERM/SIGINT. They
run in the main thread (no event loop): connections are served by threads.
"""

from __future__ import annotations

from pathlib import Path

from sgxvtpm.endpoint.k2 import K2Client, VmBinding
from sgxvtpm.endpoint.lifecycle import run_until_signal
from sgxvtpm.endpoint.qemu import QemuEndpoint
from sgxvtpm.endpoint.tss import MssimEndpoint, SwtpmTssEndpoint
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.util import log
from sgxvtpm.vmm.credentials import Credentials


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def attach(
    state: StateDir, name: str, ctrl: Path, *, credentials: Credentials | None = None
) -> None:
    """Serve VM ``name``'s vTPM to QEMU on the swtpm control socket ``ctrl``."""
    binding = VmBinding.load(state, name, credentials=credentials)
    endpoint = QemuEndpoint(K2Client(binding), ctrl)
    try:
        endpoint.start()
        print(f"attached {name}: -chardev socket,id=chrtpm,path={ctrl} "
              "-tpmdev emulator,id=tpm0,chardev=chrtpm", flush=True)
        log.log("endpoint.attached", vm=name, ctrl=str(ctrl))
        run_until_signal(endpoint)
    finally:
        endpoint.close()
        endpoint.tpm.close()


def serve_tss(
    state: StateDir,
    name: str,
    *,
    swtpm: Path | None = None,
    swtpm_tcp: str | None = None,
    mssim: str | None = None,
    credentials: Credentials | None = None,
) -> None:
    """Serve VM ``name``'s vTPM on tcti-swtpm (unix or TCP) or tcti-mssim sockets."""
    backend = K2Client(VmBinding.load(state, name, credentials=credentials))
    endpoint: SwtpmTssEndpoint | MssimEndpoint
    if swtpm is not None:
        endpoint = SwtpmTssEndpoint(backend, path=swtpm)
        where = f"swtpm:path={swtpm}"
    elif swtpm_tcp is not None:
        host, port = _host_port(swtpm_tcp)
        endpoint = SwtpmTssEndpoint(backend, host=host, port=port)
    elif mssim is not None:
        host, port = _host_port(mssim)
        endpoint = MssimEndpoint(backend, host=host, port=port)
    else:
        raise ValueError("give one of swtpm, swtpm_tcp, mssim")
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
