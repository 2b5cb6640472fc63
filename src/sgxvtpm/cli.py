"""The ``sgxvtpm`` command line.

Errors are one clear line on stderr and a non-zero exit status; never a
traceback for a user mistake or an unreachable hostd.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TextIO

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


def _log_option(text: str) -> object:
    from sgxvtpm.util.runfiles import LogSpec

    try:
        return LogSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _pid_option(text: str) -> Path:
    from sgxvtpm.util.runfiles import parse_pid_option

    try:
        return parse_pid_option(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _http_url(text: str) -> str:
    if not text.startswith(("https://", "http://")):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL")
    return text


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def _add_run_files(parser: argparse.ArgumentParser) -> None:
    """swtpm's ``--log`` and ``--pid`` (sgxvtpm/util/runfiles.py)."""
    parser.add_argument(
        "--log", type=_log_option, metavar="file=PATH[,level=LEVEL]",
        help="append the JSON log lines (this process's and its children's stderr) to PATH; "
             "LEVEL is debug, info (default), warning or error",
    )
    parser.add_argument(
        "--pid", type=_pid_option, metavar="file=PATH",
        help="write the process id to PATH while running (removed on a clean exit)",
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
    sub = parser.add_subparsers(dest="command", required=True, help="the command")

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
        "--reset-manager",
        action="store_true",
        help="only after the manager registry was lost: start a new, empty registry."
        " EVERY VM REGISTERED ON THIS HOST BECOMES UNRECOVERABLE (its vTPM state can"
        " never be opened again). Refused while the registry is intact",
    )
    platform = hostd.add_argument_group("the platform")
    platform.add_argument(
        "--platform", choices=PLATFORMS, default=DEFAULT_PLATFORM,
        help=f"the platform backend the enclaves run on (default {DEFAULT_PLATFORM}; "
             "gramine needs SGX hardware, Gramine's tools and DCAP collateral: docs/REAL-SGX.md)",
    )
    platform.add_argument(
        "--release", type=Path, metavar="DIR",
        help="run the vendor's pre-signed build in DIR (sgxvtpm release sign, on the build "
             "host) and sign nothing; without it hostd's platform signs the installed code "
             "at each start (development mode)",
    )
    platform.add_argument(
        "--sim-root", type=Path, metavar="DIR",
        help="sim only: provision this host's platform under the simulated provisioning "
             "authority DIR (sgxvtpm sim-root init), so hosts under one root attest each other",
    )
    platform.add_argument(
        "--pccs", metavar="URL", type=_http_url,
        help="fetch this platform's DCAP collateral from the PCCS at URL at start and "
             "refresh it before its nextUpdate (docs/REAL-SGX.md)",
    )
    platform.add_argument(
        "--pccs-refresh", metavar="SECONDS", type=_positive_seconds,
        help="with --pccs: fetch at least this often (default: at 3/4 of the validity left)",
    )
    counters = hostd.add_argument_group("rollback counters")
    counters.add_argument(
        "--counters", default="sim", metavar="sim|tpm:DEVICE_OR_TCTI",
        help="where the enclaves keep their rollback counters: sim (the sim platform's, "
             "default) or the host's TPM, e.g. tpm:/dev/tpmrm0 or tpm:swtpm:path=SOCKET "
             "(hostd relays the commands; SECURITY.md, 'Rollback counters in a host TPM')",
    )
    counters.add_argument(
        "--counters-key", type=lambda v: int(v, 0), default=None, metavar="HANDLE",
        help="the host TPM key the enclaves pin and salt their sessions to "
             "(default 0x81010001, the RSA EK); pinned at each enclave's first start",
    )
    hostd.add_argument(
        "--fleet-listen", metavar="HOST:PORT",
        help="relay manager-to-manager sessions (the fleet) on this TCP address",
    )
    release = sub.add_parser(
        "release", help="the vendor's build-host step: a signing key and a pre-signed release"
    )
    release_sub = release.add_subparsers(dest="release_command", required=True,
                                         help="what to do")
    keygen = release_sub.add_parser(
        "keygen", help="make a vendor signing key (gramine: RSA-3072, e=3; sim: ECDSA P-256)"
    )
    keygen.add_argument("key", type=Path, metavar="KEY.pem",
                        help="a new file for the private key (0600; never overwritten)")
    keygen.add_argument("--platform", choices=PLATFORMS, default=DEFAULT_PLATFORM,
                        help=f"the platform the key signs for (default {DEFAULT_PLATFORM})")
    rsign = release_sub.add_parser(
        "sign", help="sign the installed enclaves into a release directory for hostd --release"
    )
    rsign.add_argument("--key", type=Path, required=True, metavar="KEY.pem",
                       help="the vendor's signing key (sgxvtpm release keygen)")
    rsign.add_argument("--platform", choices=PLATFORMS, default=DEFAULT_PLATFORM,
                       help=f"the platform hostd runs (default {DEFAULT_PLATFORM})")
    rsign.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="where the signed files and release.json (the clients' pins) go")
    rsign.add_argument(
        "--state-dir", type=Path, default=argparse.SUPPRESS,
        help="gramine: the serving hostd's state directory, which the manifests name "
             f"(env {ENV}, default ~/.local/state/sgxvtpm); sim: unused",
    )
    sim_root = sub.add_parser("sim-root", help="a simulated provisioning authority (sim only)")
    sim_root_sub = sim_root.add_subparsers(dest="sim_root_command", required=True,
                                           help="what to do")
    sim_root_init = sim_root_sub.add_parser(
        "init", help="create a root key and certificate and the vendor's enclave signing key"
    )
    sim_root_init.add_argument("dir", type=Path, help="a new directory for the authority")

    from sgxvtpm.vmm import fleetcmd

    fleetcmd.add_parser(sub)

    vm = sub.add_parser("vm", help="manage vTPM instances (the VMM, over K1)")
    vm_sub = vm.add_subparsers(dest="vm_command", required=True, help="what to do")
    create = vm_sub.add_parser("create", help="create a vTPM instance for a VM")
    create.add_argument("name", help="the VM's name: 1-61 characters of [A-Za-z0-9._-]")
    create.add_argument("--pcr-banks", default="sha256", help="comma-separated, e.g. sha256,sha1")
    create.add_argument("--ek", default="", help="EK algorithms (rsa2048,ecc-p256,...)")
    create.add_argument(
        "--vm-pubkey", type=Path, help="PEM public key of the VM (default: a new key)"
    )
    create.add_argument(
        "--incoming", action="store_true",
        help="no TPM yet: it waits for the VM's state migrated from another fleet member "
             "(vm attach serves QEMU's -incoming)",
    )
    for name, helptext in (("list", "list instances"), ("show", "show one instance")):
        p = vm_sub.add_parser(name, help=helptext)
        if name == "show":
            p.add_argument("name", help="the VM's name")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
        _add_state_dir(p)
    tpm = vm_sub.add_parser(
        "tpm", help="send one raw TPM command to a VM's TPM over K2 and print the response",
        description="Send one raw TPM 2.0 command (header included) to the VM's TPM and "
        "print its response in hex. It never starts, resets or takes over the TPM: it is "
        "refused while an endpoint (vm attach/serve) holds the VM, and a TPM not started yet "
        "answers TPM_RC_FAILURE (80010000000a00000101).",
    )
    tpm.add_argument("name", help="the VM's name")
    tpm.add_argument("hex", metavar="HEX",
                     help="the command in hex, e.g. 80010000000c0000017b0008 (GetRandom 8)")
    _add_state_dir(tpm)
    _add_credentials(tpm, _CREDENTIALS_HELP)
    destroy = vm_sub.add_parser("destroy", help="destroy an instance and erase its sealed state")
    destroy.add_argument("name", help="the VM's name")
    cancel = vm_sub.add_parser(
        "migrate-cancel", help="run a VM's TPM here again after it migrated to another host"
    )
    cancel.add_argument("name", help="the VM's name")
    move = vm_sub.add_parser(
        "migrate", help="move a stopped VM's TPM to another fleet member (cold move)"
    )
    move.add_argument("name", help="the VM's name")
    move.add_argument("--to", required=True, metavar="HOST:PORT",
                      help="the destination's fleet address (its hostd --fleet-listen); "
                           "`vm create NAME --incoming` there first")
    attach = vm_sub.add_parser("attach", help="serve a swtpm-compatible control socket for QEMU")
    attach.add_argument("name", help="the VM's name")
    attach.add_argument("--ctrl", type=Path, required=True, help="unix socket path for QEMU")
    attach.add_argument("--terminate", action="store_true",
                        help="exit after the control channel's CMD_SHUTDOWN, as swtpm does "
                        "(default: keep serving, for the VM's next QEMU)")
    serve = vm_sub.add_parser("serve", help="serve TSS sockets (tcti-swtpm / tcti-mssim)")
    serve.add_argument("name", help="the VM's name")
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
    for p in (hostd, attach, serve):
        _add_run_files(p)
    _add_credentials(create, "write the VM's binding (key, certificates, pinned platform root) "
                             "to this credentials directory instead of yours, for whoever runs "
                             "its endpoint")
    _add_credentials(destroy, "also remove the VM's binding from this credentials directory")
    for p in (attach, serve):
        _add_credentials(p, _CREDENTIALS_HELP)

    gc = vm_sub.add_parser("gc", help="destroy the VMs whose libvirt TPM state directory is gone")
    _add_state_dir(gc)
    _add_credentials(gc, "the operator credentials libvirt's swtpm_setup used "
                         "(default: /etc/sgxvtpm/sgxvtpm.conf's, else yours)")
    libvirt = sub.add_parser("libvirt", help="the swtpm-compatible executables for libvirt")
    libvirt_sub = libvirt.add_subparsers(dest="libvirt_command", required=True,
                                         help="what to do")
    libvirt_path = libvirt_sub.add_parser(
        "path", help="make and print the directory of swtpm, swtpm_setup and swtpm_ioctl "
                     "to put first on libvirtd's PATH")
    libvirt_path.add_argument("--dir", type=Path, help="make it here (default: in this "
                              "installation's prefix, libexec/sgxvtpm-libvirt)")

    ca = sub.add_parser("ca", help="the manager's EK CA")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, help="what to do")
    ca_show = ca_sub.add_parser("show", help="print the CA certificate")
    ca_show.add_argument("--pem", action="store_true", help="print the certificate in PEM")
    ca_show.add_argument("--json", action="store_true",
                         help="print subject, serial, fingerprint and PEM as JSON")
    _add_state_dir(ca_show)

    attest = sub.add_parser("attest", help="verify a VM's vTPM (EK -> manager CA -> quote)")
    attest_sub = attest.add_subparsers(dest="attest_command", required=True,
                                       help="what to do")
    verify = attest_sub.add_parser("verify", help="check a VM's EK certificates down to the quote")
    verify.add_argument("name", help="the VM's name")
    verify.add_argument("--ca", default="vm", metavar="vm|manager|PATH",
                        help="CA certificate: the VM binding's ca.crt (default), the manager's, "
                             "or a file")
    verify.add_argument("--tcti", help="read the TPM through this TCTI instead of K2")
    verify.add_argument("--ek", default="", help="EK kinds to check (default: the VM's)")
    verify.add_argument("--json", action="store_true",
                        help="print the report as JSON (ok, reason, facts, checks)")
    _add_state_dir(verify)
    _add_credentials(verify, _CREDENTIALS_HELP)
    aq = attest_sub.add_parser("quote", help="verify a raw DCAP quote (real or sim) with dcap-qvl")
    aq.add_argument("quote_file", metavar="FILE", type=Path, help="the raw quote (binary)")
    aq.add_argument("--collateral", type=Path, metavar="FILE",
                    help="QuoteCollateralV3 JSON (a PCCS's, or a sim platform's collateral.json)")
    aq.add_argument("--pccs", metavar="URL",
                    help="fetch the collateral from this PCCS instead (cached until nextUpdate)")
    aq.add_argument("--root", default="intel", metavar="intel|PEM",
                    help="trusted root: Intel's SGX Root CA (pinned; default) or a PEM file")
    aq.add_argument("--at", metavar="TIME", help="verify at this time (epoch seconds or ISO 8601)")
    aq.add_argument("--accept", action="append", default=[], metavar="STATUS",
                    help="also accept this TCB status (UpToDate always is); repeatable")
    aq.add_argument("--json", action="store_true",
                    help="print the verified identity and TCB status as JSON")

    gramine = sub.add_parser("gramine", help="the Gramine backend (docs/REAL-SGX.md)")
    gramine_sub = gramine.add_subparsers(dest="gramine_command", required=True,
                                         help="what to do")
    gm = gramine_sub.add_parser("manifest", help="render and check an enclave's manifest template")
    gm.add_argument("--role", required=True, choices=("manager", "instance"),
                    help="which enclave's manifest")
    _add_state_dir(gm)
    gp = gramine_sub.add_parser("pins", help="the clients' pins (vmm/pins.py) from a trusted "
                                "build's manager.sig and instance.sig")
    gp.add_argument("manager_sig", metavar="MANAGER.sig", type=Path,
                    help="the manager's SIGSTRUCT, as gramine-sgx-sign wrote it")
    gp.add_argument("instance_sig", metavar="INSTANCE.sig", type=Path,
                    help="the instance's SIGSTRUCT, same build, same key")
    gp.add_argument("--root", default="intel", metavar="intel|PEM",
                    help="the DCAP root the clients trust: Intel's (default) or a PEM file")

    demo = sub.add_parser("demo", help="start hostd, create a VM's vTPM, use it")
    _add_state_dir(demo)
    bench = sub.add_parser("bench", help="run the benchmark suite (writes BENCHMARKS.md)")
    bench.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    _add_examples(parser)
    return parser


