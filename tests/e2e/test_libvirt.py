"""A real libvirtd (Debian's 9.0) drives sgxvtpm unchanged, and Debian's swtpm as the golden peer.

Each run starts its own libvirtd in a private mount namespace
(tests/helpers/libvirt.py), the directory ``sgxvtpm libvirt path`` makes first
on its PATH (or not, for the golden run), and defines the same TCG domain:
direct kernel boot of the test guest, a serial console file, and
``<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>``.
libvirt then runs our ``swtpm_setup`` and ``swtpm socket`` exactly as it
runs swtpm's. For this first version libvirt runs them as root
(``swtpm_user = "root"`` in the test's qemu.conf); see README "With libvirt".

Checked: the guest's PCR 0-7 equal the replay of its event log and the
golden run's; the VM is in ``vm list``; ``virsh save``/``restore`` keep the
PCR values; after ``virsh undefine`` (which removes libvirt's TPM state
directory), ``sgxvtpm vm gc`` destroys the instance, and not before; and
``<backend type='external'>`` on a ``vm attach`` the test starts boots the same.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers.guest import build_initramfs, kernel_path, missing_tools, parse_console
from tests.helpers.hostd import Hostd, running_hostd
from tests.helpers.libvirt import PrivateLibvirtd, missing

from sgxvtpm._demo.guest import BootResult, init_script, replay_event_log
from sgxvtpm.endpoint.libvirt import bindir
from sgxvtpm.vmm.credentials import Credentials

pytestmark = pytest.mark.e2e
BOOT_TIMEOUT = 120.0
REPEAT = 2  # seconds between the guest's AGAIN lines
# The same name and UUID in both runs: SeaBIOS measures the SMBIOS tables (which
# carry the UUID) into PCR 1.
NAME = "lv-dom"
UUID = str(uuid.uuid4())

DOMAIN = """\
<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 rdinit=/init</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>restart</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    {tpm}
    <memballoon model='none'/>
  </devices>
</domain>
"""
EMULATOR = "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>"
EXTERNAL = ("<tpm model='tpm-tis'><backend type='external'>"
            "<source type='unix' mode='connect' path='{path}'/></backend></tpm>")


@pytest.fixture(scope="module")
def libvirt_ready() -> None:
    why = missing()
    if why:
        pytest.skip(why)
    tools = missing_tools()
    if tools:
        pytest.skip(f"the libvirt guest needs: {', '.join(tools)}")


@pytest.fixture(scope="module")
def lv_initrd(libvirt_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(tmp_path_factory.mktemp("lv-initramfs"), init_script(REPEAT))


@pytest.fixture(scope="module")
def lv_hostd(libvirt_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostd]:
    base = tmp_path_factory.mktemp("lv-sgx")
    with running_hostd(base / "state", credentials=base / "operator") as h:
        yield h


class Domain:
    """One domain of a private libvirtd, its console read from the file."""

    def __init__(self, daemon: PrivateLibvirtd, workdir: Path, initrd: Path, name: str,
                 dom_uuid: str, tpm: str = EMULATOR) -> None:
        self.daemon = daemon
        self.name = name
        self.uuid = dom_uuid
        self.console = workdir / f"{name}.console"
        xml = workdir / f"{name}.xml"
        xml.write_text(DOMAIN.format(name=name, uuid=self.uuid, kernel=kernel_path(),
                                     initrd=initrd, console=self.console, tpm=tpm))
        daemon.virsh("define", str(xml))

    def text(self) -> str:
        try:
            return self.console.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def boot(self) -> BootResult:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            boots = parse_console(self.text())
            if boots:
                return boots[0]
            time.sleep(0.2)
        raise AssertionError(f"{self.name} did not boot; console:\n{self.text()[-2000:]}\n"
                             f"swtpm log:\n{self.daemon.swtpm_log(self.name)[-2000:]}\n"
                             f"{self.daemon.diagnostics()}")

    def pcrs_after(self, offset: int) -> dict[int, str]:
        """PCR 0-7 from the first complete round of AGAIN lines printed after ``offset``."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            seen: dict[int, str] = {}
            for line in self.text()[offset:].splitlines():
                parts = line.strip().split()
                if len(parts) == 3 and parts[0] == "AGAIN" and parts[1].isdigit():
                    seen[int(parts[1])] = parts[2].lower()
                    if len(seen) == 8 and int(parts[1]) == 7:
                        return seen
            time.sleep(0.2)
        raise AssertionError(f"no PCRs after the restore; console:\n{self.text()[-2000:]}")


def _check_replay(boot: BootResult) -> None:
    assert boot.tpm_version == "2"
    assert sorted(boot.pcrs) == list(range(8)) and boot.pcrs[0] != "0" * 64
    replayed = replay_event_log(boot.event_log)
    assert {n: replayed.get(n, bytes(32)).hex() for n in range(8)} == boot.pcrs


