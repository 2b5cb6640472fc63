"""A tiny Linux guest for QEMU TPM tests: busybox initramfs, Debian's cloud kernel.

The guest's /init mounts proc/sysfs/devtmpfs, waits for /sys/class/tpm/tpm0
(CONFIG_TCG_TIS=y in the cloud kernel, so no module is needed), prints the
TPM version and PCR 0-7 of the sha256 bank from sysfs (``pcr-sha256/N``,
Linux 5.12+; the TPM driver's probe also runs TPM2_GetCapability and
SelfTest), then a marker, and waits (the host quits or resets it via
the QEMU monitor). SeaBIOS measures itself, the linuxboot option ROM and
boot events into PCRs 0-7 when it finds a TPM 2.0, so they are not zero.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "SGXVTPM-GUEST-DONE"
QEMU = "qemu-system-x86_64"

_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
i=0
while [ ! -e /sys/class/tpm/tpm0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "TPMVER $(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null)"
for n in 0 1 2 3 4 5 6 7; do
  echo "PCR $n $(cat /sys/class/tpm/tpm0/pcr-sha256/$n 2>/dev/null)"
done
echo "@MARKER@"
while true; do sleep 60; done
""".replace("@MARKER@", MARKER)


def kernel_path() -> Path | None:
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64")) or sorted(glob.glob("/boot/vmlinuz-*"))
    return Path(found[-1]) if found else None


def missing_tools() -> list[str]:
    """What a QEMU guest test needs and this machine lacks."""
    missing = [t for t in (QEMU, "busybox", "cpio") if shutil.which(t) is None]
    if kernel_path() is None:
        missing.append("a kernel in /boot")
    elif not os.access(kernel_path() or "", os.R_OK):
        missing.append("a readable kernel in /boot")
    return missing


def build_initramfs(workdir: Path) -> Path:
    """A gzip'd newc cpio with busybox and /init; returns its path."""
    root = workdir / "initramfs-root"
    for sub in ("bin", "proc", "sys", "dev"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    assert busybox is not None
    shutil.copy(busybox, root / "bin" / "busybox")
    init = root / "init"
    init.write_text(_INIT)
    init.chmod(0o755)
    out = workdir / "initramfs.cpio.gz"
    files = subprocess.run(
        ["find", "."], cwd=root, check=True, capture_output=True
    ).stdout
    cpio = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, check=True,
        capture_output=True,
    ).stdout
    gz = subprocess.run(["gzip", "-1"], input=cpio, check=True, capture_output=True).stdout
    out.write_bytes(gz)
    return out


@dataclass
class BootResult:
    """What one boot printed: PCRs by index, TPM version, raw console."""

    console: str
    pcrs: dict[int, str] = field(default_factory=dict)
    tpm_version: str = ""


def parse_console(text: str) -> list[BootResult]:
    """One BootResult per guest boot found in ``text`` (a reset boots again)."""
    results: list[BootResult] = []
    current = BootResult(console="")
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"TPMVER\s*(\S*)$", line):
            current = BootResult(console="", tpm_version=m.group(1))
        elif m := re.match(r"PCR (\d) ?([0-9A-Fa-f]*)$", line):
            current.pcrs[int(m.group(1))] = m.group(2).lower()
        elif line == MARKER:
            current.console = text
            results.append(current)
            current = BootResult(console="")
    return results


class Guest:
    """One QEMU process with a TPM on ``ctrl_path``, driven through its monitor."""

    def __init__(self, workdir: Path, initrd: Path, ctrl_path: Path, name: str = "guest") -> None:
        kernel = kernel_path()
        assert kernel is not None
        self.monitor_path = workdir / f"{name}.monitor"
        self.log_path = workdir / f"{name}.console"
        self.argv = [
            QEMU, "-accel", "tcg", "-m", "256", "-display", "none", "-no-user-config",
            "-nodefaults", "-serial", "stdio",
            "-monitor", f"unix:{self.monitor_path},server=on,wait=off",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1 rdinit=/init",
            "-chardev", f"socket,id=chrtpm,path={ctrl_path}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-tis,tpmdev=tpm0",
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def console(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def wait_for_boots(self, count: int, timeout: float) -> list[BootResult]:
        """Wait until ``count`` boots printed the marker; raise with the console if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            results = parse_console(self.console())
            if len(results) >= count:
                return results
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"guest printed {len(parse_console(self.console()))}/{count} boots "
            f"(qemu rc={self.proc.poll()}); console:\n{self.console()[-3000:]}"
        )

    def monitor(self, command: str) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.monitor_path))
            s.sendall(command.encode() + b"\n")
            with contextlib.suppress(OSError):
                time.sleep(0.2)
                s.recv(4096)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.monitor("quit")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
