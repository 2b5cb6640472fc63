"""The sim loader: zygote launch, attested identity, hardening, memory, restart."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from tests.helpers.echo_client import call, echo_spec

from sgxvtpm.platform import EnclaveSpec, PlatformError
from sgxvtpm.platform.sim import (
    SimEnclaveHandle,
    SimLoader,
    SimPlatformDir,
    identity_of_spec,
    measure_mrenclave,
    mrsigner_of,
)

pytestmark = pytest.mark.integration

def _spec(platform: SimPlatformDir, code: Path, config: bytes = b'{"x": 1}') -> EnclaveSpec:
    """The echo enclave, signed by the platform's vendor key."""
    return platform.sign(echo_spec(code, config))


def test_launched_enclave_quotes_its_measured_identity(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo_code: Path
) -> None:
    spec = _spec(sim_platform, echo_code)
    handle = sim_loader.launch(spec, {"vm": "vm1", "key": b"\x00\xff"})
    try:
        assert call(handle.stream, b"P") == b"pong"
        assert handle.identity.mrenclave == measure_mrenclave(spec)
        assert handle.identity == identity_of_spec(spec, sim_platform.signer_public_key)
        nonce = os.urandom(64)
        verified = sim_platform.verifier().verify(call(handle.stream, b"Q" + nonce))
        assert verified.identity == handle.identity
        assert verified.report_data == nonce
        assert verified.platform_id == sim_platform.platform_id
        assert call(handle.stream, b"C") == spec.config
        assert call(handle.stream, b"R") == sim_platform.root_certificate_pem
        assert json.loads(call(handle.stream, b"A")) == {"key": "00ff", "vm": "vm1"}
    finally:
        handle.stop()


