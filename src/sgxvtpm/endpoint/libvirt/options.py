"""The command lines libvirt gives swtpm and swtpm_setup, parsed without I/O.

libvirt 9.0 (src/qemu/qemu_tpm.c, src/util/virtpm.c) runs::

    swtpm socket --print-capabilities
    swtpm socket --ctrl type=unixio,path=S,mode=0600 --tpmstate dir=D,mode=0600
        --log file=L --terminate --tpm2 [--key pwdfd=N,mode=aes-256-cbc]
        [--migration-key pwdfd=M,mode=aes-256-cbc]
        (older versions: --daemon --pid file=P)
    swtpm_setup --print-capabilities
    swtpm_setup --tpm2 [--pwdfile-fd N --cipher aes-256-cbc] --tpm-state D
        --vmid NAME:UUID --logfile L --createek --create-ek-cert
        --create-platform-cert --lock-nvram --not-overwrite | --overwrite
        [--pcr-banks sha256,... [--reconfigure]]

This module only turns such argument lists into values (and says, in one
line, what is wrong with one it cannot take). ``swtpm socket`` parses its
arguments before it binds its control socket, and libvirt gives it one
second to appear: importing this module costs next to nothing (no argparse,
dataclasses, json or re at import time; the records are plain classes, the
swtpm socket line is parsed by hand; swtpm_setup, not in a hurry, uses
argparse, imported when it runs).
"""

from __future__ import annotations

from sgxvtpm.errors import SgxvtpmError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (13 ms loaded)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

VERSION = "0.7.1"  # the swtpm whose behaviour these executables follow

#: What ``swtpm socket --print-capabilities`` advertises: TPM 2.0 and the
#: password descriptors libvirt may pass for state encryption (read and
#: dropped: the state is sealed to the instance enclave instead).
SWTPM_FEATURES = ("tpm-2.0", "cmdarg-key-fd", "cmdarg-pwd-fd")
#: What ``swtpm_setup --print-capabilities`` advertises (libvirt requires tpm-2.0).
SETUP_FEATURES = ("tpm-2.0", "cmdarg-pwdfile-fd")

VM_NAME_MAX = 61  # enclaves/registry.py: one path component that fits the certificate
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


class OptionError(SgxvtpmError, ValueError):
    """A command line these executables cannot take; the message names the option."""


def capabilities(kind: str, features: Sequence[str]) -> str:
    """The ``--print-capabilities`` JSON object (``{"type", "features", "version"}``)."""
    import json

    return json.dumps({"type": kind, "features": list(features), "version": VERSION})


def info_text(
    args: SwtpmSocketArgs | SetupArgs, kind: str, features: Sequence[str], version_line: str
) -> str | None:
    """What ``--print-capabilities`` or ``--version`` prints (then the tool exits 0), or None."""
    if args.print_capabilities:
        return capabilities(kind, features)
    if args.version:
        return version_line
    return None


def parse_opts(option: str, text: str, keys: Sequence[str]) -> dict[str, str]:
    """swtpm's ``key=value,key=value`` option text, only ``keys`` allowed.

    A bare word is a key with an empty value (swtpm's ``--flags not-need-init``).
    """
    values: dict[str, str] = {}
    for part in text.split(","):
        if not part:
            continue
        key, _, value = part.partition("=")
        if key not in keys:
            raise OptionError(f"{option}: unknown parameter {key!r} (known: {', '.join(keys)})")
        values[key] = value
    return values