#: One example per subcommand, shown after its --help (and in the man page).
EXAMPLES: dict[str, str] = {
    "hostd": "sgxvtpm hostd --state-dir /var/lib/sgxvtpm --user sgxvtpm "
             "--log file=/var/log/sgxvtpm.log,level=info --pid file=/run/sgxvtpm.pid",
    "vm": "sgxvtpm vm create vm1 --ek rsa2048,ecc-p256 --pcr-banks sha256,sha384",
    "vm create": "sgxvtpm vm create vm1 --ek rsa2048,ecc-p256 --pcr-banks sha256,sha384",
    "vm list": "sgxvtpm vm list --json",
    "vm show": "sgxvtpm vm show vm1",
    "vm tpm": "sgxvtpm vm tpm vm1 80010000000c0000017b0008    # TPM2_GetRandom(8)",
    "vm destroy": "sgxvtpm vm destroy vm1",
    "vm attach": "sgxvtpm vm attach vm1 --ctrl /run/vm1-tpm.sock --owner libvirt-qemu",
    "vm serve": "sgxvtpm vm serve vm1 --swtpm /run/vm1.sock & "
                "tpm2_startup -c -T swtpm:path=/run/vm1.sock",
    "ca": "sgxvtpm ca show --pem > ca.pem",
    "ca show": "sgxvtpm ca show --pem > ca.pem",
    "attest": "sgxvtpm attest verify vm1 --json",
    "attest verify": "sgxvtpm attest verify vm1 --ca manager",
    "attest quote": "sgxvtpm attest quote quote.bin --collateral collateral.json --json",
    "gramine": "sgxvtpm gramine manifest --role instance > instance.manifest.toml",
    "gramine manifest": "sgxvtpm gramine manifest --role instance > instance.manifest.toml",
    "gramine pins": "sgxvtpm gramine pins manager.sig instance.sig "
                    "> ~/.config/sgxvtpm/gramine.json",
    "release": "sgxvtpm release sign --key vendor.pem --platform gramine --out release/",
    "release keygen": "sgxvtpm release keygen --platform gramine vendor.pem",
    "release sign": "sgxvtpm release sign --key vendor.pem --platform gramine "
                    "--state-dir /var/lib/sgxvtpm --out release/",
    "sim-root": "sgxvtpm sim-root init /srv/sim-root",
    "sim-root init": "sgxvtpm sim-root init /srv/sim-root",
    "fleet": "sgxvtpm fleet join 10.0.0.1:7474 --token TOKEN --address 10.0.0.2:7474",
    "fleet invite": "sgxvtpm fleet invite --address 10.0.0.1:7474",
    "fleet join": "sgxvtpm fleet join 10.0.0.1:7474 --token TOKEN --address 10.0.0.2:7474",
    "fleet show": "sgxvtpm fleet show --json",
    "fleet leave": "sgxvtpm fleet leave",
    "fleet remove": "sgxvtpm fleet remove PLATFORM_ID",
    "vm migrate": "sgxvtpm vm migrate web1 --to 10.0.0.2:7474",
    "vm migrate-cancel": "sgxvtpm vm migrate-cancel web1",
    "vm gc": "sgxvtpm vm gc --credentials /var/lib/sgxvtpm-libvirt",
    "libvirt": "sgxvtpm libvirt path",
    "libvirt path": "sgxvtpm libvirt path --dir /usr/local/libexec/sgxvtpm-libvirt",
    "demo": "sgxvtpm demo",
    "bench": "sgxvtpm bench --quick",
}


