"""``swtpm_setup`` for libvirt: a new sgxvtpm VM for a libvirt domain's TPM.

libvirt runs it when it has just created the domain's TPM state directory
(``/var/lib/libvirt/swtpm/UUID/tpm2``). The VM is created over K1 with the
operator credentials of the configuration (config.py), named after
libvirt's ``--vmid NAME:UUID`` (options.vm_name), with an EK of the kind
swtpm_setup would make (RSA 2048; ``--ecc``: ECC P-256; ``--rsa-keysize
3072``) certified by the manager CA, and the platform certificate. Into the
TPM state directory go only the VM's binding (its key 0600, certificates,
the pinned platform root: what ``swtpm socket`` needs to open K2) and the
marker naming the VM and hostd; the TPM state stays sealed with hostd.

The operator's credentials directory records which VM belongs to which
libvirt directory (``hosts/HOST/libvirt/NAME``), for ``sgxvtpm vm gc``
(gc.py): libvirt removes the directory on ``virsh undefine`` and runs
nothing else. It keeps a copy of the binding too (``hosts/HOST/vms/NAME``):
``--overwrite`` on a directory without a binding is libvirt recreating it for
an incoming domain (a restore after the directory was removed), and the
directory is then bound again to the VM its record names, if that VM is still
on this host: the saved state blobs are sealed to its instance.

Otherwise the domain comes from elsewhere. If this host is in a fleet, it is
an incoming domain from another member (a ``virsh save`` there restored here,
or a migration): its VM must be made ``--incoming`` under the name it has on
the source, ``DOMAIN-UUID``, because that name is what the VM's fleet key and
its state blobs are bound to. libvirt gives this call the directory only (no
``--vmid``), and the domain's name is not in it, so swtpm_setup leaves a
``pending_incoming`` marker and makes no VM; ``swtpm socket``, which libvirt
starts next with ``--log file=.../DOMAIN-swtpm.log``, makes the incoming VM
(:func:`make_incoming`) before it serves QEMU's ``-incoming`` state. Outside a
fleet, a new VM is made, marked ``incoming_new`` so that ``swtpm socket``'s
log says why the blobs are refused.

Exit status 0 on success; otherwise 1, and the reason in ``--logfile``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from sgxvtpm.endpoint.libvirt.config import MARKER, ConfigError, Marker, locate
from sgxvtpm.endpoint.libvirt.gc import RECORDS, collect_one, record_path
from sgxvtpm.endpoint.libvirt.options import (
    SETUP_FEATURES,
    VERSION,
    OptionError,
    SetupArgs,
    info_text,
    parse_setup,
    vm_name,
)
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.util import log
from sgxvtpm.util.durable import atomic_write
from sgxvtpm.vmm.client import VmmClient
from sgxvtpm.vmm.credentials import (
    BINDING_FILES,
    Credentials,
    HostCredentials,
    private_directory,
)
from sgxvtpm.wire import k1


class SetupError(SgxvtpmError):
    """swtpm_setup cannot make the VM; the message (in libvirt's log file) says why."""


def _drop_passwords(fds: tuple[int, ...]) -> None:
    # The state is sealed to the instance enclave: a password would add nothing.
    for fd in fds:
        with contextlib.suppress(OSError):
            while os.read(fd, 4096):
                pass
        with contextlib.suppress(OSError):
            os.close(fd)


def bound(tpm_state: Path) -> Marker | None:
    """The marker of ``tpm_state`` if the binding it names is there too."""
    marker = Marker.read(tpm_state)
    if marker is None or marker.pending_incoming:
        return None
    host = Credentials.at(tpm_state).host(StateDir.at(marker.state_dir))
    return marker if (host.vm(marker.vm) / "instance.json").exists() else None


def recorded_vm(host: HostCredentials, tpm_state: Path) -> str | None:
    """The VM whose record (gc.py) names ``tpm_state``: the VM swtpm_setup made for
    this libvirt directory before libvirt recreated it."""
    where = f"{tpm_state.resolve()}\n"
    with contextlib.suppress(FileNotFoundError):
        for record in sorted((host.root / RECORDS).iterdir()):
            with contextlib.suppress(OSError, UnicodeDecodeError):
                if not record.name.startswith(".") and record.read_text() == where:
                    return record.name
    return None


async def install_binding(client: VmmClient, name: str, tpm_state: Path) -> None:
    """Copy VM ``name``'s binding from the operator's credentials into ``tpm_state``
    (with this host's pinned root): what ``swtpm socket`` opens K2 with."""
    source = client.host.vm(name)
    target = Credentials.at(tpm_state).host(client.state)
    target.pin(await client.pinned_root())
    directory = target.vm(name)
    private_directory(directory.parent)
    private_directory(directory)
    for file in BINDING_FILES:
        atomic_write(directory / file, (source / file).read_bytes(),
                     0o600 if file == "vm.key" else 0o644)


async def _rebind(client: VmmClient, tpm_state: Path, say: IO[str]) -> str | None:
    """libvirt recreated the directory of a VM of this host (``--overwrite`` on an
    empty directory: a restore or an incoming migration): bind it to that VM again,
    so that the saved state blobs, sealed to its instance, load. The VM's name, or
    None if this directory had none here (or it was destroyed since)."""
    name = recorded_vm(client.host, tpm_state)
    if name is None:
        return None
    if name not in {info.name for info in await client.list()}:
        print(f"VM {name} of {tpm_state} is no longer on this host (destroyed by "
              "`sgxvtpm vm gc` after libvirt removed the directory?): making a new one",
              file=say)
        record_path(client.host, name).unlink(missing_ok=True)
        client.host.remove_binding(name)
        return None
    if not (client.host.vm(name) / "vm.key").exists():
        raise SetupError(f"VM {name} of {tpm_state} is on this host, but the operator's "
                         f"credentials ({client.host.root}) hold no copy of its binding "
                         "(made by an older sgxvtpm): its state cannot be restored here")
    await install_binding(client, name, tpm_state)
    atomic_write(tpm_state / MARKER,
                 Marker(name, str(client.state.root.resolve())).dumps().encode(), 0o600)
    log.log("libvirt.setup_rebound", vm=name, tpm_state=str(tpm_state))
    print(f"Bound {tpm_state} again to sgxvtpm VM {name} (its instance and TPM state "
          "are kept)", file=say)
    return name


async def _setup(args: SetupArgs, say: IO[str]) -> None:
    tpm_state = Path(args.tpm_state)
    if args.reconfigure:
        raise SetupError("--reconfigure: the PCR banks of an existing sgxvtpm instance cannot "
                         "be changed; undefine the TPM (or the domain) to make a new one")
    existing = bound(tpm_state)
    where = locate()
    state = StateDir.at(where.state_dir)
    client = VmmClient(state, credentials=Credentials.at(where.credentials))
    incoming = False
    if existing is not None:
        if not args.overwrite:
            if args.not_overwrite:
                print(f"Not overwriting existing state: VM {existing.vm}", file=say)
                return
            raise SetupError(f"{tpm_state} holds VM {existing.vm} already: give --overwrite "
                             "to replace it (its TPM state is lost) or --not-overwrite")
        print(f"Overwriting: destroying VM {existing.vm}", file=say)
        await client.destroy(existing.vm, export=Credentials.at(tpm_state))
        record_path(client.host, existing.vm).unlink(missing_ok=True)
    elif args.overwrite:
        if await _rebind(client, tpm_state, say) is not None:
            return
        if (await client.request(k1.FleetShow())).fleet.fleet_id:
            atomic_write(tpm_state / MARKER, Marker("", str(state.root.resolve()),
                                                    pending_incoming=True).dumps().encode(),
                         0o600)
            log.log("libvirt.setup_incoming_pending", tpm_state=str(tpm_state))
            print(f"No VM of {tpm_state} on this host, which is in a fleet: an incoming "
                  "domain from another member; swtpm socket makes its incoming VM, named "
                  "after the domain", file=say)
            return
        incoming = True
    name = vm_name(args.vmid, args.tpm_state)
    # An instance of that name whose libvirt directory is gone (undefined, not yet
    # collected) would make the manager refuse the name.
    await collect_one(client, name)
    # The binding stays in the operator's credentials too: libvirt may recreate the
    # directory (a restore, an incoming migration) and swtpm_setup then binds it again.
    info = await client.create(name, pcr_banks=list(args.pcr_banks) or None, ek=[args.ek])
    record = record_path(client.host, name)
    record.parent.mkdir(mode=0o700, exist_ok=True)
    atomic_write(record, f"{tpm_state.resolve()}\n".encode(), 0o600)
    await install_binding(client, name, tpm_state)
    atomic_write(tpm_state / MARKER,
                 Marker(name, str(state.root.resolve()), incoming).dumps().encode(), 0o600)
    log.log("libvirt.setup_created", vm=name, instance=info.instance_id,
            tpm_state=str(tpm_state), vmid=args.vmid, incoming=incoming)
    print(f"Created sgxvtpm VM {name} (instance {info.instance_id}, EK {args.ek}, "
          f"certificates by the manager CA) for {args.vmid or tpm_state}", file=say)


def libvirt_domain(log_file: str | None) -> str:
    """The domain's name in libvirt's swtpm log path, ``DIR/DOMAIN-swtpm.log`` (libvirt
    9.0's qemu_tpm.c names it so; ``swtpm socket`` is given it, swtpm_setup is not on
    an incoming domain)."""
    suffix = "-swtpm.log"
    base = os.path.basename(log_file or "")
    if not base.endswith(suffix) or base == suffix:
        raise SetupError(f"an incoming domain from another fleet member: its VM is named "
                         f"after the domain, which libvirt's --log file=DIR/DOMAIN{suffix} "
                         f"gives, but the log is {log_file or 'not a file'}")
    return base[: -len(suffix)]


async def make_incoming(tpm_state: Path, domain: str) -> Marker:
    """Make the incoming VM of a directory swtpm_setup left ``pending_incoming``: named
    as on the source (``DOMAIN-UUID``, options.vm_name), recorded and bound as
    swtpm_setup binds a VM. Its marker."""
    where = locate()
    state = StateDir.at(where.state_dir)
    client = VmmClient(state, credentials=Credentials.at(where.credentials))
    name = vm_name(domain, str(tpm_state))
    await collect_one(client, name)  # an undefined namesake, not yet collected
    info = await client.create(name, incoming=True)
    record = record_path(client.host, name)
    record.parent.mkdir(mode=0o700, exist_ok=True)
    atomic_write(record, f"{tpm_state.resolve()}\n".encode(), 0o600)
    await install_binding(client, name, tpm_state)
    marker = Marker(name, str(state.root.resolve()), fleet_incoming=True)
    atomic_write(tpm_state / MARKER, marker.dumps().encode(), 0o600)
    log.log("libvirt.incoming_created", vm=name, instance=info.instance_id,
            tpm_state=str(tpm_state))
    return marker


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_setup(argv)
    except OptionError as exc:
        print(f"swtpm_setup: {exc}", file=sys.stderr)
        return 1
    version_line = f"TPM emulator setup tool version {VERSION} (sgxvtpm)"
    info = info_text(args, "swtpm_setup", SETUP_FEATURES, version_line)
    if info is not None:
        print(info)
        return 0
    _drop_passwords(args.password_fds)
    out: IO[str] = sys.stderr
    if args.logfile:
        try:
            out = open(args.logfile, "a", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            print(f"swtpm_setup: --logfile {args.logfile}: {exc.strerror}", file=sys.stderr)
            return 1
    log.configure("swtpm_setup", out)
    try:
        asyncio.run(_setup(args, out))
        return 0
    except (SgxvtpmError, ConfigError, OSError, ValueError) as exc:
        print(f"swtpm_setup: error: {exc or type(exc).__name__}", file=out)
        if out is not sys.stderr:
            print(f"swtpm_setup: error: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        out.flush()
        if out is not sys.stderr:
            out.close()


if __name__ == "__main__":
    sys.exit(main())
