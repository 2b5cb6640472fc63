"""The libvirt executables (``sgxvtpm libvirt path``) as real processes against a real hostd.

Each is run with the argument lists libvirt 9.0 builds (src/qemu/qemu_tpm.c)
and the environment libvirtd gives it (SGXVTPM_STATE_DIR / SGXVTPM_CONFIG_DIR
naming hostd and the operator): ``swtpm_setup`` makes a VM whose binding is
all the TPM state directory holds; ``swtpm socket`` serves QEMU's control
and data channels from it over K2; ``swtpm_ioctl -s`` ends it; ``vm gc``
destroys the VM once libvirt removed the directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from tests.helpers.endpoint import CtrlClient
from tests.helpers.fleet import fleet_of, vm_state, wait_vm_state
from tests.helpers.hostd import Hostd, running_hostd
from tests.helpers.qemu_ctrl import savevm

from sgxvtpm.endpoint.libvirt import bindir
from sgxvtpm.endpoint.libvirt.config import MARKER, Marker
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU
from sgxvtpm.wire.swtpm_ctrl import CtrlCmd, CtrlRequest, CtrlResponse

SOCKET_TIMEOUT = 1.0  # libvirt 9.0 waits this long for the control socket


@pytest.fixture(scope="module")
def hostd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostd]:
    base = tmp_path_factory.mktemp("lv")
    with running_hostd(base / "state", credentials=base / "operator") as h:
        yield h


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bindir.ensure(tmp_path_factory.mktemp("bin") / "libvirt")


def _env(hostd: Hostd) -> dict[str, str]:
    return {**os.environ, "SGXVTPM_STATE_DIR": str(hostd.state.root),
            "SGXVTPM_CONFIG_DIR": str(hostd.credentials.root),
            "SGXVTPM_CONF": os.devnull}


def _setup(bin_dir: Path, hostd: Hostd, tpm_state: Path, log: Path, *extra: str,
           vmid: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(bin_dir / "swtpm_setup"), "--tpm2", "--tpm-state", str(tpm_state),
            "--logfile", str(log), "--createek", "--create-ek-cert",
            "--create-platform-cert", "--lock-nvram", *extra]
    if vmid:
        argv += ["--vmid", vmid]
    return subprocess.run(argv, env=env or _env(hostd), capture_output=True, text=True,
                          timeout=120, check=False)


def _new_domain(tmp_path: Path) -> tuple[str, Path]:
    dom_uuid = str(uuid.uuid4())
    tpm_state = tmp_path / "swtpm" / dom_uuid / "tpm2"
    tpm_state.mkdir(parents=True, mode=0o700)
    return dom_uuid, tpm_state


def _names(hostd: Hostd) -> set[str]:
    return {i.name for i in asyncio.run(hostd.vmm().list())}


def _start_swtpm(bin_dir: Path, hostd: Hostd, ctrl: Path, tpm_state: Path, log: Path,
                 *extra: str) -> tuple[subprocess.Popen[bytes], float]:
    t0 = time.monotonic()
    with open(log.with_suffix(".stderr"), "ab") as stderr:  # before --log takes over
        proc = subprocess.Popen(
            [str(bin_dir / "swtpm"), "socket", "--ctrl", f"type=unixio,path={ctrl},mode=0600",
             "--tpmstate", f"dir={tpm_state},mode=0600", "--log", f"file={log}", "--tpm2",
             *extra],
            env=_env(hostd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=stderr,
        )  # fmt: skip
    while not ctrl.exists():
        assert time.monotonic() - t0 < 10, "no control socket after 10 s"
        time.sleep(0.005)
    return proc, time.monotonic() - t0


def _use_tpm(ctrl: Path) -> CtrlClient:
    client = CtrlClient(ctrl, short_errors=False)
    client.attach_data()
    init = client.request(CtrlRequest(CtrlCmd.INIT))
    assert isinstance(init, CtrlResponse) and init.result == 0
    client.transact(wire.startup(TPM2_SU.CLEAR))
    rsp = client.transact(wire.get_random(16))
    assert wire.response_code(rsp) == 0 and len(rsp) == 10 + 2 + 16
    return client


def test_setup_makes_a_vm_whose_binding_is_all_the_state_dir_holds(
    bin_dir: Path, hostd: Hostd, tmp_path: Path
) -> None:
    dom_uuid, tpm_state = _new_domain(tmp_path)
    log = tmp_path / "swtpm.log"
    done = _setup(bin_dir, hostd, tpm_state, log, "--not-overwrite", vmid=f"my dom:{dom_uuid}")
    assert done.returncode == 0, log.read_text()
    name = f"my_dom-{dom_uuid}"
    assert name in _names(hostd)
    assert f"Created sgxvtpm VM {name}" in log.read_text()

    files = sorted(str(p.relative_to(tpm_state)) for p in tpm_state.rglob("*") if p.is_file())
    host = next((tpm_state / "hosts").iterdir()).name
    assert files == sorted([
        MARKER, f"hosts/{host}/.lock", f"hosts/{host}/root_ca.pem", f"hosts/{host}/state_dir",
        f"hosts/{host}/vms/{name}/ca.crt", f"hosts/{host}/vms/{name}/instance.json",
        f"hosts/{host}/vms/{name}/vm.crt", f"hosts/{host}/vms/{name}/vm.key",
    ])  # fmt: skip
    for path in (tpm_state, tpm_state / MARKER, tpm_state / f"hosts/{host}/vms/{name}/vm.key"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path

    info = asyncio.run(hostd.vmm().show(name))
    ca = asyncio.run(hostd.vmm().ca_certificate())
    assert set(info.ek_certificates) == {"rsa2048"}  # what swtpm_setup makes by default
    for der in info.ek_certificates.values():
        x509.load_der_x509_certificate(bytes.fromhex(der)).verify_directly_issued_by(ca)

    # libvirt's next start of the domain: --not-overwrite keeps the VM.
    again = _setup(bin_dir, hostd, tpm_state, log, "--not-overwrite", vmid=f"my dom:{dom_uuid}")
    assert again.returncode == 0
    assert asyncio.run(hostd.vmm().show(name)).instance_id == info.instance_id
    # Neither flag: refused, as swtpm_setup does, with the reason in the log.
    refused = _setup(bin_dir, hostd, tpm_state, log, vmid=f"my dom:{dom_uuid}")
    assert refused.returncode == 1 and "--overwrite" in log.read_text().splitlines()[-1]


def test_setup_failure_is_a_nonzero_exit_with_the_reason_in_the_log(
    bin_dir: Path, hostd: Hostd, tmp_path: Path
) -> None:
    dom_uuid, tpm_state = _new_domain(tmp_path)
    log = tmp_path / "swtpm.log"
    env = {**_env(hostd), "SGXVTPM_STATE_DIR": str(tmp_path / "no-hostd")}
    done = _setup(bin_dir, hostd, tpm_state, log, vmid=f"d:{dom_uuid}", env=env)
    assert done.returncode == 1
    assert "swtpm_setup: error: cannot reach hostd" in log.read_text()
    assert list(tpm_state.iterdir()) == [] or MARKER not in os.listdir(tpm_state)


def test_swtpm_socket_serves_qemus_channels_and_ends_on_swtpm_ioctl_s(
    bin_dir: Path, hostd: Hostd, tmp_path: Path
) -> None:
    dom_uuid, tpm_state = _new_domain(tmp_path)
    log = tmp_path / "swtpm.log"
    assert _setup(bin_dir, hostd, tpm_state, log, vmid=f"io:{dom_uuid}").returncode == 0
    ctrl = tmp_path / "io-swtpm.sock"
    proc, took = _start_swtpm(bin_dir, hostd, ctrl, tpm_state, log, "--terminate")
    try:
        assert took < SOCKET_TIMEOUT, f"control socket after {took:.3f} s"
        assert stat.S_IMODE(ctrl.stat().st_mode) == 0o600
        client = _use_tpm(ctrl)
        stop = subprocess.run([str(bin_dir / "swtpm_ioctl"), "--unix", str(ctrl), "-s"],
                              capture_output=True, text=True, timeout=30, check=False)
        assert stop.returncode == 0, stop.stderr
        assert proc.wait(15) == 0
        client.close()
        assert '"libvirt.swtpm_serving"' in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_terminate_ends_when_qemu_goes(bin_dir: Path, hostd: Hostd, tmp_path: Path) -> None:
    """``--terminate``: the process ends when QEMU's data channel closes (as swtpm 0.7.1;
    a control connection alone ending does not: tests/e2e/test_swtpm_ioctl_conformance.py)."""
    dom_uuid, tpm_state = _new_domain(tmp_path)
    log = tmp_path / "swtpm.log"
    assert _setup(bin_dir, hostd, tpm_state, log, vmid=f"t:{dom_uuid}").returncode == 0
    ctrl = tmp_path / "t-swtpm.sock"
    proc, _ = _start_swtpm(bin_dir, hostd, ctrl, tpm_state, log, "--terminate")
    try:
        _use_tpm(ctrl).close()  # QEMU went away
        assert proc.wait(15) == 0
        assert not ctrl.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_older_libvirt_daemon_and_pid_file(bin_dir: Path, hostd: Hostd, tmp_path: Path) -> None:
    dom_uuid, tpm_state = _new_domain(tmp_path)
    log = tmp_path / "swtpm.log"
    assert _setup(bin_dir, hostd, tpm_state, log, vmid=f"old:{dom_uuid}").returncode == 0
    ctrl, pid_file = tmp_path / "old-swtpm.sock", tmp_path / "old-swtpm.pid"
    parent, _ = _start_swtpm(bin_dir, hostd, ctrl, tpm_state, log, "--daemon",
                             "--pid", f"file={pid_file}")
    assert parent.wait(10) == 0  # the foreground process leaves; the daemon serves
    pid = int(pid_file.read_text())
    try:
        assert pid != parent.pid
        _use_tpm(ctrl).close()
        os.kill(pid, signal.SIGTERM)  # what libvirt sends after swtpm_ioctl -s
        deadline = time.monotonic() + 15
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}")
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)


def test_swtpm_without_a_binding_fails_in_its_log_and_removes_the_socket(
    bin_dir: Path, hostd: Hostd, tmp_path: Path
) -> None:
    _, tpm_state = _new_domain(tmp_path)
    log, ctrl = tmp_path / "swtpm.log", tmp_path / "none.sock"
    proc, _ = _start_swtpm(bin_dir, hostd, ctrl, tpm_state, log)
    assert proc.wait(30) == 1
    assert "holds no sgxvtpm binding" in log.read_text()
    assert not ctrl.exists()


def test_gc_destroys_the_vm_of_an_undefined_domain_only(
    bin_dir: Path, hostd: Hostd, tmp_path: Path
) -> None:
    kept_uuid, kept = _new_domain(tmp_path)
    gone_uuid, gone = _new_domain(tmp_path)
    log = tmp_path / "swtpm.log"
    for dom_uuid, state in ((kept_uuid, kept), (gone_uuid, gone)):
        assert _setup(bin_dir, hostd, state, log, vmid=f"gc:{dom_uuid}").returncode == 0
    asyncio.run(hostd.vmm().create("plain-gc-bystander"))
    shutil.rmtree(gone.parent)  # virsh undefine
    gc = subprocess.run([sys.executable, "-m", "sgxvtpm.cli", "vm", "gc"], env=_env(hostd),
                        capture_output=True, text=True, timeout=120, check=False)
    assert gc.returncode == 0, gc.stderr
    assert f"destroyed gc-{gone_uuid}" in gc.stdout
    names = _names(hostd)
    assert f"gc-{gone_uuid}" not in names
    assert {f"gc-{kept_uuid}", "plain-gc-bystander"} <= names
    # A second collection finds nothing more.
    again = subprocess.run([sys.executable, "-m", "sgxvtpm.cli", "vm", "gc"], env=_env(hostd),
                           capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and again.stdout == ""


def test_libvirt_path_makes_the_three_executables_libvirt_looks_up(tmp_path: Path) -> None:
    target = tmp_path / "lv-bin"
    for _ in range(2):  # idempotent
        done = subprocess.run([sys.executable, "-m", "sgxvtpm.cli", "libvirt", "path", "--dir",
                               str(target)], capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(target)
    for name in ("swtpm", "swtpm_setup", "swtpm_ioctl"):
        assert os.access(target / name, os.X_OK), name
    caps = subprocess.run([str(target / "swtpm"), "socket", "--print-capabilities"],
                          capture_output=True, text=True, timeout=30, check=True)
    assert '"tpm-2.0"' in caps.stdout
    assert os.readlink(target / "swtpm_ioctl") == shutil.which("swtpm_ioctl")


def _save(bin_dir: Path, hostd: Hostd, ctrl: Path, tpm_state: Path,
          log: Path) -> tuple[dict[int, bytes], bytes]:
    """QEMU's savevm of a running TPM (libvirt's swtpm, started and stopped here): PCR 16
    extended, GET_STATEBLOB x3; the blobs and PCR 16's value."""
    proc, _ = _start_swtpm(bin_dir, hostd, ctrl, tpm_state, log)
    try:
        client = _use_tpm(ctrl)
        try:
            digest = hashlib.sha256(b"saved by libvirt").digest()
            assert wire.response_code(client.transact(wire.pcr_extend(16, digest))) == 0
            pcr = client.transact(wire.pcr_read([16]))
            return savevm(client), pcr
        finally:
            client.close()
    finally:
        _stop(bin_dir, ctrl, proc)