def subcommands(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every subcommand's parser, by its words ("vm create"), depth first."""
    found: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words = f"{prefix} {name}".strip()
                found.append((words, sub))
                found.extend(subcommands(sub, words))
    return found


def _add_examples(parser: argparse.ArgumentParser) -> None:
    leaves = [words for words, sub in subcommands(parser) if not subcommands(sub)]
    parser.epilog = "examples:\n" + "\n".join(
        f"  {EXAMPLES[words]}" for words in leaves if words in EXAMPLES)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for words, sub in subcommands(parser):
        example = EXAMPLES.get(words)
        if example is not None and sub.epilog is None:
            sub.epilog = f"example:\n  {example}"
            sub.formatter_class = argparse.RawDescriptionHelpFormatter


def _state(args: argparse.Namespace) -> StateDir:
    state = StateDir.at(args.state_dir)
    # A file, or a path too long for hostd's socket, is named as such before anything
    # tries the socket (which would only say "cannot reach hostd").
    state.check()
    return state


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
                    "pcr_banks", "ek"):
            value = obj.get(key)
            if isinstance(value, list | tuple):  # a list as a list: sha256,sha384
                value = ",".join(str(v) for v in value) or "-"
            if value not in (None, ""):
                print(f"{key:<12} {value}")


#: ``vm create`` says what it is doing once it has taken this long (seconds).
PROGRESS_AFTER = 1.0


