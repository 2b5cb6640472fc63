"""A real libvirtd (Debian's 9.0) drives sgxvtpm unchanged, and Debian's swtpm as the golden peer.

Each daemon runs in a private mount namespace (tests/helpers/libvirt.py) and
defines the same TCG domain: direct kernel boot of the test guest, a serial
console file, and ``<tpm model='tpm-tis'><backend type='emulator'
version='2.0'/></tpm>``. Two daemons for the module:

- the golden one, on Debian's swtpm;
- sgxvtpm's, on the system layout ``make install-system`` makes
  (endpoint/libvirt/system.py), installed into a temporary tree (its own
  /opt, /var/lib, /etc and users files, which the namespace sees as the
  machine's passwd and group): libvirt runs our ``swtpm_setup`` and ``swtpm
  socket`` as its default ``swtpm_user``, ``tss``, a member of the group
  ``sgxvtpm``; hostd runs from the installed code with the unit's command
  line, as the user ``sgxvtpm``.

Checked: the guest's PCR 0-7 equal the replay of its event log and the
golden run's; swtpm runs as tss; the VM is in ``vm list``; ``virsh
save``/``restore`` keep the PCR values, also when the domain's TPM state
directory was removed in between (libvirt recreates it, ``swtpm_setup
--overwrite`` binds it to the same instance); after ``virsh undefine``,
``sgxvtpm vm gc`` (as tss) destroys the instance, and not before; and
``<backend type='external'>`` on a ``vm attach`` the test starts boots the
same, on the same daemon.

Two more daemons for many hosts: each on ``sgxvtpm libvirt path`` with a hostd
of its own (two under one sim root, in one fleet); a domain saved on the
first is restored on the second (README, "Many hosts").
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from tests.helpers.fleet import fleet_of, vm_state, wait_vm_state
from tests.helpers.guest import build_initramfs, kernel_path, missing_tools, parse_console
from tests.helpers.hostd import Hostd
from tests.helpers.libvirt import PrivateLibvirtd, install_system, missing, system_tree

from sgxvtpm._demo.guest import BootResult, init_script, replay_event_log
from sgxvtpm.endpoint.libvirt import bindir
from sgxvtpm.endpoint.libvirt.system import Layout, ids
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.vmm.client import VmmClient
from sgxvtpm.vmm.credentials import Credentials

pytestmark = pytest.mark.e2e
BOOT_TIMEOUT = 120.0
REPEAT = 1  # seconds between the guest's AGAIN lines
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


@pytest.fixture(scope="module")
def caps_cache(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """QEMU's capabilities as a libvirtd probed them, for the next daemons (each probe
    costs a start ~7 s), kept in pytest's cache directory between runs."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("libvirt-qemu-capabilities"))
    return tmp_path_factory.mktemp("libvirt-qemu-capabilities")


def _daemon(root: Path, path_dirs: list[Path], env: dict[str, str],
            **kwargs: object) -> PrivateLibvirtd:
    daemon = PrivateLibvirtd(root, path_dirs, env, **kwargs)  # type: ignore[arg-type]
    daemon.start()
    return daemon


@pytest.fixture(scope="module")
def golden(lv_initrd: Path, caps_cache: Path,
           tmp_path_factory: pytest.TempPathFactory) -> BootResult:
    """The same domain on Debian's swtpm, started by libvirt the usual way. (Booting it
    while sgxvtpm's daemon boots its own was slower here: two TCG guests on 2 cores.)"""
    root = tmp_path_factory.mktemp("lv-golden")
    daemon = _daemon(root / "daemon", [], {}, caps_cache=caps_cache)
    try:
        dom = Domain(daemon, root, lv_initrd, NAME, UUID)
        daemon.virsh("start", dom.name)
        boot = dom.boot()
        daemon.virsh("destroy", dom.name)
        daemon.virsh("undefine", dom.name)
        return boot
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def system(libvirt_ready: None) -> Iterator[Layout]:
    """``make install-system`` into a temporary tree (tss must be able to reach it:
    not under pytest's 0700 directories), with copies of the users' files."""
    with system_tree("sgxvtpm-system-") as top:
        layout = Layout(prefix=top / "opt" / "sgxvtpm", state_dir=top / "var" / "sgxvtpm",
                        credentials=top / "var" / "sgxvtpm-libvirt",
                        conf_dir=top / "etc" / "sgxvtpm", unit_dir=top / "systemd",
                        users_prefix=top / "users")
        first = install_system(layout)
        assert first.returncode == 0, first.stderr
        again = install_system(layout)  # idempotent
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == "install-system: nothing to do, the layout is in place"
        yield layout


