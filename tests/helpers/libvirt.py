"""A private system-mode libvirtd for the e2e tests, isolated from the machine's own.

libvirtd runs in a private mount namespace (``unshare -m``, root only) where
``/etc/libvirt``, ``/var`` and ``/run`` are directories of the test (and
``/etc/passwd``, ``/etc/group`` copies that add libvirt's ``libvirt-qemu``): its
configuration, state (``/var/lib/libvirt/swtpm/UUID``), logs
(``/var/log/swtpm/libvirt/qemu``), pid file and sockets never touch the
machine's, and everything goes when the daemon is killed (the namespace's
mounts die with its last process). ``virsh`` reaches it through its socket,
``qemu:///system?socket=...``, from outside the namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sgxvtpm.endpoint.libvirt.system import Layout

LIBVIRTD = "/usr/sbin/libvirtd"
USER_FILES = ("passwd", "group", "shadow", "gshadow")
#: Emulators the test domains do not use, hidden in the namespace (/dev/null over
#: them): libvirtd probes every emulator it finds when it starts, seconds each.
HIDDEN_EMULATORS = ("/usr/bin/qemu-system-i386",)
START_TIMEOUT = 30.0

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
stdio_handler = "file"
swtpm_user = "{swtpm_user}"
swtpm_group = "{swtpm_group}"
"""

LIBVIRTD_CONF = """\
log_filters = "1:qemu.qemu_tpm 1:util.virtpm 3:*"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
"""


def missing() -> str:
    """Why a private libvirtd cannot run here ('' if it can)."""
    if not os.path.exists(LIBVIRTD) or shutil.which("virsh") is None:
        return "libvirtd/virsh are not installed (scripts/install.sh installs them)"
    if os.geteuid() != 0:
        return "a private system libvirtd needs root (a mount namespace)"
    if shutil.which("unshare") is None:
        return "unshare(1) is missing"
    return ""


