"""Who can use a VM's TPM through ``sgxvtpm vm serve`` / ``vm attach`` sockets.

Real hostd, instance enclave and endpoint processes. The other local user is
a child process of this test that drops to uid/gid 65534 (nobody) and tries
a TPM2_GetRandom through the endpoint's socket. Unix sockets are the
endpoint user's alone by default (mode 0600), ``--mode``/``--owner``/
``--group`` open them to whom the operator names; TCP, where every local user
can connect, needs ``--allow-any-local-user`` and listens on loopback only.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.helpers.endpoint import free_port_pair, start_vm_endpoint
from tests.helpers.hostd import Hostd
from tests.helpers.sockets import recv_tpm_response
from tests.helpers.vmtools import create_vm, sgxvtpm_cli

from sgxvtpm.tpm import wire

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="drops to another uid: needs root"),
]
VM = "access-vm"
NOBODY = 65534


@pytest.fixture(scope="module")
def vm(sgx_hostd: Hostd) -> Hostd:
    create_vm(sgx_hostd, VM)
    return sgx_hostd


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's own are 0700), so that only the
    socket's own permissions decide who connects."""
    path = Path(tempfile.mkdtemp(prefix="sgxvtpm-access-"))
    path.chmod(0o711)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def get_random(connect: Callable[[socket.socket], None], family: int) -> str:
    """One TPM2_GetRandom(8): ``ok RC`` with the response code, or why it failed."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            connect(s)
            s.sendall(wire.get_random(8))
            return f"ok {wire.response_code(recv_tpm_response(s)):#x}"
    except PermissionError:
        return "denied"
    except OSError as exc:
        return f"failed {type(exc).__name__}"


def as_nobody(attempt: Callable[[], str]) -> str:
    """``attempt()`` run in a forked child with uid and gid 65534 and no groups."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its result goes through the pipe
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = attempt()
        except BaseException as exc:
            result = f"child error {type(exc).__name__}: {exc}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        out = pipe.read().decode()
    os.waitpid(pid, 0)
    return out


def connects(path: Path) -> str:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
        return "connected"
    except PermissionError:
        return "denied"


def unix_get_random(path: Path) -> str:
    return get_random(lambda s: s.connect(str(path)), socket.AF_UNIX)


def tcp_get_random(port: int) -> str:
    return get_random(lambda s: s.connect(("127.0.0.1", port)), socket.AF_INET)


def test_unix_sockets_are_the_owners_by_default(vm: Hostd, shared_dir: Path) -> None:
    sock = shared_dir / "tpm.sock"
    ep = start_vm_endpoint(vm.state, VM, "--swtpm", str(sock), log_dir=shared_dir)
    try:
        for path in (sock, Path(f"{sock}.ctrl")):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert unix_get_random(sock).startswith("ok ")  # the endpoint's own user
        assert as_nobody(lambda: unix_get_random(sock)) == "denied"
    finally:
        ep.stop()


def test_mode_owner_and_group_open_the_unix_sockets(vm: Hostd, shared_dir: Path) -> None:
    sock = shared_dir / "tpm.sock"
    ep = start_vm_endpoint(vm.state, VM, "--swtpm", str(sock), "--mode", "0666",
                           log_dir=shared_dir)
    try:
        assert stat.S_IMODE(os.stat(f"{sock}.ctrl").st_mode) == 0o666
        assert as_nobody(lambda: unix_get_random(sock)).startswith("ok ")  # a TPM answered
    finally:
        ep.stop()
    ctrl = shared_dir / "vtpm.ctrl"
    ep = start_vm_endpoint(vm.state, VM, "--ctrl", str(ctrl), "--owner", "nobody",
                           "--group", str(NOBODY), log_dir=shared_dir)
    try:
        made = os.stat(ctrl)
        assert (made.st_uid, made.st_gid, stat.S_IMODE(made.st_mode)) == (NOBODY, NOBODY, 0o600)
        assert as_nobody(lambda: connects(ctrl)) == "connected"
    finally:
        ep.stop()


@pytest.mark.parametrize("mode", ["--swtpm-tcp", "--mssim"])
def test_tcp_needs_the_explicit_flag(vm: Hostd, mode: str) -> None:
    port = free_port_pair()
    done = sgxvtpm_cli(vm.state, "vm", "serve", VM, mode, f"127.0.0.1:{port}", timeout=30)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--allow-any-local-user" in lines[0], done.stderr
    assert lines[0].startswith(f"sgxvtpm: error: {mode} lets every local user use")
    assert tcp_get_random(port) == "failed ConnectionRefusedError"


def test_tcp_listens_on_loopback_only(vm: Hostd) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.1", "example.org"):
        done = sgxvtpm_cli(vm.state, "vm", "serve", VM, "--mssim", f"{host}:{free_port_pair()}",
                           "--allow-any-local-user", timeout=30)
        assert done.returncode == 1, (host, done.stdout)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "loopback only" in lines[0], done.stderr


def test_with_the_flag_every_local_user_can_use_tcp(vm: Hostd, tmp_path: Path) -> None:
    help_text = sgxvtpm_cli(vm.state, "vm", "serve", "--help")
    assert "ANY local user" in " ".join(help_text.stdout.split())
    port = free_port_pair()
    ep = start_vm_endpoint(vm.state, VM, "--swtpm-tcp", f"127.0.0.1:{port}", log_dir=tmp_path)
    try:
        assert as_nobody(lambda: tcp_get_random(port)).startswith("ok ")  # what the flag accepts
    finally:
        ep.stop()