def _restore(ctrl: Path, blobs: dict[int, bytes]) -> tuple[list[int], CtrlClient]:
    """QEMU's restore into a new swtpm: STOP, SET_STATEBLOB x3, INIT; the results."""
    client = CtrlClient(ctrl, short_errors=False)
    client.attach_data()
    client.request(CtrlRequest(CtrlCmd.STOP))
    results = []
    for kind, data in blobs.items():
        r = client.request(CtrlRequest(CtrlCmd.SET_STATEBLOB, blob_type=kind, data=data))
        assert isinstance(r, CtrlResponse)
        results.append(r.result)
    return results, client


def _restores(bin_dir: Path, hostd: Hostd, ctrl: Path, tpm_state: Path, log: Path,
              blobs: dict[int, bytes], pcr: bytes) -> None:
    """A new swtpm of libvirt's takes the saved blobs; the TPM resumes with PCR 16 as saved."""
    proc, _ = _start_swtpm(bin_dir, hostd, ctrl, tpm_state, log)
    try:
        results, client = _restore(ctrl, blobs)
        assert results == [0, 0, 0], log.read_text()
        assert client.request(CtrlRequest(CtrlCmd.INIT, flags=1)).result == 0  # type: ignore[attr-defined]
        assert client.transact(wire.pcr_read([16])) == pcr
        client.close()
    finally:
        _stop(bin_dir, ctrl, proc)