def parse_mode(option: str, text: str | None, default: int = 0o600) -> int:
    if text is None or text == "":
        return default
    try:
        mode = int(text, 8)
    except ValueError:
        raise OptionError(f"{option}: mode must be octal, got {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise OptionError(f"{option}: mode must be permission bits 0..0777, got {text!r}")
    return mode


def parse_fd(option: str, text: str) -> int:
    if not text.isdigit():
        raise OptionError(f"{option}: expected a file descriptor number, got {text!r}")
    return int(text)


def _parser(prog: str) -> argparse.ArgumentParser:
    """argparse that raises OptionError instead of printing usage and exiting."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise OptionError(message)

    return Parser(prog=prog, add_help=False)


class _Frozen:
    """Keyword fields set once (``__slots__``), compared and shown by value: what a frozen
    dataclass gives, without importing dataclasses (25 ms of a loaded start)."""

    __slots__: tuple[str, ...] = ()

    def _set(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in self.__slots__))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


# ---------------------------------------------------------------- swtpm socket


class SwtpmSocketArgs(_Frozen):
    """What ``swtpm socket`` was asked to do."""

    __slots__ = (
        "ctrl_fd",
        "ctrl_gid",
        "ctrl_mode",
        "ctrl_path",
        "ctrl_uid",
        "daemon",
        "log_fd",
        "log_file",
        "log_level",
        "password_fds",
        "pid_fd",
        "pid_file",
        "print_capabilities",
        "terminate",
        "tpmstate_dir",
        "version",
    )
    print_capabilities: bool
    version: bool
    ctrl_path: str
    ctrl_mode: int
    ctrl_uid: int
    ctrl_gid: int
    ctrl_fd: int | None  # --ctrl type=unixio,fd=N: a listening socket given to us
    tpmstate_dir: str
    log_file: str | None
    log_fd: int | None
    log_level: int
    pid_file: str | None
    pid_fd: int | None
    daemon: bool
    terminate: bool
    password_fds: tuple[int, ...]

    def __init__(self, *, print_capabilities: bool = False, version: bool = False,
                 ctrl_path: str = "", ctrl_mode: int = 0o600, ctrl_uid: int = -1,
                 ctrl_gid: int = -1, ctrl_fd: int | None = None, tpmstate_dir: str = "",
                 log_file: str | None = None, log_fd: int | None = None, log_level: int = 0,
                 pid_file: str | None = None, pid_fd: int | None = None, daemon: bool = False,
                 terminate: bool = False, password_fds: tuple[int, ...] = ()) -> None:
        self._set(print_capabilities=print_capabilities, version=version, ctrl_path=ctrl_path,
                  ctrl_mode=ctrl_mode, ctrl_uid=ctrl_uid, ctrl_gid=ctrl_gid, ctrl_fd=ctrl_fd,
                  tpmstate_dir=tpmstate_dir, log_file=log_file, log_fd=log_fd,
                  log_level=log_level, pid_file=pid_file, pid_fd=pid_fd, daemon=daemon,
                  terminate=terminate, password_fds=password_fds)


#: swtpm socket's options this parser takes: those with a value, and flags.
#: --flags, --seccomp and --runas are accepted without effect: the TPM's flags
#: are the instance's (it is never reset by its endpoint), and no code runs with
#: the endpoint's seccomp or runas choices that would need them.
_SWTPM_VALUED = ("--ctrl", "--tpmstate", "--log", "--pid", "--key", "--migration-key",
                 "--flags", "--seccomp", "--runas", "--server")
_SWTPM_FLAGS = ("--print-capabilities", "--version", "--daemon", "--terminate", "--tpm2")


def _scan(argv: Sequence[str], valued: Sequence[str],
          flags: Sequence[str]) -> dict[str, str | bool]:
    """GNU-style long options (``--opt VALUE``, ``--opt=VALUE``, flags), the last one
    of a name winning, as getopt_long does; anything else is an error naming it."""
    found: dict[str, str | bool] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in valued:
            if not eq:
                i += 1
                if i >= len(args):
                    raise OptionError(f"argument {name}: expected one argument")
                value = args[i]
            found[name] = value
        elif name in flags and not eq:
            found[name] = True
        else:
            raise OptionError(f"unrecognized arguments: {arg}")
        i += 1
    return found


class _FileOrFd:
    """An option of swtpm's that names a file as ``file=PATH`` or ``fd=N`` (``--log``,
    ``--pid``), with ``more`` keys; an absent option has neither."""

    __slots__ = ("fd", "file", "values")

    def __init__(self, option: str, text: str | None, more: Sequence[str] = ()) -> None:
        self.values = parse_opts(option, text, ("file", "fd", *more)) if text is not None else {}
        self.file = self.values.get("file") or None
        self.fd = parse_fd(f"{option} fd", self.values["fd"]) if "fd" in self.values else None


def parse_swtpm(argv: Sequence[str]) -> SwtpmSocketArgs:
    """``swtpm socket ARGS`` (argv without the ``socket`` word)."""
    found = _scan(argv, _SWTPM_VALUED, _SWTPM_FLAGS)

    def text(name: str) -> str | None:
        value = found.get(name)
        return value if isinstance(value, str) else None

    if found.get("--print-capabilities") or found.get("--version"):
        return SwtpmSocketArgs(print_capabilities=bool(found.get("--print-capabilities")),
                               version=bool(found.get("--version")))
    if not found.get("--tpm2"):
        raise OptionError("--tpm2 is required: sgxvtpm serves TPM 2.0 only")
    if "--server" in found:
        raise OptionError("--server: no data socket; QEMU passes its data channel over --ctrl")
    ctrl_text, tpmstate = text("--ctrl"), text("--tpmstate")
    if ctrl_text is None:
        raise OptionError("--ctrl type=unixio,path=PATH is required")
    ctrl = parse_opts("--ctrl", ctrl_text,
                      ("type", "path", "mode", "uid", "gid", "fd", "terminate"))
    if ctrl.get("type", "unixio") != "unixio":
        raise OptionError(f"--ctrl: only type=unixio is served, got type={ctrl['type']}")
    ctrl_fd = parse_fd("--ctrl fd", ctrl["fd"]) if "fd" in ctrl else None
    if ctrl_fd is None and not ctrl.get("path"):
        raise OptionError("--ctrl: give path=PATH (or fd=N)")
    if tpmstate is None:
        raise OptionError("--tpmstate dir=DIR is required (the VM's binding lives there)")
    state = parse_opts("--tpmstate", tpmstate, ("dir", "mode", "backend-uri", "lock"))
    state_dir = state.get("dir", "")
    if not state_dir and state.get("backend-uri", "").startswith("dir://"):
        state_dir = state["backend-uri"][len("dir://"):]
    if not state_dir:
        raise OptionError("--tpmstate: give dir=DIR")
    log = _FileOrFd("--log", text("--log"), ("level", "prefix", "truncate"))
    level = parse_fd("--log level", log.values["level"]) if log.values.get("level") else 0
    pid = _FileOrFd("--pid", text("--pid"))
    fds: list[int] = []
    for option in ("--key", "--migration-key"):
        key_text = text(option)
        if key_text is None:
            continue
        key = parse_opts(option, key_text, ("pwdfd", "fd", "file", "pwdfile", "mode", "format",
                                        "remove", "kdf"))
        for name in ("pwdfd", "fd"):
            if name in key:
                fds.append(parse_fd(f"{option} {name}", key[name]))
    return SwtpmSocketArgs(
        ctrl_path=ctrl.get("path", ""),
        ctrl_mode=parse_mode("--ctrl mode", ctrl.get("mode")),
        ctrl_uid=_id("--ctrl uid", ctrl.get("uid")),
        ctrl_gid=_id("--ctrl gid", ctrl.get("gid")),
        ctrl_fd=ctrl_fd,
        tpmstate_dir=state_dir,
        log_file=log.file,
        log_fd=log.fd,
        log_level=level,
        pid_file=pid.file,
        pid_fd=pid.fd,
        daemon=bool(found.get("--daemon")),
        terminate=bool(found.get("--terminate")) or "terminate" in ctrl,
        password_fds=tuple(fds),
    )


def _id(option: str, text: str | None) -> int:
    if text is None or text == "":
        return -1
    if not text.isdigit():
        raise OptionError(f"{option}: expected a number, got {text!r}")
    return int(text)


# ---------------------------------------------------------------- swtpm_setup


class SetupArgs(_Frozen):
    """What ``swtpm_setup`` was asked to do."""

    __slots__ = (
        "ek",
        "logfile",
        "not_overwrite",
        "overwrite",
        "password_fds",
        "pcr_banks",
        "print_capabilities",
        "reconfigure",
        "tpm_state",
        "version",
        "vmid",
    )
    print_capabilities: bool
    version: bool
    tpm_state: str
    vmid: str
    logfile: str | None
    overwrite: bool
    not_overwrite: bool
    pcr_banks: tuple[str, ...]
    reconfigure: bool
    ek: str
    password_fds: tuple[int, ...]

    def __init__(self, *, print_capabilities: bool = False, version: bool = False,
                 tpm_state: str = "", vmid: str = "", logfile: str | None = None,
                 overwrite: bool = False, not_overwrite: bool = False,
                 pcr_banks: tuple[str, ...] = (), reconfigure: bool = False, ek: str = "rsa2048",
                 password_fds: tuple[int, ...] = ()) -> None:
        self._set(print_capabilities=print_capabilities, version=version, tpm_state=tpm_state,
                  vmid=vmid, logfile=logfile, overwrite=overwrite, not_overwrite=not_overwrite,
                  pcr_banks=pcr_banks, reconfigure=reconfigure, ek=ek,
                  password_fds=password_fds)


def _setup_parser() -> argparse.ArgumentParser:
    p = _parser("swtpm_setup")
    p.add_argument("--print-capabilities", action="store_true")
    p.add_argument("--version", action="store_true")
    p.add_argument("--tpm2", action="store_true")
    p.add_argument("--tpm-state", "--tpmstate")
    p.add_argument("--vmid")
    p.add_argument("--logfile")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--not-overwrite", action="store_true")
    p.add_argument("--pcr-banks")
    p.add_argument("--reconfigure", action="store_true")
    p.add_argument("--ecc", action="store_true")
    p.add_argument("--rsa-keysize")
    p.add_argument("--pwdfile-fd")
    p.add_argument("--keyfile-fd")
    p.add_argument("--cipher")
    # What swtpm_setup always does here: EKs with certificates chained to the
    # manager CA, a platform certificate, NV locked.
    for flag in ("--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram",
                 "--allow-signing", "--decryption", "--display"):
        p.add_argument(flag, action="store_true")
    p.add_argument("--config")  # swtpm_setup.conf: the certificate tools are the manager's
    p.add_argument("--runas")
    return p


def parse_setup(argv: Sequence[str]) -> SetupArgs:
    a = _setup_parser().parse_args(list(argv))
    if a.print_capabilities or a.version:
        return SetupArgs(print_capabilities=a.print_capabilities, version=a.version)
    if not a.tpm2:
        raise OptionError("--tpm2 is required: sgxvtpm makes TPM 2.0 instances only")
    if not a.tpm_state:
        raise OptionError("--tpm-state DIR is required")
    if a.overwrite and a.not_overwrite:
        raise OptionError("--overwrite and --not-overwrite exclude each other")
    ek = "rsa2048"
    if a.ecc:
        ek = "ecc-p256"
    elif a.rsa_keysize not in (None, "2048", "3072"):
        raise OptionError(f"--rsa-keysize: 2048 or 3072, got {a.rsa_keysize!r}")
    elif a.rsa_keysize == "3072":
        ek = "rsa3072"
    banks = tuple(b for b in (a.pcr_banks or "").split(",") if b)
    if a.reconfigure and not banks:
        raise OptionError("--reconfigure needs --pcr-banks")
    fds = tuple(parse_fd(option, text) for option, text in
                (("--pwdfile-fd", a.pwdfile_fd), ("--keyfile-fd", a.keyfile_fd)) if text)
    return SetupArgs(
        tpm_state=a.tpm_state,
        vmid=a.vmid or "",
        logfile=a.logfile,
        overwrite=a.overwrite,
        not_overwrite=a.not_overwrite,
        pcr_banks=banks,
        reconfigure=a.reconfigure,
        ek=ek,
        password_fds=fds,
    )


def vm_name(vmid: str, tpm_state: str) -> str:
    """The sgxvtpm VM name for libvirt's ``--vmid NAME:UUID`` (or, without one, the
    domain UUID in libvirt's state path ``.../swtpm/UUID/tpm2``).

    One VM name (1-61 of ``[A-Za-z0-9._-]``, not starting with ``.`` or ``-``):
    the domain name, other characters as ``_``, cut so that ``-UUID`` fits.
    """
    import re

    name, _, uuid = vmid.rpartition(":")
    if not re.fullmatch(_UUID, uuid):
        name, uuid = vmid, ""
    if not uuid:
        parts = [p for p in tpm_state.rstrip("/").split("/") if p]
        found = [p for p in parts if re.fullmatch(_UUID, p)]
        uuid = found[-1] if found else ""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".-")
    uuid = uuid.lower()
    if uuid:
        room = VM_NAME_MAX - len(uuid) - 1
        clean = clean[:room].rstrip(".-")
        return f"{clean}-{uuid}" if clean else f"libvirt-{uuid}"
    if not clean:
        raise OptionError("--vmid: no name or UUID to name the VM after")
    return clean[:VM_NAME_MAX]