def _daemon(root: Path, path_dirs: list[Path], env: dict[str, str]) -> PrivateLibvirtd:
    daemon = PrivateLibvirtd(root, path_dirs, env)
    daemon.start()
    return daemon


@pytest.fixture(scope="module")
def golden(lv_initrd: Path, tmp_path_factory: pytest.TempPathFactory) -> BootResult:
    """The same domain on Debian's swtpm, started by libvirt the usual way."""
    root = tmp_path_factory.mktemp("lv-golden")
    daemon = _daemon(root / "daemon", [], {})
    try:
        dom = Domain(daemon, root, lv_initrd, NAME, UUID)
        daemon.virsh("start", dom.name)
        boot = dom.boot()
        daemon.virsh("destroy", dom.name)
        daemon.virsh("undefine", dom.name)
        return boot
    finally:
        daemon.stop()


def _in_namespace(daemon: PrivateLibvirtd, env: dict[str, str],
                  *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` inside libvirtd's mount namespace (where libvirt's paths are)."""
    assert daemon.proc is not None
    return subprocess.run(["nsenter", "-t", str(daemon.proc.pid), "-m", "--", *argv],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120, check=False)


def test_golden_swtpm_domain_replays_its_event_log(golden: BootResult) -> None:
    _check_replay(golden)


def test_libvirt_emulator_backend_on_sgxvtpm(
    lv_initrd: Path, lv_hostd: Hostd, golden: BootResult, tmp_path: Path
) -> None:
    bin_dir = bindir.ensure(tmp_path / "bin")
    env = {"SGXVTPM_STATE_DIR": str(lv_hostd.state.root),
           "SGXVTPM_CONFIG_DIR": str(lv_hostd.credentials.root), "SGXVTPM_CONF": os.devnull}
    daemon = _daemon(tmp_path / "daemon", [bin_dir], env)
    try:
        dom = Domain(daemon, tmp_path, lv_initrd, NAME, UUID)
        daemon.virsh("start", dom.name)
        boot = dom.boot()
        _check_replay(boot)
        assert boot.pcrs == golden.pcrs
        vm = f"{NAME}-{UUID}"
        assert vm in {i.name for i in asyncio.run(lv_hostd.vmm().list())}
        assert '"libvirt.swtpm_serving"' in daemon.swtpm_log(dom.name)

        saved = tmp_path / "lv-dom.save"
        daemon.virsh("save", dom.name, str(saved))
        offset = len(dom.text())
        daemon.virsh("restore", str(saved))
        assert dom.pcrs_after(offset) == boot.pcrs

        gc = [sys.executable, "-m", "sgxvtpm.cli", "vm", "gc"]
        kept = _in_namespace(daemon, env, *gc)
        assert kept.returncode == 0 and kept.stdout == "", kept.stderr
        daemon.virsh("destroy", dom.name)
        daemon.virsh("undefine", dom.name)  # removes /var/lib/libvirt/swtpm/UUID
        collected = _in_namespace(daemon, env, *gc)
        assert collected.returncode == 0, collected.stderr
        assert f"destroyed {vm}" in collected.stdout
        assert vm not in {i.name for i in asyncio.run(lv_hostd.vmm().list())}
    finally:
        daemon.stop()


def test_libvirt_external_backend_on_vm_attach(
    lv_initrd: Path, lv_hostd: Hostd, golden: BootResult, tmp_path: Path
) -> None:
    """``<backend type='external'>``: the operator starts ``vm attach`` with the owner
    QEMU runs as (root in the test's qemu.conf); libvirt only points QEMU at it."""
    vm = "lv-external"
    creds = tmp_path / "vm-credentials"
    asyncio.run(lv_hostd.vmm().create(vm, export=Credentials.at(creds)))
    ctrl = tmp_path / "external.sock"
    with open(tmp_path / "attach.log", "ab") as log:
        attach = subprocess.Popen(
            [sys.executable, "-m", "sgxvtpm.cli", "vm", "attach", vm, "--ctrl", str(ctrl),
             "--owner", "root", "--mode", "0600", "--state-dir", str(lv_hostd.state.root),
             "--credentials", str(creds)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    daemon = _daemon(tmp_path / "daemon", [], {})
    try:
        deadline = time.monotonic() + 30
        while not ctrl.exists():
            assert attach.poll() is None and time.monotonic() < deadline, (
                (tmp_path / "attach.log").read_text())
            time.sleep(0.05)
        dom = Domain(daemon, tmp_path, lv_initrd, NAME, UUID, EXTERNAL.format(path=ctrl))
        daemon.virsh("start", dom.name)
        boot = dom.boot()
        _check_replay(boot)
        assert boot.pcrs == golden.pcrs
        daemon.virsh("destroy", dom.name)
        assert attach.poll() is None, "vm attach serves the VM's next QEMU"
    finally:
        daemon.stop()
        attach.terminate()
        attach.wait(30)