def _incoming_setup(bin_dir: Path, hostd: Hostd,
                    tpm_state: Path) -> subprocess.CompletedProcess[str]:
    """libvirt's swtpm_setup for an incoming domain whose TPM state dir it just made."""
    return subprocess.run([str(bin_dir / "swtpm_setup"), "--tpm2", "--tpm-state", str(tpm_state),
                           "--overwrite"], env=_env(hostd), capture_output=True, text=True,
                          timeout=120, check=False)


def _stop(bin_dir: Path, ctrl: Path, proc: subprocess.Popen[bytes]) -> None:
    subprocess.run([str(bin_dir / "swtpm_ioctl"), "--unix", str(ctrl), "-s"],
                   capture_output=True, timeout=30, check=False)
    if proc.wait(15) is None:
        proc.kill()


def test_restore_after_libvirt_recreated_the_state_dir_rebinds_the_same_instance(
    bin_dir: Path, hostd: Hostd, tmp_path: Path
) -> None:
    """virsh save; the TPM state dir removed; virsh restore: libvirt makes the dir anew and
    runs ``swtpm_setup --overwrite``, which binds it to the VM it held (not a new one),
    so the saved blobs, sealed to that instance, load."""
    dom_uuid, tpm_state = _new_domain(tmp_path)
    log, ctrl = tmp_path / "swtpm.log", tmp_path / "rs.sock"
    assert _setup(bin_dir, hostd, tpm_state, log, "--not-overwrite",
                  vmid=f"rs:{dom_uuid}").returncode == 0
    name = f"rs-{dom_uuid}"
    instance = asyncio.run(hostd.vmm().show(name)).instance_id
    blobs, pcr = _save(bin_dir, hostd, ctrl, tpm_state, log)

    shutil.rmtree(tpm_state)
    tpm_state.mkdir(mode=0o700)
    done = _incoming_setup(bin_dir, hostd, tpm_state)
    assert done.returncode == 0, done.stderr
    assert f"Bound {tpm_state} again to sgxvtpm VM {name}" in done.stderr
    assert asyncio.run(hostd.vmm().show(name)).instance_id == instance
    assert {i.name for i in asyncio.run(hostd.vmm().list())} & {f"libvirt-{dom_uuid}"} == set()

    _restores(bin_dir, hostd, ctrl, tpm_state, log, blobs, pcr)
    # The record still names the directory: vm gc keeps the VM.
    gc = subprocess.run([sys.executable, "-m", "sgxvtpm.cli", "vm", "gc"], env=_env(hostd),
                        capture_output=True, text=True, timeout=120, check=False)
    assert gc.returncode == 0 and name not in gc.stdout, gc.stderr
    assert name in _names(hostd)


