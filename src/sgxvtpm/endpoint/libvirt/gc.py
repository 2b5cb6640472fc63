"""``sgxvtpm vm gc``: destroy the VMs libvirt forgot.

``virsh undefine`` removes the domain's TPM state directory
(``/var/lib/libvirt/swtpm/UUID``) and runs nothing of ours, so the instance
``swtpm_setup`` made would live on unused. swtpm_setup records, in the
operator's credentials directory, each VM it made and the libvirt directory
holding its binding (``hosts/HOST/libvirt/NAME``: that path). A collection
destroys (over K1, as the operator) each recorded VM whose directory no
longer holds its binding, logs ``libvirt.gc_destroyed`` and drops the
record. Only recorded VMs are ever considered: a VM made by ``vm create``
is never touched.

hostd cannot do this itself: it is untrusted and holds no operator key. Run
``sgxvtpm vm gc`` from the operator's side (a systemd timer, or libvirt's
``/etc/libvirt/hooks/qemu`` on ``release``).
"""

from __future__ import annotations

from pathlib import Path

from sgxvtpm.endpoint.libvirt.config import ConfigError, Marker
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.util import log
from sgxvtpm.vmm.client import VmmClient
from sgxvtpm.vmm.credentials import Credentials, HostCredentials

RECORDS = "libvirt"


def record_path(host: HostCredentials, name: str) -> Path:
    """Where the operator's credentials record which libvirt directory VM ``name`` is in."""
    host.vm(name)  # one path component, or CredentialsError
    return host.root / RECORDS / name


def orphaned(tpm_state: Path, name: str, state: StateDir) -> bool:
    """True if ``tpm_state`` no longer holds VM ``name``'s binding (libvirt removed it,
    or a newer swtpm_setup put another VM there)."""
    try:
        marker = Marker.read(tpm_state)
    except ConfigError:
        return False  # unreadable is not gone: leave it to the operator
    if marker is None or marker.vm != name:
        return True
    return not (Credentials.at(tpm_state).host(state).vm(name) / "instance.json").exists()


async def collect_one(client: VmmClient, name: str) -> bool:
    """Destroy VM ``name`` if it is recorded and orphaned; True if it was."""
    record = record_path(client.host, name)
    try:
        tpm_state = Path(record.read_text().strip())
    except FileNotFoundError:
        return False
    if not orphaned(tpm_state, name, client.state):
        return False
    known = {info.name for info in await client.list()}
    if name in known:
        await client.destroy(name)
    record.unlink(missing_ok=True)
    log.log("libvirt.gc_destroyed", vm=name, tpm_state=str(tpm_state),
            reason="its libvirt TPM state directory no longer holds its binding",
            existed=name in known)
    return True


async def collect(client: VmmClient) -> list[str]:
    """Destroy every recorded VM whose libvirt directory lost its binding; their names."""
    directory = client.host.root / RECORDS
    try:
        names = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    except FileNotFoundError:
        return []
    return [name for name in names if await collect_one(client, name)]