def test_enclave_process_is_hardened(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo_code: Path
) -> None:
    handle = sim_loader.launch(_spec(sim_platform, echo_code), {})
    try:
        call(handle.stream, b"P")
        status = Path(f"/proc/{handle.pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["Name"].strip() == "enclave:echo"
        assert int(fields["PPid"]) == sim_loader.zygote_pid
        assert call(handle.stream, b"D") == b"0"  # prctl(PR_GET_DUMPABLE) inside
        assert _owner_of_proc_files(handle.pid) == 0  # seen from outside (trivial as root)
        limits = Path(f"/proc/{handle.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"]
        fds = sorted(int(fd) for fd in os.listdir(f"/proc/{handle.pid}/fd"))
        # stdio, the stream to the host and the ENCLU socket to the sim CPU
        sockets = [fd for fd in fds if fd > 2]
        assert fds[:3] == [0, 1, 2] and len(sockets) == 2
        links = [os.readlink(f"/proc/{handle.pid}/fd/{fd}") for fd in sockets]
        assert all(link.startswith("socket:") for link in links)
    finally:
        handle.stop()


def _owner_of_proc_files(pid: int) -> int:
    """/proc/PID/* of a non-dumpable process is owned by root (proc(5), PR_SET_DUMPABLE)."""
    return os.stat(f"/proc/{pid}/environ").st_uid


def test_stop_terminates_the_enclave(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo_code: Path
) -> None:
    handle = sim_loader.launch(_spec(sim_platform, echo_code), {})
    call(handle.stream, b"P")
    handle.stop(timeout=5)
    assert not Path(f"/proc/{handle.pid}").exists() or _is_zombie_or_gone(handle.pid)


def _is_zombie_or_gone(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            time.sleep(0.05)  # the zygote reaps within its 0.5 s tick
            continue
        return False
    return True


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _open_sockets(pid: int) -> set[str]:
    return {
        link
        for fd in os.listdir(f"/proc/{pid}/fd")
        if (link := os.readlink(f"/proc/{pid}/fd/{fd}")).startswith("socket:")
    }


def test_first_zygote_is_forked_from_the_cpu_before_it_reads_the_platform(
    sim_platform: SimPlatformDir, echo_code: Path
) -> None:
    # cpu_boot.py: the CPU process forks the zygote before it imports or reads
    # anything of the platform, so the two share the libraries' pages. (That
    # the zygote then holds no platform secret: test_security_platform.py.)
    with sim_platform.loader() as loader:
        cpu, zygote = loader.cpu_pid, loader.zygote_pid
        status = dict(
            line.split(":\t", 1) for line in Path(f"/proc/{zygote}/status").read_text().splitlines()
        )
        assert int(status["PPid"]) == cpu
        assert status["Name"] == "sgxvtpm-zygote"
        assert _cmdline(zygote) == _cmdline(cpu)  # a fork, no exec
        assert "sgxvtpm.platform.sim.cpu_boot" in _cmdline(cpu)
        # hostd's control socket is the CPU's alone: the zygote closed its copy.
        control_fd = _cmdline(cpu)[_cmdline(cpu).index("--control-fd") + 1]
        hostd_socket = os.readlink(f"/proc/{cpu}/fd/{control_fd}")
        assert hostd_socket not in _open_sockets(zygote)
        # and it launches measured enclaves: nothing it inherited is stale
        handle = loader.launch(_spec(sim_platform, echo_code), {})
        try:
            assert call(handle.stream, b"P") == b"pong"
            assert loader.zygote_pid == zygote
        finally:
            handle.stop()


def test_a_platform_that_cannot_open_ends_the_forked_zygote_quietly(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    platform = tmp_path / "platform"
    SimPlatformDir.open_or_create(platform)
    (platform / "fuse.key").write_bytes(b"short")
    with pytest.raises(PlatformError, match=r"fuse\.key is damaged"):
        SimLoader(platform)
    # The CPU ended the zygote it forked before it tried the platform (and
    # waited for it): the operator reads the one error, no traceback.
    assert "Traceback" not in capfd.readouterr().err


def test_zygote_is_restarted_after_it_dies(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo_code: Path
) -> None:
    survivor = sim_loader.launch(_spec(sim_platform, echo_code), {})
    old = sim_loader.zygote_pid
    os.kill(old, signal.SIGKILL)
    time.sleep(0.1)
    handle = sim_loader.launch(_spec(sim_platform, echo_code), {})
    try:
        assert sim_loader.zygote_pid != old
        # By now the CPU holds the platform's secrets: a new zygote is a new interpreter.
        assert "sgxvtpm.platform.sim.zygote" in _cmdline(sim_loader.zygote_pid)
        assert call(handle.stream, b"P") == b"pong"
        assert call(survivor.stream, b"P") == b"pong"  # running enclaves live on
    finally:
        handle.stop()
        survivor.stop()


def test_code_change_changes_identity_and_code_run(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo_code: Path, tmp_path: Path
) -> None:
    changed = tmp_path / "sim_echo_enclave.py"
    changed.write_bytes(echo_code.read_bytes().replace(b'b"pong"', b'b"PONG"'))
    spec = _spec(sim_platform, changed)
    handle = sim_loader.launch(spec, {})
    try:
        assert handle.identity.mrenclave != measure_mrenclave(_spec(sim_platform, echo_code))
        assert handle.identity.mrsigner == mrsigner_of(sim_platform.signer_public_key)
        assert call(handle.stream, b"P") == b"PONG"
        quote = call(handle.stream, b"Q" + bytes(64))
        assert sim_platform.verifier().verify(quote).identity.mrenclave == measure_mrenclave(spec)
    finally:
        handle.stop()


def test_bad_entry_fails_cleanly(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo_code: Path
) -> None:
    spec = sim_platform.sign(
        EnclaveSpec("bad", "no_colon", [echo_code], config=b"", isv_prod_id=1, isv_svn=1)
    )
    with pytest.raises(PlatformError):
        sim_loader.launch(spec, {})


def test_idle_enclave_memory(
    sim_platform: SimPlatformDir,
    sim_loader: SimLoader,
    echo_code: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """PSS of idle enclaves (goal <= 11 MB each); reported with -rA (and -s).

    A lone enclave's PSS carries half of every page it shares with the zygote;
    since every enclave verifies its peers with dcap-qvl (platform/dcap.py), the
    zygote preloads that verifier too, and a lone enclave is allowed 12 MiB (with
    four, each is about 7 MiB: the 11 MiB goal holds)."""
    handles = [sim_loader.launch(_spec(sim_platform, echo_code), {})]
    try:
        assert call(handles[0].stream, b"P") == b"pong"
        time.sleep(0.2)
        alone = _pss_kib(handles[0].pid)
        handles += [sim_loader.launch(_spec(sim_platform, echo_code), {}) for _ in range(3)]
        for h in handles:
            assert call(h.stream, b"P") == b"pong"
        time.sleep(0.2)
        pss = [_pss_kib(h.pid) for h in handles]
        rss = [_rss_kib(h.pid) for h in handles]
        zygote = _pss_kib(sim_loader.zygote_pid)
        report = (
            f"idle enclave PSS: {alone} KiB as the only enclave; {pss} KiB with 4 "
            f"(RSS {rss} KiB); zygote PSS {zygote} KiB"
        )
        record_property("idle_enclave_memory", report)
        print("\n" + report)
        assert alone <= 12 * 1024
        assert all(p <= 11 * 1024 for p in pss)
    finally:
        for h in handles:
            h.stop()


def test_neither_the_cpu_nor_the_zygote_keeps_a_launch(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo_code: Path, tmp_path: Path
) -> None:
    """The sim CPU and the zygote free a launch's code once they answered (not
    when the next request replaces it): 32 MiB of measured code do not stay in
    their memory."""
    big = 32 * 1024 * 1024
    padding = tmp_path / "padding.py"
    padding.write_bytes(b"#" * big)
    spec = sim_platform.sign(replace(echo_spec(echo_code), code_files=[echo_code, padding]))
    handles = [sim_loader.launch(_spec(sim_platform, echo_code), {})]  # the first launch's growth
    try:
        pids = {"the CPU": sim_loader.cpu_pid, "the zygote": sim_loader.zygote_pid}
        before = {name: _rss_kib(pid) for name, pid in pids.items()}
        handles.append(sim_loader.launch(spec, {}))
        assert call(handles[1].stream, b"P") == b"pong"
        for name, pid in pids.items():
            grown = (_rss_kib(pid) - before[name]) * 1024
            assert grown < big // 4, f"{name} grew by {grown} bytes: it still holds the launch"
    finally:
        for h in handles:
            h.stop()


def _pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError("no Pss line")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def _package_copy(tmp_path: Path, change: bytes = b"") -> list[Path]:
    """A copy of the installed sgxvtpm/__init__.py, as a measured file of package sgxvtpm."""
    import sgxvtpm

    root = tmp_path / "copy" / "sgxvtpm"
    root.mkdir(parents=True)
    init = root / "__init__.py"
    init.write_bytes(Path(sgxvtpm.__file__).read_bytes() + change)
    return [init]


def test_other_bytes_for_a_preloaded_module_never_run(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo_code: Path, tmp_path: Path
) -> None:
    """The zygote pre-imported sgxvtpm; an enclave measuring other bytes for it is refused."""
    spec = _spec(sim_platform, echo_code)
    changed = sim_platform.sign(
        EnclaveSpec(
            spec.name, spec.entry, [echo_code, *_package_copy(tmp_path, b"X = 1\n")], b"", 7, 3
        )
    )
    with pytest.raises(PlatformError, match="stale"):
        sim_loader.launch(changed, {})


def test_preloaded_modules_of_a_measured_package_must_be_measured(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo_code: Path, tmp_path: Path
) -> None:
    """Measuring sgxvtpm/__init__.py alone leaves the zygote's other sgxvtpm modules unmeasured."""
    code = [echo_code, *_package_copy(tmp_path)]
    spec = sim_platform.sign(EnclaveSpec("echo", "sim_echo_enclave:main", code, b"", 7, 3))
    with pytest.raises(PlatformError, match="stale"):
        sim_loader.launch(spec, {})


def _mapped_inodes(pid: int, name: str) -> set[tuple[str, int]]:
    """(device, inode) of every mapping of ``pid`` whose path contains ``name``."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and name in fields[5]:
            found.add((fields[3], int(fields[4])))
    return found


def test_enclaves_measuring_the_same_library_map_one_sealed_copy(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo_code: Path, tmp_path: Path
) -> None:
    """The zygote stages a measured library once; enclaves with the same bytes share it,
    one whose bytes differ gets a private copy (and still maps exactly its own bytes)."""
    from sgxvtpm.enclaves.specs import libtpms_path

    real = libtpms_path().read_bytes()
    same, other = tmp_path / "same", tmp_path / "other"
    for directory, data in ((same, real), (other, real + b"\0other release")):
        directory.mkdir()
        (directory / "libtpms.so.0").write_bytes(data)

    def launch(library: Path) -> SimEnclaveHandle:
        spec = sim_platform.sign(
            EnclaveSpec("echo", "sim_echo_enclave:main", [echo_code, library], b"", 7, 3)
        )
        handle = sim_loader.launch(spec, {})
        assert call(handle.stream, b"Llibtpms").startswith(b"/proc/self/fd/")
        return handle

    handles = [launch(same / "libtpms.so.0") for _ in range(2)]
    try:
        handles.append(launch(other / "libtpms.so.0"))
        first, second, third = (_mapped_inodes(h.pid, "/memfd:libtpms") for h in handles)
        assert len(first) == 1, first
        assert first == second
        assert third and third.isdisjoint(first)
        # What each maps is what it measured, read back through its own fd.
        for h, data in zip(handles, (real, real, real + b"\0other release"), strict=True):
            fds = [
                fd for fd in os.listdir(f"/proc/{h.pid}/fd")
                if os.readlink(f"/proc/{h.pid}/fd/{fd}").startswith("/memfd:libtpms")
            ]
            assert len(fds) == 1
            assert Path(f"/proc/{h.pid}/fd/{fds[0]}").read_bytes() == data
    finally:
        for h in handles:
            h.stop()