def test_restore_into_a_new_instance_is_refused_with_the_reason_in_the_swtpm_log(
    bin_dir: Path, hostd: Hostd, tmp_path: Path
) -> None:
    """The VM of the directory is gone (vm gc ran after libvirt removed it): swtpm_setup
    makes a new VM, the saved blobs cannot load into it, and libvirt's swtpm log says why
    (QEMU reports only "a parameter is bad")."""
    dom_uuid, tpm_state = _new_domain(tmp_path)
    log, ctrl = tmp_path / "swtpm.log", tmp_path / "gone.sock"
    assert _setup(bin_dir, hostd, tpm_state, log, vmid=f"gone:{dom_uuid}").returncode == 0
    blobs, _ = _save(bin_dir, hostd, ctrl, tpm_state, log)
    shutil.rmtree(tpm_state)
    gc = subprocess.run([sys.executable, "-m", "sgxvtpm.cli", "vm", "gc"], env=_env(hostd),
                        capture_output=True, text=True, timeout=120, check=False)
    assert f"destroyed gone-{dom_uuid}" in gc.stdout, gc.stderr

    tpm_state.mkdir(mode=0o700)
    done = _incoming_setup(bin_dir, hostd, tpm_state)
    assert done.returncode == 0, done.stderr
    assert f"libvirt-{dom_uuid}" in _names(hostd)
    proc, _ = _start_swtpm(bin_dir, hostd, ctrl, tpm_state, log)
    try:
        results, client = _restore(ctrl, blobs)
        client.close()
        assert results[0] == 0x03  # TPM_BAD_PARAMETER, as QEMU reported it
    finally:
        _stop(bin_dir, ctrl, proc)
    refused = [line for line in log.read_text().splitlines()
               if '"libvirt.swtpm_state_refused"' in line]
    assert refused and "made new for this incoming domain" in refused[0], log.read_text()


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hostd, Hostd]]:
    """Two hostds under one sim root, in one fleet (tests/helpers/fleet.py)."""
    with fleet_of(tmp_path_factory.mktemp("lv-fleet"), 2) as (a, b):
        yield a, b


