"""A tiny Linux guest for QEMU TPM checks: busybox initramfs, the host's (Debian cloud) kernel.

Used by ``sgxvtpm demo`` and the QEMU tests. The guest's /init mounts
proc/sysfs/devtmpfs/securityfs, waits for /sys/class/tpm/tpm0
(CONFIG_TCG_TIS=y in the cloud kernel, so no module is needed), prints the
TPM version, PCR 0-7 of the sha256 bank from sysfs (``pcr-sha256/N``, Linux
5.12+; the driver's probe also runs TPM2_GetCapability and SelfTest), the
firmware's event log in hex, then a marker, and waits (the host quits or
resets it via the QEMU monitor).

SeaBIOS measures itself, the linuxboot option ROM and boot events into PCRs
0-7 when it finds a TPM 2.0, and logs each measurement in the TCG event log
it hands to the OS (ACPI TPM2 table); replaying that log
(:func:`replay_event_log`) must give the PCR values the guest read.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from sgxvtpm.errors import SgxvtpmError

MARKER = "SGXVTPM-GUEST-DONE"
QEMU = "qemu-system-x86_64"

_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
i=0
while [ ! -e /sys/class/tpm/tpm0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "TPMVER $(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null)"
for n in 0 1 2 3 4 5 6 7; do
  echo "PCR $n $(cat /sys/class/tpm/tpm0/pcr-sha256/$n 2>/dev/null)"
done
log=/sys/kernel/security/tpm0/binary_bios_measurements
[ -r $log ] && echo "EVLOG $(od -An -v -tx1 $log | tr -d ' \\n')"
echo "@MARKER@"
while true; do sleep 60; done
""".replace("@MARKER@", MARKER)


_REPEAT = """while true; do
  sleep @EVERY@
  for n in 0 1 2 3 4 5 6 7; do
    echo "AGAIN $n $(cat /sys/class/tpm/tpm0/pcr-sha256/$n 2>/dev/null)"
  done
done
"""


def init_script(repeat_pcrs: int = 0) -> str:
    """The guest's /init; with ``repeat_pcrs`` (seconds), after the marker it prints
    PCR 0-7 again that often as ``AGAIN N VALUE`` lines (to read them after a restore)."""
    if not repeat_pcrs:
        return _INIT
    head, _, _ = _INIT.rpartition("while true;")
    return head + _REPEAT.replace("@EVERY@", str(int(repeat_pcrs)))


def kernel_path() -> Path | None:
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64")) or sorted(glob.glob("/boot/vmlinuz-*"))
    return Path(found[-1]) if found else None


def missing_tools() -> list[str]:
    """What a QEMU guest needs and this machine lacks (empty if nothing)."""
    missing = [t for t in (QEMU, "busybox", "cpio") if shutil.which(t) is None]
    kernel = kernel_path()
    if kernel is None:
        missing.append("a kernel in /boot")
    elif not os.access(kernel, os.R_OK):
        missing.append("a readable kernel in /boot")
    return missing


def build_initramfs(workdir: Path, init: str | None = None) -> Path:
    """A gzip'd newc cpio with busybox and /init (``init``: another script); its path."""
    root = workdir / "initramfs-root"
    for sub in ("bin", "proc", "sys", "dev"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise FileNotFoundError("busybox (Debian: busybox-static) is not installed")
    shutil.copy(busybox, root / "bin" / "busybox")
    script = root / "init"
    script.write_text(_INIT if init is None else init)
    script.chmod(0o755)
    out = workdir / "initramfs.cpio.gz"
    files = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
    cpio = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, check=True,
        capture_output=True,
    ).stdout
    gz = subprocess.run(["gzip", "-1"], input=cpio, check=True, capture_output=True).stdout
    out.write_bytes(gz)
    return out


@dataclass
class BootResult:
    """What one boot printed: PCRs by index, TPM version, event log, raw console."""

    console: str
    pcrs: dict[int, str] = field(default_factory=dict)
    tpm_version: str = ""
    event_log: bytes = b""


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
        elif m := re.match(r"EVLOG ([0-9a-f]*)$", line):
            with contextlib.suppress(ValueError):
                current.event_log = bytes.fromhex(m.group(1))
        elif line == MARKER:
            current.console = text
            results.append(current)
            current = BootResult(console="")
    return results


# ---------------------------------------------------------------- the event log

#: TCG_EfiSpecIdEvent signature (PC Client Platform Firmware Profile 2.0, 10.4.5.1).
_SPEC_ID = b"Spec ID Event03\0"
EV_NO_ACTION = 0x3  # not extended into a PCR (PFP 10.4.1)
TPM_ALG_SHA256 = 0x000B