@contextlib.asynccontextmanager
async def progress(
    message: str, stream: TextIO | None = None, after: float = PROGRESS_AFTER
) -> AsyncIterator[None]:
    """One line on ``stream`` (stderr) if the block takes more than ``after`` seconds,
    and only if that stream is a terminal: as git's and dd's progress, a person waiting
    sees why, and a script or libvirt reading stderr gets nothing it has to skip."""
    out = stream or sys.stderr

    async def notice() -> None:
        await asyncio.sleep(after)
        print(message, file=out, flush=True)

    task = asyncio.create_task(notice()) if out.isatty() else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _vm(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from sgxvtpm.vmm.client import VmmClient

    cmd = args.vm_command
    if cmd == "gc":
        return await _vm_gc(args)
    client = VmmClient(_state(args))
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
        async with progress(f"creating {args.name}: launching its instance enclave, "
                            "creating and certifying its EKs..."):
            info = await client.create(
                args.name,
                pcr_banks=pcr_banks,
                ek=[e for e in args.ek.split(",") if e],
                vm_public_key=pub,
                export=_credentials(args),
                incoming=args.incoming,
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
    elif cmd == "migrate":
        from sgxvtpm.vmm.fleetcmd import address
        from sgxvtpm.wire import k1

        host, port = address(args.to)
        _print((await client.request(k1.MigrateVm(args.name, host, port))).instance, False)
    elif cmd == "migrate-cancel":
        from sgxvtpm.wire import k1

        _print((await client.request(k1.MigrateCancel(args.name))).instance, False)
    return 0


async def _vm_gc(args: argparse.Namespace) -> int:
    from sgxvtpm.endpoint.libvirt.config import locate
    from sgxvtpm.endpoint.libvirt.gc import collect
    from sgxvtpm.vmm.client import VmmClient

    where = locate()
    state = StateDir.at(args.state_dir or where.state_dir)
    creds = Credentials.at(args.credentials or where.credentials)
    for name in await collect(VmmClient(state, credentials=creds)):
        print(f"destroyed {name}: its libvirt TPM state directory is gone")
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
               takeover=args.takeover, credentials=_credentials(args),
               terminate=args.terminate)
    else:
        serve_tss(_state(args), args.name, swtpm=args.swtpm, swtpm_tcp=args.swtpm_tcp,
                  mssim=args.mssim, access=access,
                  allow_any_local_user=args.allow_any_local_user, takeover=args.takeover,
                  credentials=_credentials(args))
    return 0


def _vm_tpm(args: argparse.Namespace) -> int:
    """``vm tpm NAME HEX``: a bad HEX is a usage error (status 2, one line)."""
    text = "".join(args.hex.split())
    try:
        command = bytes.fromhex(text)
    except ValueError:
        command = b""
    if not command:
        print(f"sgxvtpm: error: vm tpm: {args.hex!r} is not a TPM command in hex "
              "(e.g. 80010000000c0000017b0008)", file=sys.stderr)
        return 2
    from sgxvtpm.endpoint.serve import tpm_command

    print(tpm_command(_state(args), args.name, command, credentials=_credentials(args)).hex())
    return 0


async def _ca(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import hashes, serialization

    from sgxvtpm.vmm.client import VmmClient

    cert = await VmmClient(_state(args)).ca_certificate()
    if args.json:
        print(json.dumps({
            "subject": cert.subject.rfc4514_string(),
            "serial": f"{cert.serial_number:x}",
            "sha256": cert.fingerprint(hashes.SHA256()).hex(),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
        }, indent=2))
    elif args.pem:
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
    console = sys.stderr  # the one error line goes here, also when --log takes stderr
    try:
        if getattr(args, "log", None) is not None:
            console = args.log.apply()
        with _pid_file(args):
            return _run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, never a traceback, for the CLI
        name = type(exc).__name__
        message = str(exc) or name
        print(f"sgxvtpm: error: {message}", file=console)
        return 1


def _release(args: argparse.Namespace) -> int:
    from sgxvtpm.platform import generate_vendor_key, sign_release

    if args.release_command == "keygen":
        mrsigner = generate_vendor_key(args.platform, args.key)
        print(f"vendor key written to {args.key} (MRSIGNER {mrsigner.hex()})")
        return 0
    state_dir = _state(args).root if args.platform == "gramine" else None
    manifest = sign_release(args.platform, "sgxvtpm.enclaves.specs:release", args.key,
                            args.out, state_dir=state_dir)
    print(f"release signed into {args.out} (MRSIGNER {manifest['mrsigner']}); give "
          f"{args.out / 'release.json'} to the clients as their pins ($SGXVTPM_MEASUREMENTS)")
    return 0


def _pid_file(args: argparse.Namespace) -> contextlib.AbstractContextManager[None]:
    if getattr(args, "pid", None) is None:
        return contextlib.nullcontext()
    from sgxvtpm.util.runfiles import pid_file

    return pid_file(args.pid)


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "name", None) is not None:
        from sgxvtpm.enclaves.registry import check_vm_name

        # The manager enclave refuses a bad name too; asking first gives the
        # same one-line error without a round trip, and before a bad name
        # becomes a path under the state directory.
        check_vm_name(args.name)
    if args.command == "hostd":
        from sgxvtpm.host.hostd import RESET_EFFECT, HostdOptions, RunAs, serve
        from sgxvtpm.vmm import fleetcmd
        from sgxvtpm.vmm.credentials import hostd_operator_certificate

        if args.reset_manager:
            print(f"sgxvtpm: warning: --reset-manager: {RESET_EFFECT}", file=sys.stderr)
        run_as = RunAs.parse(args.user) if args.user else None
        state = _state(args)
        asyncio.run(
            serve(
                state,
                operator_cert=lambda: hostd_operator_certificate(state, args.operator_cert),
                options=HostdOptions(
                    platform=args.platform,
                    reset_manager=args.reset_manager,
                    counters=args.counters,
                    counters_key=args.counters_key,
                    sim_root=args.sim_root,
                    fleet_listen=fleetcmd.address(args.fleet_listen) if args.fleet_listen else None,
                    signed_release=args.release,
                    pccs=args.pccs,
                    pccs_refresh=args.pccs_refresh,
                ),
                run_as=run_as,
            )
        )
        return 0
    if args.command == "release":
        return _release(args)
    if args.command == "fleet":
        from sgxvtpm.vmm import fleetcmd

        return asyncio.run(fleetcmd.run(args, _state(args)))
    if args.command == "sim-root":
        from sgxvtpm.platform import init_sim_root

        digest = init_sim_root(args.dir)
        print(f"sim root created in {args.dir} (root certificate SHA-256 {digest})")
        return 0
    if args.command == "vm":
        if args.vm_command == "tpm":
            return _vm_tpm(args)
        if args.vm_command in ("attach", "serve"):
            return _vm_endpoint(args)
        return asyncio.run(_vm(args))
    if args.command == "libvirt":
        from sgxvtpm.endpoint.libvirt.bindir import ensure

        print(ensure(args.dir))
        return 0
    if args.command == "ca":
        return asyncio.run(_ca(args))
    if args.command == "gramine" and args.gramine_command == "pins":
        from sgxvtpm.vmm.pins import pins_from_sigs

        print(pins_from_sigs(args.manager_sig, args.instance_sig, args.root), end="")
        return 0
    if args.command == "gramine":
        from sgxvtpm.enclaves.specs import PACKAGE_ROOT, instance_spec, manager_spec
        from sgxvtpm.platform.gramine.backend import GRAMINE
        from sgxvtpm.platform.gramine.manifest import check, render

        spec = (manager_spec if args.role == "manager" else instance_spec)(GRAMINE)
        rendered = render(spec, args.role, state_dir=_state(args).root.resolve(),
                          package_root=PACKAGE_ROOT)
        check(rendered.text, spec.code_files, PACKAGE_ROOT)  # printed only once checked
        print(rendered.text, end="")
        return 0
    if args.command == "attest" and args.attest_command == "quote":
        from sgxvtpm.attest.quote import run as quote_run

        return quote_run(args.quote_file, collateral_file=args.collateral, root=args.root,
                         pccs=args.pccs,
                         at=args.at, as_json=args.json, accept=["UpToDate", *args.accept])
    if args.command == "attest":
        from sgxvtpm.attest.cli import run as attest_run

        return attest_run(_state(args), args.name, ca=args.ca, tcti=args.tcti,
                          eks=[e for e in args.ek.split(",") if e],
                          credentials=_credentials(args), as_json=args.json)
    if args.command == "demo":
        from sgxvtpm._demo.demo import run_demo

        return run_demo(_state(args) if args.state_dir else None)
    if args.command == "bench":
        return _bench(args.quick)
    return 2


if __name__ == "__main__":
    sys.exit(main())