def test_a_save_on_one_host_restores_on_another_member_of_its_fleet(
    bin_dir: Path, two_hosts: tuple[Hostd, Hostd], tmp_path: Path
) -> None:
    """``virsh save`` on host A, ``virsh restore`` on host B, as libvirt runs the
    executables on each: B's ``swtpm_setup --overwrite`` (no --vmid) finds no VM of the
    directory and B in a fleet, and leaves it pending; B's ``swtpm socket`` makes the
    incoming VM under A's name (the domain's, from libvirt's ``--log file=``), which
    takes A's blobs; A's instance then refuses the VM."""
    a, b = two_hosts
    dom_uuid, name = str(uuid.uuid4()), "mover"
    vm = f"{name}-{dom_uuid}"
    state_a, state_b = (tmp_path / host / "swtpm" / dom_uuid / "tpm2" for host in "ab")
    log_a, log_b = (tmp_path / host / f"{name}-swtpm.log" for host in "ab")  # libvirt's names
    state_a.mkdir(parents=True, mode=0o700)
    assert _setup(bin_dir, a, state_a, log_a, vmid=f"{name}:{dom_uuid}").returncode == 0
    ctrl_a, ctrl_b = tmp_path / "a.sock", tmp_path / "b.sock"
    blobs, pcr = _save(bin_dir, a, ctrl_a, state_a, log_a)

    state_b.mkdir(parents=True, mode=0o700)  # libvirt on B makes the directory
    done = _incoming_setup(bin_dir, b, state_b)
    assert done.returncode == 0, done.stderr
    assert "an incoming domain from another member" in done.stderr
    marker = Marker.read(state_b)
    assert marker is not None and marker.pending_incoming and vm not in _names(b)
    _restores(bin_dir, b, ctrl_b, state_b, log_b, blobs, pcr)
    assert '"libvirt.incoming_created"' in log_b.read_text()
    marker = Marker.read(state_b)
    assert marker is not None and marker.vm == vm and not marker.pending_incoming
    assert vm_state(b, vm) == "running"

    # B's manager told A's: A's swtpm cannot start the VM's TPM any more.
    wait_vm_state(a, vm, "migrated")
    proc, _ = _start_swtpm(bin_dir, a, ctrl_a, state_a, log_a)
    try:
        client = CtrlClient(ctrl_a, short_errors=False)
        client.attach_data()
        assert client.request(CtrlRequest(CtrlCmd.INIT)).result != 0  # type: ignore[attr-defined]
        client.close()
    finally:
        _stop(bin_dir, ctrl_a, proc)