class SystemDaemon:
    """libvirtd with the installed layout first on its PATH, swtpm_user tss, and hostd
    started in its namespace with the command line of the installed unit."""

    def __init__(self, layout: Layout, root: Path, caps_cache: Path) -> None:
        self.layout = layout
        # The test's own SGXVTPM_ variables emptied: only the installed sgxvtpm.conf counts.
        self.env = {"SGXVTPM_CONF": str(layout.conf), "SGXVTPM_STATE_DIR": "",
                    "SGXVTPM_CONFIG_DIR": ""}
        self.daemon = _daemon(root / "daemon", [layout.libexec], self.env, swtpm_user="tss",
                              swtpm_group="tss", users=layout.users_prefix,
                              caps_cache=caps_cache)
        try:
            self._start_hostd(root)
        except BaseException:
            self.stop()
            raise

    def _start_hostd(self, root: Path) -> None:
        unit = (self.layout.unit_dir / "sgxvtpm-hostd.service").read_text()
        exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
        self.hostd_log = root / "hostd.log"
        with open(self.hostd_log, "ab") as log:
            self.hostd: subprocess.Popen[bytes] | None = subprocess.Popen(
                self.ns(exec_start.split("=", 1)[1].split()), stdin=subprocess.DEVNULL,
                stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while not (self.layout.state_dir / "hostd.sock").exists():
            assert self.hostd.poll() is None and time.monotonic() < deadline, (
                self.hostd_log.read_text()[-3000:])
            time.sleep(0.05)
        # tss's first contact pins the platform root in its credentials.
        while (listed := self.tss("vm", "list", "--json", check=False)).returncode != 0:
            assert self.hostd.poll() is None and time.monotonic() < deadline, (
                f"{listed.stderr}\n{self.hostd_log.read_text()[-3000:]}")
            time.sleep(0.2)
        assert (self.layout.state_dir / "hostd.sock").stat().st_mode & 0o777 == 0o660

    def ns(self, argv: list[str], user: str | None = None) -> list[str]:
        assert self.daemon.proc is not None
        runas = ([] if user is None else
                 ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"])
        return ["nsenter", "-t", str(self.daemon.proc.pid), "-m", "--", *runas, *argv]

    def tss(self, *args: str, check: bool = True,
            operator: bool = True) -> subprocess.CompletedProcess[str]:
        """``sgxvtpm ARGS`` of the installed code, as tss, in the daemon's namespace;
        ``operator``: with the installed hostd and operator credentials in the
        environment (else only sgxvtpm.conf names them: ``vm gc`` reads it)."""
        env = {**os.environ, **self.env}
        if operator:
            env.update(SGXVTPM_STATE_DIR=str(self.layout.state_dir),
                       SGXVTPM_CONFIG_DIR=str(self.layout.credentials))
        done = subprocess.run(self.ns([str(self.layout.prefix / "bin" / "sgxvtpm"), *args],
                                       "tss"), env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert not check or done.returncode == 0, done.stderr
        return done

    def vms(self) -> dict[str, str]:
        """VM name -> instance id, listed over K1 with the installed operator
        credentials (in this process: a CLI start costs a second here)."""
        client = VmmClient(StateDir.at(self.layout.state_dir),
                           credentials=Credentials.at(self.layout.credentials))
        return {i.name: i.instance_id for i in asyncio.run(client.list())}

    def stop(self) -> None:
        self.daemon.stop()  # hostd is in its namespace: ended with it
        hostd = getattr(self, "hostd", None)
        if hostd is not None:
            if hostd.poll() is None:
                hostd.kill()
            hostd.wait(30)


@pytest.fixture(scope="module")
def sgx_daemon(system: Layout, caps_cache: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemDaemon]:
    daemon = SystemDaemon(system, tmp_path_factory.mktemp("lv-system"), caps_cache)
    try:
        yield daemon
    finally:
        daemon.stop()


def _swtpm_uids(daemon: PrivateLibvirtd) -> set[int]:
    """The real uids of the sgxvtpm swtpm processes libvirt started."""
    uids = set()
    for pid in daemon.namespace_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if any(arg.endswith(b"sgxvtpm-libvirt/swtpm") for arg in cmdline):
            uids.add(int(next(line for line in status.splitlines()
                              if line.startswith("Uid:")).split()[1]))
    return uids


def test_golden_swtpm_domain_replays_its_event_log(golden: BootResult) -> None:
    _check_replay(golden)


def test_libvirt_emulator_backend_on_the_system_layout_as_tss(
    lv_initrd: Path, golden: BootResult, sgx_daemon: SystemDaemon, tmp_path: Path
) -> None:
    daemon = sgx_daemon.daemon
    dom = Domain(daemon, tmp_path, lv_initrd, NAME, UUID)
    daemon.virsh("start", dom.name)
    boot = dom.boot()
    _check_replay(boot)
    assert boot.pcrs == golden.pcrs
    vm = f"{NAME}-{UUID}"
    instance = sgx_daemon.vms()[vm]
    assert '"libvirt.swtpm_serving"' in daemon.swtpm_log(dom.name)
    assert _swtpm_uids(daemon) == {ids(sgx_daemon.layout, "tss")[0]}

    # virsh save; the TPM state directory removed; virsh restore: libvirt makes the
    # directory anew, swtpm_setup --overwrite binds it to the same instance.
    saved = tmp_path / "lv-dom.save"
    daemon.virsh("save", dom.name, str(saved))
    shutil.rmtree(daemon.var / "lib" / "libvirt" / "swtpm" / UUID)
    offset = len(dom.text())
    daemon.virsh("restore", str(saved))
    assert dom.pcrs_after(offset) == boot.pcrs
    assert sgx_daemon.vms()[vm] == instance

    kept = sgx_daemon.tss("vm", "gc", operator=False)
    assert kept.stdout == ""
    daemon.virsh("destroy", dom.name)
    daemon.virsh("undefine", dom.name)  # removes /var/lib/libvirt/swtpm/UUID
    collected = sgx_daemon.tss("vm", "gc", operator=False)
    assert f"destroyed {vm}" in collected.stdout
    assert vm not in sgx_daemon.vms()


def test_libvirt_external_backend_on_vm_attach(
    lv_initrd: Path, sgx_daemon: SystemDaemon, golden: BootResult, tmp_path: Path
) -> None:
    """``<backend type='external'>``: the operator starts ``vm attach`` with the owner
    QEMU runs as (root in the test's qemu.conf); libvirt only points QEMU at it."""
    vm, layout = "lv-external", sgx_daemon.layout
    sgx_daemon.tss("vm", "create", vm)  # its binding goes to the operator's credentials
    ctrl = tmp_path / "external.sock"
    with open(tmp_path / "attach.log", "ab") as log:
        attach = subprocess.Popen(
            sgx_daemon.ns([str(layout.prefix / "bin" / "sgxvtpm"), "vm", "attach", vm,
                            "--ctrl", str(ctrl), "--owner", "root", "--mode", "0600",
                            "--state-dir", str(layout.state_dir), "--credentials",
                            str(layout.credentials)]),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    daemon = sgx_daemon.daemon
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
        daemon.virsh("undefine", dom.name)
        assert attach.poll() is None, "vm attach serves the VM's next QEMU"
    finally:
        attach.terminate()
        attach.wait(30)


Host = tuple[Hostd, PrivateLibvirtd]


@pytest.fixture(scope="module")
def fleet_daemons(libvirt_ready: None, caps_cache: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Host]]:
    """Two hosts: each a hostd (two under one sim root, in one fleet) and a private
    libvirtd with ``sgxvtpm libvirt path`` first on its PATH and that hostd (its own
    state directory) in its environment."""
    base = tmp_path_factory.mktemp("lv-fleet")
    bin_dir = bindir.ensure(base / "bin")
    with fleet_of(base / "hosts", 2) as hosts, ExitStack() as stack:
        pairs = []
        for i, host in enumerate(hosts):
            env = {"SGXVTPM_STATE_DIR": str(host.state.root),
                   "SGXVTPM_CONFIG_DIR": str(host.credentials.root), "SGXVTPM_CONF": os.devnull}
            daemon = _daemon(base / f"daemon{i}", [bin_dir], env, caps_cache=caps_cache)
            stack.callback(daemon.stop)
            pairs.append((host, daemon))
        yield pairs[0], pairs[1]


def test_libvirt_save_on_one_host_restores_on_another_of_its_fleet(
    lv_initrd: Path, fleet_daemons: tuple[Host, Host], tmp_path: Path
) -> None:
    """``virsh save`` on host A's libvirtd, ``virsh restore`` of the file on host B's:
    B's libvirt runs ``swtpm_setup --overwrite`` (no --vmid) and ``swtpm socket``,
    which make the incoming VM under A's name; the guest resumes on B with the PCR 0-7
    it booted with on A; A's instance is then ``migrated`` and a restore on A fails."""
    (a, daemon_a), (b, daemon_b) = fleet_daemons
    name, dom_uuid = "lv-mover", str(uuid.uuid4())
    vm = f"{name}-{dom_uuid}"
    dom = Domain(daemon_a, tmp_path, lv_initrd, name, dom_uuid)
    daemon_a.virsh("start", dom.name)
    boot = dom.boot()
    _check_replay(boot)
    saved = tmp_path / "mover.save"
    daemon_a.virsh("save", dom.name, str(saved))

    offset = len(dom.text())  # the console file: B's QEMU appends to it
    daemon_b.virsh("restore", str(saved))
    assert dom.pcrs_after(offset) == boot.pcrs
    assert '"libvirt.incoming_created"' in daemon_b.swtpm_log(name)
    assert vm_state(b, vm) == "running"

    wait_vm_state(a, vm, "migrated")
    again = daemon_a.virsh("restore", str(saved), check=False)
    assert again.returncode != 0, again.stdout
    assert "tpm-emulator: TPM result for CMD_STOP: 0x9 operation failed" in again.stderr
    daemon_b.virsh("destroy", name)
    daemon_a.virsh("undefine", name)