class EventLogError(SgxvtpmError, ValueError):
    """The bytes are not a TCG crypto-agile event log.

    Boot the guest with firmware that logs TPM 2.0 measurements in the
    crypto-agile format (OVMF does), and read the whole log.
    """


@dataclass(frozen=True)
class LogEvent:
    pcr: int
    event_type: int
    digests: dict[int, bytes]  # TPM_ALG_ID -> digest


def parse_event_log(log: bytes) -> list[LogEvent]:
    """The TCG_PCR_EVENT2 entries of a crypto-agile log (PFP 10.2.2; little-endian)."""
    try:
        return _parse_event_log(log)
    except (struct.error, IndexError) as exc:
        raise EventLogError(f"truncated event log: {exc}") from None


def _parse_event_log(log: bytes) -> list[LogEvent]:
    # First entry: TCG_PCR_EVENT (SHA-1 format) carrying TCG_EfiSpecIdEvent.
    _pcr, _type = struct.unpack_from("<II", log, 0)
    (size,) = struct.unpack_from("<I", log, 28)
    spec = log[32 : 32 + size]
    if not spec.startswith(_SPEC_ID):
        raise EventLogError("no Spec ID Event03 header: not a crypto-agile log")
    (count,) = struct.unpack_from("<I", spec, 24)
    sizes = dict(struct.unpack_from("<HH", spec, 28 + 4 * i) for i in range(count))
    events: list[LogEvent] = []
    off = 32 + size
    while off + 8 <= len(log):
        pcr, event_type, n = struct.unpack_from("<III", log, off)
        off += 12
        digests: dict[int, bytes] = {}
        for _ in range(n):
            (alg,) = struct.unpack_from("<H", log, off)
            if alg not in sizes:
                raise EventLogError(f"digest of unknown algorithm {alg:#06x}")
            digests[alg] = log[off + 2 : off + 2 + sizes[alg]]
            off += 2 + sizes[alg]
        (event_size,) = struct.unpack_from("<I", log, off)
        off += 4 + event_size
        if off > len(log):
            raise EventLogError("event runs past the end of the log")
        events.append(LogEvent(pcr, event_type, digests))
    return events


def replay_event_log(log: bytes, alg: int = TPM_ALG_SHA256) -> dict[int, bytes]:
    """PCR values the log's measurements give, from all-zero PCRs (TPM2_PCR_Extend)."""
    pcrs: dict[int, bytes] = {}
    for event in parse_event_log(log):
        if event.event_type == EV_NO_ACTION or alg not in event.digests:
            continue
        old = pcrs.get(event.pcr, bytes(32))
        pcrs[event.pcr] = hashlib.sha256(old + event.digests[alg]).digest()
    return pcrs


# ---------------------------------------------------------------- QEMU


class Guest:
    """One QEMU process (``-accel tcg``) with a TPM on ``ctrl_path``, driven through its monitor."""

    def __init__(
        self,
        workdir: Path,
        initrd: Path,
        ctrl_path: Path,
        name: str = "guest",
        incoming: Path | None = None,
    ) -> None:
        """Start QEMU; with ``incoming``, paused, loading a state saved by :meth:`save`."""
        kernel = kernel_path()
        if kernel is None:
            raise FileNotFoundError("no kernel in /boot (Debian: linux-image-cloud-amd64)")
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
        ]  # fmt: skip
        if incoming is not None:
            self.argv += ["-incoming", f"exec:cat {incoming}"]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def console(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def wait_for_boots(self, count: int, timeout: float) -> list[BootResult]:
        """Wait until ``count`` boots printed the marker; AssertionError with the console if not."""
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

    def monitor(self, command: str) -> str:
        """Run one monitor command; what the monitor printed (echo included)."""
        received = b""
        deadline = time.monotonic() + 10  # QEMU creates the socket shortly after it starts
        while not self.monitor_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.monitor_path))
            s.sendall(command.encode() + b"\n")
            with contextlib.suppress(OSError):
                time.sleep(0.2)
                received = s.recv(65536)
        return received.decode(errors="replace")

    def save(self, path: Path, timeout: float = 60.0) -> None:
        """savevm to a file, as ``virsh save`` does: pause, migrate to ``path``, wait."""
        self.monitor("stop")
        self.monitor(f'migrate "exec:cat > {path}"')
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.monitor("info migrate")
            if "Migration status: completed" in status:
                return
            if "Migration status: failed" in status:
                raise AssertionError(f"savevm failed: {status}")
            time.sleep(0.2)
        raise AssertionError(f"savevm to {path} did not complete in {timeout}s")

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
