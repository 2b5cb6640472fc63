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
nothing else.

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
from sgxvtpm.endpoint.libvirt.gc import collect_one, record_path
from sgxvtpm.endpoint.libvirt.options import (
    SETUP_FEATURES,
    VERSION,
    OptionError,
    SetupArgs,
    capabilities,
    parse_setup,
    vm_name,
)
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.util import log
from sgxvtpm.util.durable import atomic_write
from sgxvtpm.vmm.client import VmmClient
from sgxvtpm.vmm.credentials import Credentials


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
    if marker is None:
        return None
    host = Credentials.at(tpm_state).host(StateDir.at(marker.state_dir))
    return marker if (host.vm(marker.vm) / "instance.json").exists() else None


async def _setup(args: SetupArgs, say: IO[str]) -> None:
    tpm_state = Path(args.tpm_state)
    if args.reconfigure:
        raise SetupError("--reconfigure: the PCR banks of an existing sgxvtpm instance cannot "
                         "be changed; undefine the TPM (or the domain) to make a new one")
    existing = bound(tpm_state)
    where = locate()
    state = StateDir.at(where.state_dir)
    client = VmmClient(state, credentials=Credentials.at(where.credentials))
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
    name = vm_name(args.vmid, args.tpm_state)
    # An instance of that name whose libvirt directory is gone (undefined, not yet
    # collected) would make the manager refuse the name.
    await collect_one(client, name)
    info = await client.create(name, pcr_banks=list(args.pcr_banks) or None, ek=[args.ek],
                               export=Credentials.at(tpm_state))
    record = record_path(client.host, name)
    record.parent.mkdir(mode=0o700, exist_ok=True)
    atomic_write(record, f"{tpm_state.resolve()}\n".encode(), 0o600)
    atomic_write(tpm_state / MARKER,
                 Marker(name, str(state.root.resolve())).dumps().encode(), 0o600)
    log.log("libvirt.setup_created", vm=name, instance=info.instance_id,
            tpm_state=str(tpm_state), vmid=args.vmid)
    print(f"Created sgxvtpm VM {name} (instance {info.instance_id}, EK {args.ek}, "
          f"certificates by the manager CA) for {args.vmid or tpm_state}", file=say)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_setup(argv)
    except OptionError as exc:
        print(f"swtpm_setup: {exc}", file=sys.stderr)
        return 1
    if args.print_capabilities:
        print(capabilities("swtpm_setup", SETUP_FEATURES))
        return 0
    if args.version:
        print(f"TPM emulator setup tool version {VERSION} (sgxvtpm)")
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
