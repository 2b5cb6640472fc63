"""The ``sgxvtpm`` command line.

Errors are one clear line on stderr and a non-zero exit status; never a
traceback for a user mistake or an unreachable hostd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sgxvtpm.host.statedir import ENV, StateDir
from sgxvtpm.platform import DEFAULT_PLATFORM, PLATFORMS
from sgxvtpm.vmm.credentials import ENV as CREDENTIALS_ENV
from sgxvtpm.vmm.credentials import Credentials
from sgxvtpm.wire.k1 import InstanceInfo

ANY_LOCAL_USER = "--allow-any-local-user"  # the TCP consent of `vm serve`


def _add_state_dir(parser: argparse.ArgumentParser, top: bool = False) -> None:
    # Subcommands use SUPPRESS so they do not overwrite a value given before them.
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None if top else argparse.SUPPRESS,
        help=f"hostd's state directory (env {ENV}, default ~/.local/state/sgxvtpm)",
    )


def _add_credentials(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--credentials", type=Path, metavar="DIR", help=help_text)


_CREDENTIALS_HELP = (
    f"credentials directory holding the VM's binding (env {CREDENTIALS_ENV}, "
    "default ~/.config/sgxvtpm)"
)


def _version() -> str:
    """The installed distribution's version; the package's ``__version__`` when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sgxvtpm")
    except PackageNotFoundError:
        import sgxvtpm

        return str(getattr(sgxvtpm, "__version__", "unknown"))


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked (importlib.metadata costs start-up time)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(f"sgxvtpm {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgxvtpm",
        description="vTPMs for VMs, with the manager and every instance in an enclave",
    )
    parser.add_argument(
        "--version", action=_VersionAction, nargs=0, help="print sgxvtpm's version and exit"
    )
    _add_state_dir(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    hostd = sub.add_parser("hostd", help="run the SGX module (loader + relay) in the foreground")
    _add_state_dir(hostd)
    hostd.add_argument(
        "--user", metavar="USER[:GROUP]",
        help="started as root, run as this unprivileged user once the platform is open",
    )
    hostd.add_argument(
        "--operator-cert", type=Path, metavar="FILE",
        help="the operator's certificate for the manager to pin on first start "
             f"(default: operator.crt of your credentials directory, env {CREDENTIALS_ENV})",
    )
    hostd.add_argument(
        "--platform", choices=PLATFORMS, default=DEFAULT_PLATFORM,
        help=f"the platform backend the enclaves run on (default {DEFAULT_PLATFORM}; "
             "gramine needs SGX hardware)",
    )
    hostd.add_argument(
        "--reset-manager",
        action="store_true",
        help="only after the manager registry was lost: start a new, empty registry."
        " EVERY VM REGISTERED ON THIS HOST BECOMES UNRECOVERABLE (its vTPM state can"
        " never be opened again). Refused while the registry is intact",
    )

    vm = sub.add_parser("vm", help="manage vTPM instances (the VMM, over K1)")
    vm_sub = vm.add_subparsers(dest="vm_command", required=True)
    create = vm_sub.add_parser("create", help="create a vTPM instance for a VM")
    create.add_argument("name")
    create.add_argument("--pcr-banks", default="sha256", help="comma-separated, e.g. sha256,sha1")
    create.add_argument("--ek", default="", help="EK algorithms (rsa2048,ecc-p256,...)")
    create.add_argument(
        "--vm-pubkey", type=Path, help="PEM public key of the VM (default: a new key)"
    )
    for name, helptext in (("list", "list instances"), ("show", "show one instance")):
        p = vm_sub.add_parser(name, help=helptext)
        if name == "show":
            p.add_argument("name")
        p.add_argument("--json", action="store_true")
        _add_state_dir(p)
    destroy = vm_sub.add_parser("destroy", help="destroy an instance and erase its sealed state")
    destroy.add_argument("name")
    attach = vm_sub.add_parser("attach", help="serve a swtpm-compatible control socket for QEMU")
    attach.add_argument("name")
    attach.add_argument("--ctrl", type=Path, required=True, help="unix socket path for QEMU")
    serve = vm_sub.add_parser("serve", help="serve TSS sockets (tcti-swtpm / tcti-mssim)")
    serve.add_argument("name")
    group = serve.add_mutually_exclusive_group(required=True)
    group.add_argument("--swtpm", type=Path, metavar="PATH", help="unix PATH and PATH.ctrl")
    group.add_argument("--swtpm-tcp", metavar="HOST:PORT",
                       help=f"TCP on loopback, ports PORT and PORT+1 (needs {ANY_LOCAL_USER})")
    group.add_argument("--mssim", metavar="HOST:PORT",
                       help=f"TCP on loopback, ports PORT and PORT+1 (needs {ANY_LOCAL_USER})")
    serve.add_argument(ANY_LOCAL_USER, action="store_true",
                       help="serve on TCP although ANY local user (every uid on this host) can "
                       "then connect and use this VM's TPM: read its NV, use its keys, extend "
                       "its PCRs. TCP has no permissions; prefer --swtpm PATH")
    for p in (attach, serve):
        p.add_argument("--mode", metavar="OCTAL",
                       help="permissions of the unix sockets (default 0600: the owner only)")
        p.add_argument("--owner", metavar="USER", help="owner of the unix sockets (name or uid)")
        p.add_argument("--group", metavar="GROUP", help="group of the unix sockets (name or gid)")
        p.add_argument("--takeover", action="store_true",
                       help="replace the VM's connected endpoint (its session ends) instead of "
                       "being refused; the TPM keeps running, it is not reset")
    for p in (create, destroy, attach, serve):
        _add_state_dir(p)
    _add_credentials(create, "write the VM's binding (key, certificates, pinned platform root) "
                             "to this credentials directory instead of yours, for whoever runs "
                             "its endpoint")
    _add_credentials(destroy, "also remove the VM's binding from this credentials directory")
    for p in (attach, serve):
        _add_credentials(p, _CREDENTIALS_HELP)

    ca = sub.add_parser("ca", help="the manager's EK CA")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    ca_show = ca_sub.add_parser("show", help="print the CA certificate")
    ca_show.add_argument("--pem", action="store_true")
    _add_state_dir(ca_show)

    attest = sub.add_parser("attest", help="verify a VM's vTPM (EK -> manager CA -> quote)")
    attest_sub = attest.add_subparsers(dest="attest_command", required=True)
    verify = attest_sub.add_parser("verify", help="check a VM's EK certificates down to the quote")
    verify.add_argument("name")
    verify.add_argument("--ca", default="vm", metavar="vm|manager|PATH",
                        help="CA certificate: the VM binding's ca.crt (default), the manager's, "
                             "or a file")
    verify.add_argument("--tcti", help="read the TPM through this TCTI instead of K2")
    verify.add_argument("--ek", default="", help="EK kinds to check (default: the VM's)")
    _add_state_dir(verify)
    _add_credentials(verify, _CREDENTIALS_HELP)

    demo = sub.add_parser("demo", help="start hostd, create a VM's vTPM, use it")
    _add_state_dir(demo)
    bench = sub.add_parser("bench", help="run the benchmark suite (writes BENCHMARKS.md)")
    bench.add_argument("--quick", action="store_true")
    return parser


def _state(args: argparse.Namespace) -> StateDir:
    return StateDir.at(args.state_dir)


def _credentials(args: argparse.Namespace) -> Credentials | None:
    path = getattr(args, "credentials", None)
    return None if path is None else Credentials.at(path)


def _print(info: InstanceInfo | list[InstanceInfo], as_json: bool) -> None:
    obj: Any = [i.to_json() for i in info] if isinstance(info, list) else info.to_json()
    if as_json:
        print(json.dumps(obj, indent=2, sort_keys=True))
    elif isinstance(obj, list):
        print(f"{'NAME':<20} {'STATE':<14} {'PID':>8}  INSTANCE")
        for item in obj:
            print(f"{item['name']:<20} {item['state']:<14} {item.get('pid') or '-':>8}  "
                  f"{item['instance_id']}")
    else:
        for key in ("name", "instance_id", "state", "reason", "pid", "mrenclave", "mrsigner",
                    "pcr_banks"):
            if obj.get(key) not in (None, ""):
                print(f"{key:<12} {obj[key]}")


async def _vm(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from sgxvtpm.vmm.client import VmmClient

    client = VmmClient(_state(args))
    cmd = args.vm_command
    if cmd == "create":
        from sgxvtpm.tpm.ek import check_pcr_banks

        pcr_banks = [b for b in args.pcr_banks.split(",") if b]
        try:  # before anything is contacted
            check_pcr_banks(pcr_banks)
        except ValueError as exc:
            raise ValueError(f"--pcr-banks: {exc}") from None
        pub = None
        if args.vm_pubkey is not None:
            loaded = serialization.load_pem_public_key(args.vm_pubkey.read_bytes())
            if not isinstance(loaded, ec.EllipticCurvePublicKey):
                raise ValueError(f"{args.vm_pubkey}: not an ECDSA public key")
            pub = loaded
        info = await client.create(
            args.name,
            pcr_banks=pcr_banks,
            ek=[e for e in args.ek.split(",") if e],
            vm_public_key=pub,
            export=_credentials(args),
        )
        _print(info, False)
    elif cmd == "list":
        _print(await client.list(), args.json)
    elif cmd == "show":
        _print(await client.show(args.name), args.json)
    elif cmd == "destroy":
        connected = await _connected_endpoint(client, args.name)
        await client.destroy(args.name, export=_credentials(args))
        if connected:
            print(f"{args.name} had a connected endpoint ({connected}); it exits")
        print(f"destroyed {args.name}")
    return 0


async def _connected_endpoint(client: Any, name: str) -> str:
    """Who holds VM ``name``'s seat, as its instance says ("" if no one, or unknown)."""
    from sgxvtpm.endpoint.k2 import describe_holder
    from sgxvtpm.errors import SgxvtpmError
    try:
        info = await client.show(name)
    except SgxvtpmError:
        return ""  # destroy says why, if the VM is not there
    if info.endpoint_pid is None and not info.endpoint:
        return ""
    holder: dict[str, Any] = {"pid": info.endpoint_pid, "endpoint": info.endpoint}
    if info.endpoint_since:
        holder["since"] = info.endpoint_since
    return describe_holder(holder)


def _vm_endpoint(args: argparse.Namespace) -> int:
    """``vm attach`` / ``vm serve``: blocking endpoints, a thread per connection, no
    event loop (asyncio cost more CPU per command; BENCHMARKS.md has the figures)."""
    from sgxvtpm.endpoint.listeners import OWNER_ONLY, SocketAccess
    from sgxvtpm.endpoint.serve import attach, serve_tss

    access = None
    if (args.mode, args.owner, args.group) != (None, None, None):
        access = SocketAccess.parse(args.mode, args.owner, args.group)
    if args.vm_command == "attach":
        attach(_state(args), args.name, args.ctrl, access=access or OWNER_ONLY,
               takeover=args.takeover, credentials=_credentials(args))
    else:
        serve_tss(_state(args), args.name, swtpm=args.swtpm, swtpm_tcp=args.swtpm_tcp,
                  mssim=args.mssim, access=access,
                  allow_any_local_user=args.allow_any_local_user, takeover=args.takeover,
                  credentials=_credentials(args))
    return 0


async def _ca(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import hashes, serialization

    from sgxvtpm.vmm.client import VmmClient

    cert = await VmmClient(_state(args)).ca_certificate()
    if args.pem:
        sys.stdout.write(cert.public_bytes(serialization.Encoding.PEM).decode())
    else:
        print(f"subject  {cert.subject.rfc4514_string()}")
        print(f"serial   {cert.serial_number:x}")
        print(f"sha256   {cert.fingerprint(hashes.SHA256()).hex()}")
    return 0


def _bench(quick: bool) -> int:
    """``sgxvtpm bench``: the suite lives in the source tree's benchmarks/, not in the package."""
    try:
        from benchmarks.run import main as bench_main
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", "benchmarks.run"):
            raise
        raise RuntimeError(
            "the benchmark suite is not installed with the package: run `make bench` "
            "(or `sgxvtpm bench`) from a source checkout, where benchmarks/ is"
        ) from None
    return int(bench_main(["--quick"] if quick else []))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "name", None) is not None:
            from sgxvtpm.enclaves.registry import check_vm_name

            # The manager enclave refuses a bad name too; asking first gives the
            # same one-line error without a round trip, and before a bad name
            # becomes a path under the state directory.
            check_vm_name(args.name)
        if args.command == "hostd":
            from sgxvtpm.host.hostd import RESET_EFFECT, RunAs, serve
            from sgxvtpm.vmm.credentials import hostd_operator_certificate

            if args.reset_manager:
                print(f"sgxvtpm: warning: --reset-manager: {RESET_EFFECT}", file=sys.stderr)
            run_as = RunAs.parse(args.user) if args.user else None
            state = _state(args)
            asyncio.run(
                serve(
                    state,
                    operator_cert=lambda: hostd_operator_certificate(state, args.operator_cert),
                    platform=args.platform,
                    run_as=run_as,
                    reset_manager=args.reset_manager,
                )
            )
            return 0
        if args.command == "vm":
            if args.vm_command in ("attach", "serve"):
                return _vm_endpoint(args)
            return asyncio.run(_vm(args))
        if args.command == "ca":
            return asyncio.run(_ca(args))
        if args.command == "attest":
            from sgxvtpm.attest.cli import run as attest_run

            return attest_run(_state(args), args.name, ca=args.ca, tcti=args.tcti,
                              eks=[e for e in args.ek.split(",") if e],
                              credentials=_credentials(args))
        if args.command == "demo":
            from sgxvtpm._demo.demo import run_demo

            return run_demo(_state(args) if args.state_dir else None)
        if args.command == "bench":
            return _bench(args.quick)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, never a traceback, for the CLI
        name = type(exc).__name__
        message = str(exc) or name
        print(f"sgxvtpm: error: {message}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