class PrivateLibvirtd:
    """libvirtd in a mount namespace of its own, over directories under ``root``."""

    def __init__(self, root: Path, path_dirs: list[Path], env: dict[str, str],
                 swtpm_user: str = "root", swtpm_group: str = "root",
                 users: Path | None = None, caps_cache: Path | None = None) -> None:
        """``users``: a directory whose etc/passwd and etc/group the namespace sees
        (install-system's --users-prefix), instead of the machine's. ``caps_cache``:
        where QEMU's capabilities, as libvirtd probed them, are kept between daemons
        (probing them costs a daemon start seconds; libvirt re-probes a stale entry)."""
        self.caps_cache = caps_cache
        self.root = root
        self.etc = root / "etc-libvirt"
        self.var = root / "var"
        self.run = root / "run"
        for d in (self.etc, self.var / "lib" / "libvirt", self.var / "cache" / "libvirt",
                  self.var / "log" / "libvirt", self.var / "tmp", self.run / "libvirt"):
            d.mkdir(parents=True, exist_ok=True)
        (self.var / "tmp").chmod(0o1777)
        with contextlib.suppress(FileExistsError):
            (self.var / "run").symlink_to("/run")
        with contextlib.suppress(FileExistsError):
            (self.var / "lock").symlink_to("/run/lock")
        for conf in Path("/etc/libvirt").glob("*.conf"):
            shutil.copy(conf, self.etc / conf.name)
        (self.etc / "qemu.conf").write_text(
            QEMU_CONF.format(swtpm_user=swtpm_user, swtpm_group=swtpm_group))
        (self.etc / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        # libvirt's QEMU driver resolves its compiled-in user (Debian: libvirt-qemu,
        # made by libvirt-daemon-system) before it reads qemu.conf: the namespace
        # sees a passwd and group file that have it, the machine's stay as they are.
        self.passwd, self.group = root / "passwd", root / "group"
        etc = (users or Path("/")) / "etc"
        passwd, group = (etc / "passwd").read_text(), (etc / "group").read_text()
        if "\nlibvirt-qemu:" not in "\n" + passwd:
            passwd += "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/bin/false\n"
        for name, gid in (("libvirt-qemu", 64055), ("kvm", 64056)):
            if f"\n{name}:" not in "\n" + group:
                group += f"{name}:x:{gid}:\n"
        self.passwd.write_text(passwd)
        self.group.write_text(group)
        path = os.pathsep.join([*(str(d) for d in path_dirs),
                                os.environ.get("PATH", "/usr/bin:/bin")])
        self.env = {**os.environ, **env, "PATH": path}
        self.proc: subprocess.Popen[bytes] | None = None
        self.uri = f"qemu:///system?socket={self.run}/libvirt/libvirt-sock"

    @property
    def log_path(self) -> Path:
        return self.var / "log" / "libvirt" / "libvirtd.log"

    def swtpm_log(self, domain: str) -> str:
        path = self.var / "log" / "swtpm" / "libvirt" / "qemu" / f"{domain}-swtpm.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def caps_dir(self) -> Path:
        return self.var / "cache" / "libvirt" / "qemu" / "capabilities"

    def _copy_caps(self, source: Path, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for entry in source.glob("*.xml"):
            with contextlib.suppress(OSError):
                shutil.copy2(entry, target / entry.name)

    def start(self) -> None:
        if self.caps_cache is not None:
            self._copy_caps(self.caps_cache, self.caps_dir)
        script = (f"mount --bind {self.etc} /etc/libvirt && mount --bind {self.var} /var && "
                  f"mount --bind {self.passwd} /etc/passwd && "
                  f"mount --bind {self.group} /etc/group && "
                  f"mount --bind {self.run} /run && "
                  + "".join(f"mount --bind /dev/null {e} && " for e in HIDDEN_EMULATORS
                            if os.path.exists(e))
                  + f"exec {LIBVIRTD}")
        with open(self.root / "libvirtd.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                env=self.env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                start_new_session=True, cwd="/",
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited ({self.proc.returncode}): "
                                   f"{self.diagnostics()}")
            if self.virsh("version", check=False).returncode == 0:
                if self.caps_cache is not None:
                    self._copy_caps(self.caps_dir, self.caps_cache)
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"libvirtd not answering: {self.diagnostics()}")
            time.sleep(0.2)

    def virsh(self, *args: str, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {done.stderr.strip()}\n"
                                 f"{self.diagnostics()}")
        return done

    def diagnostics(self) -> str:
        parts = []
        for path in (self.root / "libvirtd.stderr", self.log_path):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}:\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def namespace_pids(self) -> list[int]:
        """Every process in the daemon's mount namespace: libvirtd and what it started
        (QEMU and swtpm run in sessions of their own, so its process group misses them)."""
        if self.proc is None:
            return []
        try:
            ns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
        except OSError:
            return []
        if ns == os.readlink("/proc/self/ns/mnt"):
            return []  # not (or not yet) in its own namespace
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                        pids.append(int(entry))
        return pids

    def stop(self) -> None:
        """Kill the daemon and every process of its namespace; its mounts go with them."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.namespace_pids() or [self.proc.pid]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.namespace_pids():
                self.proc.poll()
                time.sleep(0.1)
            if not self.namespace_pids():
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.proc = None


def install_system(layout: Layout) -> subprocess.CompletedProcess[str]:
    """``make install-system`` (``sgxvtpm.endpoint.libvirt.system``) into ``layout``."""
    return subprocess.run(
        [sys.executable, "-m", "sgxvtpm.endpoint.libvirt.system", "--prefix",
         str(layout.prefix), "--state-dir", str(layout.state_dir), "--credentials",
         str(layout.credentials), "--conf-dir", str(layout.conf_dir), "--unit-dir",
         str(layout.unit_dir), "--users-prefix", str(layout.users_prefix)],
        capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


@contextlib.contextmanager
def system_tree(prefix: str) -> Iterator[Path]:
    """A temporary tree to install the system layout into, removed afterwards: 0755 and
    not under pytest's 0700 directories (tss must be able to reach it), with copies of
    the machine's users' files in ``users/etc`` (``--users-prefix TREE/users``)."""
    top = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        top.chmod(0o755)
        etc = top / "users" / "etc"
        etc.mkdir(parents=True)
        for name in USER_FILES:
            if Path("/etc", name).exists():
                shutil.copy2(Path("/etc", name), etc / name)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)