#: What the swtpm script must not import before its control socket is up: each
#: costs milliseconds (tens on a loaded host; libvirt waits one second in all).
HEAVY_BEFORE_BIND = ("argparse", "dataclasses", "typing", "socket", "signal", "contextlib",
                     "json", "re", "enum", "site", "sgxvtpm.endpoint.libvirt.run")


def test_swtpm_script_imports_only_the_bare_interpreter_before_binding(bin_dir: Path) -> None:
    """The script runs Python with -I -S (no site-packages scan, no .pth files) and
    swtpm.py, up to bind_ctrl, loads nothing heavy and nothing from site-packages."""
    text = (bin_dir / "swtpm").read_text()
    shebang, *lines = text.splitlines()
    assert shebang.split()[1:] == ["-IS"]
    head = lines[:next(i for i, line in enumerate(lines) if line.startswith("from "))]
    probe = "\n".join([*head, "import sgxvtpm.endpoint.libvirt.swtpm",
                       "print('\\n'.join(f'{n} {getattr(m, \"__file__\", None)}' "
                       "for n, m in sys.modules.items()))"])
    done = subprocess.run([shebang[2:].split()[0], "-IS", "-c", probe], capture_output=True,
                          text=True, timeout=60, check=True)
    loaded = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert "sgxvtpm.endpoint.libvirt.swtpm" in loaded
    assert [m for m in HEAVY_BEFORE_BIND if m in loaded] == []
    assert [n for n, f in loaded.items() if "site-packages" in f] == []
