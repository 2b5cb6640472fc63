"""What runs in an enclave is what was measured (SECURITY.md properties 1, 2 and 4).

Attacks, as a host that starts hostd could mount them: plant a module next to
hostd (its cwd), point PYTHONPATH at a modified copy of the package, point
LD_LIBRARY_PATH at a forwarding libtpms. None of them may put unmeasured code
into an enclave under a genuine MRENCLAVE.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from tests.helpers.hostd import Hostd, wait_ready
from tests.helpers.processes import stop_process

from sgxvtpm.enclaves import specs
from sgxvtpm.platform import platform_kind
from sgxvtpm.platform.sim.measure import read_code, relative_name
from sgxvtpm.vmm.client import VmmClient, VmmError

pytestmark = pytest.mark.integration

PAYLOAD = """
def _sgxvtpm_payload():
    import os
    try:
        with open("/proc/self/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = "?"
    with open({marker!r}, "a") as f:
        f.write(comm + "\\n")
_sgxvtpm_payload()
"""


def _enclave_lines(marker: Path) -> list[str]:
    if not marker.exists():
        return []
    return [line for line in marker.read_text().splitlines() if line.startswith("enclave:")]


@pytest.mark.parametrize("kind", ["manager", "instance"])
def test_every_module_an_enclave_imports_is_measured(kind: str) -> None:
    """A fresh interpreter imports the bootstrap and the entry: all of it is in MRENCLAVE."""
    sim = platform_kind("sim")
    spec = specs.manager_spec(sim) if kind == "manager" else specs.instance_spec(sim)
    measured = {f.name for f in read_code(spec.code_files)}
    entry_module = spec.entry.partition(":")[0]
    script = (
        "import importlib, json, sys\n"
        f"for name in {sim.enclave_bootstrap!r}: importlib.import_module(name)\n"
        f"importlib.import_module({entry_module!r})\n"
        "print(json.dumps({n: getattr(m, '__file__', None) for n, m in sys.modules.items()"
        " if n.split('.')[0] == 'sgxvtpm'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    assert len(loaded) > 20
    unmeasured = sorted(
        name for name, path in loaded.items() if relative_name(Path(path)) not in measured
    )
    assert unmeasured == []
    host_side = ("sgxvtpm/host/", "sgxvtpm/vmm/", "sgxvtpm/endpoint/", "sgxvtpm/cli.py")
    assert not [name for name in measured if name.startswith(host_side)]


def test_enclave_code_importing_host_code_is_refused(tmp_path: Path) -> None:
    """The allow-list is computed, not declared: an enclave module importing hostd fails it."""
    with pytest.raises(specs.EnclaveCodeError, match="host-side code"):
        specs.import_closure(["sgxvtpm.host.hostd"])


def _instance_pid(h: Hostd, name: str) -> int:
    pid = asyncio.run(VmmClient(h.state).show(name)).pid
    assert pid is not None, name
    return pid


def test_libtpms_is_mapped_from_its_measured_bytes(hostd: Hostd) -> None:
    """The instance maps libtpms from a sealed in-memory copy, never from a host path."""
    asyncio.run(VmmClient(hostd.state).create("vm1"))
    pid = _instance_pid(hostd, "vm1")
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    tpms = {line.split(maxsplit=5)[5] for line in maps if "libtpms" in line}
    assert tpms and all(path.startswith("/memfd:libtpms") for path in tpms), tpms
    # Every other shared object is the interpreter's runtime: system libraries
    # and the installed Python packages, never something from the host's cwd
    # or state directory.
    runtime = (
        "/usr/lib/",
        "/lib/",
        "/usr/lib64/",
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        sys.base_prefix,
    )
    objects = {
        line.split(maxsplit=5)[5]
        for line in maps
        if len(line.split(maxsplit=5)) == 6 and ".so" in line and "libtpms" not in line
    }
    assert objects
    assert [o for o in objects if not o.startswith(runtime)] == []


def _libtpms_mappings(pid: int) -> set[tuple[str, str, str]]:
    """(device, inode, path) of each of ``pid``'s libtpms mappings."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and "libtpms" in fields[5]:
            found.add((fields[3], fields[4], fields[5]))
    return found


def test_idle_instances_share_one_sealed_libtpms(hostd: Hostd) -> None:
    """Instances of one release map the same sealed copy of libtpms (the zygote's), so its
    pages count once for all of them, and that copy holds exactly the measured bytes."""
    sim = platform_kind("sim")
    (measured_lib,) = [f for f in read_code(specs.instance_spec(sim).code_files)
                       if f.module_name is None]
    for name in ("vm1", "vm2"):
        asyncio.run(VmmClient(hostd.state).create(name))
    first, second = (_libtpms_mappings(_instance_pid(hostd, n)) for n in ("vm1", "vm2"))
    assert len({(dev, ino) for dev, ino, _ in first}) == 1, first
    assert first == second
    (path,) = {p for _, _, p in first}
    assert path.startswith("/memfd:libtpms")
    pid = _instance_pid(hostd, "vm1")
    held = [fd for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path]
    assert len(held) == 1
    assert Path(f"/proc/{pid}/fd/{held[0]}").read_bytes() == measured_lib.data


def _start_hostd(
    state: Path, *, cwd: Path, env: dict[str, str], argv0: list[str]
) -> subprocess.Popen[bytes]:
    log = open(state.parent / "hostd.log", "ab")  # noqa: SIM115 - kept for the process's life
    proc = subprocess.Popen(
        [*argv0, "hostd", "--state-dir", str(state)],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return proc


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "sgxvtpm"
    assert script.exists(), "the sgxvtpm console script is installed with the package"
    return [str(script)]


def test_modules_planted_in_hostds_cwd_never_run(tmp_path: Path) -> None:
    """hostd run from a directory holding argparse.py, json.py, ...: none of them is imported."""
    planted = tmp_path / "cwd"
    planted.mkdir()
    marker = tmp_path / "marker"
    for name in ("argparse", "json", "socket", "struct", "ctypes", "hashlib", "sgxvtpm"):
        target = planted / f"{name}.py"
        if name == "sgxvtpm":
            (planted / "sgxvtpm").mkdir()
            target = planted / "sgxvtpm" / "__init__.py"
        target.write_text(PAYLOAD.format(marker=str(marker)))
    state = tmp_path / "state"
    proc = _start_hostd(state, cwd=planted, env=dict(os.environ), argv0=_console_script())
    try:
        wait_ready(state / "hostd.sock", 60, proc)
        asyncio.run(VmmClient(Hostd(state).state).create("vm1"))
    finally:
        stop_process(proc, timeout=30, group=True)
    assert not marker.exists(), marker.read_text()


def test_modified_package_on_pythonpath_gets_no_enclave(tmp_path: Path) -> None:
    """hostd started with PYTHONPATH at a copy whose every module carries a payload.

    hostd itself runs the copy (the host is untrusted anyway), but no enclave
    does: the platform signs only the installed release, so the copy's
    enclaves fail EINIT, and the payload never runs inside an enclave.
    """
    import sgxvtpm

    copy = tmp_path / "copy"
    shutil.copytree(Path(sgxvtpm.__file__).parent, copy / "sgxvtpm")
    marker = tmp_path / "marker"
    for module in (copy / "sgxvtpm").rglob("*.py"):
        module.write_text(module.read_text() + PAYLOAD.format(marker=str(marker)))
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(copy)}
    argv0 = [sys.executable, "-m", "sgxvtpm.cli"]
    proc = _start_hostd(state, cwd=tmp_path, env=env, argv0=argv0)
    try:
        try:
            wait_ready(state / "hostd.sock", 30, proc)
        except (RuntimeError, TimeoutError):
            pass  # refusing to start is the expected outcome
        else:
            with pytest.raises(VmmError):
                asyncio.run(VmmClient(Hostd(state).state).create("vm1"))
    finally:
        stop_process(proc, timeout=30, group=True)
    assert marker.exists(), "the copy ran in hostd (the test's premise)"
    assert _enclave_lines(marker) == []


FORWARDER = r"""
#include <stdio.h>
__attribute__((constructor)) static void sgxvtpm_forwarder(void) {
    FILE *f = fopen(MARKER, "a");
    if (f) { fputs("loaded\n", f); fclose(f); }
}
"""


def test_libtpms_on_ld_library_path_is_not_loaded(tmp_path: Path) -> None:
    """A libtpms.so.0 planted through LD_LIBRARY_PATH never enters an instance."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed (scripts/install.sh installs it)")
    fake = tmp_path / "lib"
    fake.mkdir()
    marker = tmp_path / "marker"
    source = tmp_path / "forwarder.c"
    source.write_text(FORWARDER)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(fake / "libtpms.so.0"),
         str(source)],
        check=True,
    )
    state = tmp_path / "state"
    env = {**os.environ, "LD_LIBRARY_PATH": str(fake)}
    proc = _start_hostd(
        state, cwd=tmp_path, env=env, argv0=[sys.executable, "-m", "sgxvtpm.cli"]
    )
    try:
        wait_ready(state / "hostd.sock", 60, proc)
        info = asyncio.run(VmmClient(Hostd(state).state).create("vm1"))
        assert info.state == "running"
    finally:
        stop_process(proc, timeout=30, group=True)
    assert not marker.exists()
