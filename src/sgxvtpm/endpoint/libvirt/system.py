"""``make install-system``: the layout in which libvirt's ``swtpm_user`` (``tss``) runs sgxvtpm.

Run as root (``make install-system`` goes through sudo when it is not);
every step is idempotent, and says what it changed::

    python -m sgxvtpm.endpoint.libvirt.system [--prefix /opt/sgxvtpm] ...

- users: a system group and user ``sgxvtpm`` (hostd's ``--user``), and the
  swtpm user (``tss``) in that group;
- code: a virtual environment of the system's Python (``/usr/bin/python3``, the
  same X.Y as this one) at ``--prefix``, holding this checkout's sgxvtpm and
  its runtime dependencies copied from this environment (no download),
  compiled, root's and world-readable; ``PREFIX/bin/sgxvtpm``, and the
  executables for libvirt in ``PREFIX/libexec/sgxvtpm-libvirt`` (bindir.py);
- hostd's state directory (``/var/lib/sgxvtpm``): hostd, started as root with
  ``--user sgxvtpm:sgxvtpm``, hands it over to that user, 0710, and makes its
  socket 0660: the group ``sgxvtpm`` reaches the socket and nothing else;
- the operator credentials libvirt's ``swtpm_setup`` and ``sgxvtpm vm gc``
  use (``/var/lib/sgxvtpm-libvirt``, the swtpm user's, 0700): the operator
  identity (made here once; hostd's unit gives its certificate to the manager
  to pin), the records of libvirt's VMs and the copies of their bindings.
  SECURITY.md says why the swtpm user holds it;
- ``/etc/sgxvtpm/sgxvtpm.conf`` naming both (config.py); kept if it exists;
- systemd units (shipped, never started here): ``sgxvtpm-hostd.service``,
  ``sgxvtpm-gc.service`` + ``.timer`` (``vm gc`` as the swtpm user, hourly),
  and drop-ins putting the libvirt executables first on libvirtd's and
  virtqemud's PATH.

``--users-prefix DIR`` edits ``DIR/etc/passwd`` and ``DIR/etc/group``
(useradd's ``--prefix``) instead of the system's, and the other options move
every directory: the e2e test installs so into a temporary tree and runs it
in a private mount namespace, never touching the machine's own.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sgxvtpm.endpoint.libvirt import bindir
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.vmm.credentials import Credentials

PACKAGE = "sgxvtpm"
HOSTD_UNIT = "sgxvtpm-hostd.service"
GC_UNIT = "sgxvtpm-gc.service"
GC_TIMER = "sgxvtpm-gc.timer"
LIBVIRT_UNITS = ("libvirtd.service", "virtqemud.service")
DROP_IN = "sgxvtpm.conf"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class InstallError(SgxvtpmError, RuntimeError):
    """A step cannot be done; the message says which and why (one line)."""


@dataclass(frozen=True)
class Layout:
    """Where everything goes (the defaults are the system's)."""

    prefix: Path = Path("/opt/sgxvtpm")
    state_dir: Path = Path("/var/lib/sgxvtpm")
    credentials: Path = Path("/var/lib/sgxvtpm-libvirt")
    conf_dir: Path = Path("/etc/sgxvtpm")
    unit_dir: Path = Path("/etc/systemd/system")
    users_prefix: Path = Path("/")
    swtpm_user: str = "tss"
    user: str = "sgxvtpm"
    group: str = "sgxvtpm"
    python: str = "/usr/bin/python3"

    @property
    def interpreter(self) -> Path:
        return self.prefix / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        v = sys.version_info
        return self.prefix / "lib" / f"python{v.major}.{v.minor}" / "site-packages"

    @property
    def libexec(self) -> Path:
        return self.prefix / "libexec" / "sgxvtpm-libvirt"

    @property
    def conf(self) -> Path:
        return self.conf_dir / "sgxvtpm.conf"

    def hostd_argv(self) -> list[str]:
        return [str(self.prefix / "bin" / "sgxvtpm"), "hostd", "--state-dir",
                str(self.state_dir), "--user", f"{self.user}:{self.group}",
                "--operator-cert", str(self.credentials / "operator.crt")]


Say = Callable[[str], None]


# ------------------------------------------------------------------- users


def _entries(layout: Layout, table: str) -> dict[str, list[str]]:
    path = layout.users_prefix / "etc" / table
    rows = {}
    for line in path.read_text().splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0]:
            rows[fields[0]] = fields
    return rows


def ids(layout: Layout, user: str) -> tuple[int, int]:
    """``user``'s uid and primary gid in the users' files of ``layout``."""
    row = _entries(layout, "passwd").get(user)
    if row is None:
        raise InstallError(f"no user {user!r} in {layout.users_prefix / 'etc/passwd'}")
    return int(row[2]), int(row[3])


def gid(layout: Layout, group: str) -> int:
    row = _entries(layout, "group").get(group)
    if row is None:
        raise InstallError(f"no group {group!r} in {layout.users_prefix / 'etc/group'}")
    return int(row[2])


def _shadow(layout: Layout, *argv: str) -> None:
    prefix = [] if layout.users_prefix == Path("/") else ["--prefix", str(layout.users_prefix)]
    done = subprocess.run([argv[0], *prefix, *argv[1:]], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise InstallError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def ensure_users(layout: Layout, say: Say) -> None:
    if layout.group not in _entries(layout, "group"):
        _shadow(layout, "groupadd", "--system", layout.group)
        say(f"group {layout.group}: created")
    if layout.user not in _entries(layout, "passwd"):
        _shadow(layout, "useradd", "--system", "--gid", layout.group, "--no-create-home",
                "--home-dir", str(layout.state_dir), "--shell", "/usr/sbin/nologin",
                "--comment", "sgxvtpm hostd", layout.user)
        say(f"user {layout.user}: created (hostd runs as it)")
    if layout.swtpm_user not in _entries(layout, "passwd"):
        _shadow(layout, "useradd", "--system", "--user-group", "--no-create-home",
                "--home-dir", "/var/lib/tpm", "--shell", "/bin/false", layout.swtpm_user)
        say(f"user {layout.swtpm_user}: created (libvirt's swtpm_user)")
    members = _entries(layout, "group")[layout.group][3].split(",")
    if layout.swtpm_user not in members:
        _shadow(layout, "usermod", "--append", "--groups", layout.group, layout.swtpm_user)
        say(f"user {layout.swtpm_user}: added to group {layout.group} (reaches hostd's socket)")


# -------------------------------------------------------------------- code


def _requirement_names(dist: importlib.metadata.Distribution) -> list[str]:
    names = []
    for req in dist.requires or []:
        name, _, marker = req.partition(";")
        if "extra" in marker:
            continue
        match = re.match(r"[A-Za-z0-9._-]+", name.strip())
        if match:
            names.append(match.group(0))
    return names


def runtime_distributions() -> list[importlib.metadata.Distribution]:
    """sgxvtpm's runtime dependencies, with theirs, as installed here (not sgxvtpm)."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = _requirement_names(importlib.metadata.distribution(PACKAGE))
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement whose marker excludes this platform
        seen[key] = dist
        todo += _requirement_names(dist)
    return list(seen.values())


def _copy_tree(source: Path, target: Path) -> None:
    """``target`` becomes a copy of ``source`` (no __pycache__), swapped in at the end."""
    tmp = target.with_name(f".{target.name}.new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("__pycache__"))
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _same_tree(a: Path, b: Path) -> bool:
    def listing(root: Path) -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(root)): (p.stat().st_size, int(p.stat().st_mtime))
                for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    return b.is_dir() and listing(a) == listing(b)


def ensure_code(layout: Layout, say: Say) -> None:
    want = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not layout.interpreter.exists():
        done = subprocess.run([layout.python, "-m", "venv", "--without-pip", str(layout.prefix)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise InstallError(f"{layout.python} -m venv {layout.prefix}: "
                               f"{done.stderr.strip()} (Debian: apt-get install python3-venv)")
        say(f"{layout.prefix}: virtual environment of {layout.python}")
    got = subprocess.run([str(layout.interpreter), "-c",
                          "import sys; print(*sys.version_info[:2], sep='.')"],
                         capture_output=True, text=True, check=True).stdout.strip()
    if got != want:
        raise InstallError(f"{layout.interpreter} is Python {got}; this sgxvtpm and its "
                           f"compiled dependencies are for {want}: give --python python{want}")
    site = layout.site_packages
    changed = False
    for dist in runtime_distributions():
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            target = (site / file).resolve()
            if not target.is_relative_to(site.resolve()) or "__pycache__" in file.parts:
                continue  # scripts in bin/ and caches: not needed, not copied
            if target.exists() and target.stat().st_size == source.stat().st_size \
                    and int(target.stat().st_mtime) == int(source.stat().st_mtime):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            changed = True
    package = Path(bindir.package_root()) / PACKAGE
    if not _same_tree(package, site / PACKAGE):
        _copy_tree(package, site / PACKAGE)
        changed = True
    # Always (cheap when up to date): an install cut short before it would leave tss,
    # which cannot write __pycache__, compiling every module at every start.
    subprocess.run([str(layout.interpreter), "-m", "compileall", "-q", "-j0", str(site)],
                   check=True, stdout=subprocess.DEVNULL)
    if changed:
        say(f"{site}: sgxvtpm {importlib.metadata.version(PACKAGE)} and its dependencies")
    cli = layout.prefix / "bin" / "sgxvtpm"
    text = bindir.script("sgxvtpm.cli", str(layout.interpreter))
    if not cli.exists() or cli.read_text() != text:
        cli.write_text(text)
        cli.chmod(0o755)
        say(f"{cli}: written")
    before = {p.name: p.read_bytes() for p in layout.libexec.glob("swtpm*") if p.is_file()}
    bindir.ensure(layout.libexec, interpreter=str(layout.interpreter), root=str(site))
    after = {p.name: p.read_bytes() for p in layout.libexec.glob("swtpm*") if p.is_file()}
    if before != after:
        say(f"{layout.libexec}: swtpm, swtpm_setup, swtpm_ioctl for libvirtd's PATH")


# ------------------------------------------------------- directories, files


def ensure_dirs(layout: Layout, say: Say) -> None:
    if not layout.state_dir.exists():
        layout.state_dir.mkdir(mode=0o700, parents=True)
        say(f"{layout.state_dir}: made (hostd hands it to {layout.user} when it starts)")
    uid, user_gid = ids(layout, layout.swtpm_user)
    creds = layout.credentials
    if not (creds / "operator.crt").exists():
        # Made as root in a fresh directory, then given to the swtpm user whole.
        tmp = creds.with_name(f".{creds.name}.new")
        shutil.rmtree(tmp, ignore_errors=True)
        Credentials.at(tmp).operator_certificate()
        creds.mkdir(mode=0o700, parents=True, exist_ok=True)
        for child in tmp.iterdir():
            child.rename(creds / child.name)
        tmp.rmdir()
        say(f"{creds}: operator identity (operator.key 0600) for libvirt's swtpm_setup")
    for _top, dirs, files, dirfd in os.fwalk(creds, follow_symlinks=False):
        os.chown(dirfd, uid, user_gid)
        os.chmod(dirfd, 0o700)
        for name in files + dirs:
            os.chown(name, uid, user_gid, dir_fd=dirfd, follow_symlinks=False)


def _write(path: Path, text: str, say: Say, mode: int = 0o644) -> None:
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    say(f"{path}: written")


def ensure_conf(layout: Layout, say: Say) -> None:
    text = (f"# sgxvtpm's system configuration (make install-system)\n"
            f"state_dir = {layout.state_dir}\ncredentials = {layout.credentials}\n")
    if layout.conf.exists():
        if layout.conf.read_text() != text:
            say(f"{layout.conf}: kept as it is (differs from what this install would write)")
        return
    _write(layout.conf, text, say)


def units(layout: Layout) -> dict[str, str]:
    """The systemd unit files (relative to ``unit_dir``) and their text."""
    hostd = " ".join(layout.hostd_argv())
    env = f"SGXVTPM_CONF={layout.conf}"
    path = f"PATH={layout.libexec}:{SYSTEM_PATH}"
    files = {
        HOSTD_UNIT: f"""\
[Unit]
Description=sgxvtpm hostd: the SGX module (enclave loader and relay) of libvirt's vTPMs
Before=libvirtd.service virtqemud.service

[Service]
ExecStart={hostd}
Restart=on-failure

[Install]
WantedBy=multi-user.target
""",
        GC_UNIT: f"""\
[Unit]
Description=sgxvtpm: destroy the vTPMs of undefined libvirt domains
After={HOSTD_UNIT}

[Service]
Type=oneshot
User={layout.swtpm_user}
Environment={env}
ExecStart={layout.prefix / 'bin' / 'sgxvtpm'} vm gc
""",
        GC_TIMER: """\
[Unit]
Description=sgxvtpm vm gc, hourly

[Timer]
OnBootSec=5min
OnUnitActiveSec=1h

[Install]
WantedBy=timers.target
""",
    }
    for unit in LIBVIRT_UNITS:
        files[f"{unit}.d/{DROP_IN}"] = f"""\
[Unit]
Wants={HOSTD_UNIT}
After={HOSTD_UNIT}

[Service]
Environment={path}
Environment={env}
"""
    return files


def ensure_units(layout: Layout, say: Say) -> None:
    for name, text in units(layout).items():
        _write(layout.unit_dir / name, text, say)


def install(layout: Layout, say: Say) -> None:
    old = os.umask(0o022)
    try:
        ensure_users(layout, say)
        ensure_code(layout, say)
        ensure_dirs(layout, say)
        ensure_conf(layout, say)
        ensure_units(layout, say)
    finally:
        os.umask(old)


def main(argv: Sequence[str] | None = None) -> int:
    d = Layout()
    p = argparse.ArgumentParser(prog="make install-system",
                                description="the system layout for libvirt (run as root)")
    p.add_argument("--prefix", type=Path, default=d.prefix)
    p.add_argument("--state-dir", type=Path, default=d.state_dir)
    p.add_argument("--credentials", type=Path, default=d.credentials)
    p.add_argument("--conf-dir", type=Path, default=d.conf_dir)
    p.add_argument("--unit-dir", type=Path, default=d.unit_dir)
    p.add_argument("--users-prefix", type=Path, default=d.users_prefix)
    p.add_argument("--swtpm-user", default=d.swtpm_user)
    p.add_argument("--python", default=d.python)
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("install-system: run as root (make install-system uses sudo)", file=sys.stderr)
        return 1
    layout = Layout(prefix=a.prefix.absolute(), state_dir=a.state_dir.absolute(),
                    credentials=a.credentials.absolute(), conf_dir=a.conf_dir.absolute(),
                    unit_dir=a.unit_dir.absolute(), users_prefix=a.users_prefix.absolute(),
                    swtpm_user=a.swtpm_user, python=a.python)
    changes: list[str] = []

    def say(line: str) -> None:
        changes.append(line)
        print(line)

    try:
        install(layout, say)
    except (InstallError, OSError, subprocess.CalledProcessError) as exc:
        print(f"install-system: {exc}", file=sys.stderr)
        return 1
    if not changes:
        print("install-system: nothing to do, the layout is in place")
    else:
        print(f"then: systemctl daemon-reload && systemctl enable --now {HOSTD_UNIT} "
              f"{GC_TIMER} && systemctl restart libvirtd (or virtqemud)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
