"""The command lines libvirt gives swtpm and swtpm_setup (endpoint/libvirt/options.py, config.py).

Pure parsing: the argument lists are the ones libvirt 9.0 builds
(src/qemu/qemu_tpm.c), and older libvirt's ``--daemon --pid file=``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgxvtpm.enclaves.registry import check_vm_name
from sgxvtpm.endpoint.libvirt.config import ConfigError, Marker, locate, parse_conf
from sgxvtpm.endpoint.libvirt.options import (
    SETUP_FEATURES,
    SWTPM_FEATURES,
    OptionError,
    capabilities,
    parse_opts,
    parse_setup,
    parse_swtpm,
    vm_name,
)
from sgxvtpm.endpoint.libvirt.setup import SetupError, libvirt_domain

UUID = "9a3c1a8e-52a4-4a8e-bd0e-6f6d1f1c2b3a"
LIBVIRT9_SOCKET = [
    "--ctrl", "type=unixio,path=/run/libvirt/qemu/swtpm/1-dom-swtpm.sock,mode=0600",
    "--tpmstate", f"dir=/var/lib/libvirt/swtpm/{UUID}/tpm2,mode=0600",
    "--log", "file=/var/log/swtpm/libvirt/qemu/dom-swtpm.log",
    "--terminate", "--tpm2",
]  # fmt: skip
LIBVIRT9_SETUP = [
    "--tpm2", "--tpm-state", f"/var/lib/libvirt/swtpm/{UUID}/tpm2", "--vmid", f"dom:{UUID}",
    "--logfile", "/var/log/swtpm/libvirt/qemu/dom-swtpm.log", "--createek",
    "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite",
]  # fmt: skip


def test_libvirt9_swtpm_socket_line() -> None:
    a = parse_swtpm(LIBVIRT9_SOCKET)
    assert a.ctrl_path == "/run/libvirt/qemu/swtpm/1-dom-swtpm.sock"
    assert a.ctrl_mode == 0o600 and (a.ctrl_uid, a.ctrl_gid) == (-1, -1)
    assert a.tpmstate_dir == f"/var/lib/libvirt/swtpm/{UUID}/tpm2"
    assert a.log_file == "/var/log/swtpm/libvirt/qemu/dom-swtpm.log"
    assert a.terminate and not a.daemon and a.pid_file is None and a.password_fds == ()


def test_older_libvirt_daemon_and_pid_file() -> None:
    a = parse_swtpm(["--daemon", *LIBVIRT9_SOCKET, "--pid", "file=/run/x-swtpm.pid"])
    assert a.daemon and a.pid_file == "/run/x-swtpm.pid"


BASE_SOCKET = [*LIBVIRT9_SOCKET[:4], "--tpm2"]  # --ctrl and --tpmstate, no --log


@pytest.mark.parametrize(
    ("extra", "log", "pid"),
    [
        ([], (None, None, 0), (None, None)),
        (["--log", "fd=5,level=20"], (None, 5, 20), (None, None)),
        (["--log", "file=/l,level="], ("/l", None, 0), (None, None)),
        (["--log", "file=,fd=3,prefix=x,truncate"], (None, 3, 0), (None, None)),
        (["--pid", "fd=7"], (None, None, 0), (None, 7)),
        (["--pid", "file=/p,fd=8", "--log", "file=/l"], ("/l", None, 0), ("/p", 8)),
    ],
)
def test_log_and_pid_take_a_file_or_a_descriptor(
    extra: list[str], log: tuple[object, ...], pid: tuple[object, ...]
) -> None:
    a = parse_swtpm([*BASE_SOCKET, *extra])
    assert (a.log_file, a.log_fd, a.log_level) == log
    assert (a.pid_file, a.pid_fd) == pid


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--log", "fd=x"], "--log fd: expected a file descriptor number, got 'x'"),
        (["--log", "level=loud"], "--log level: expected a file descriptor number, got 'loud'"),
        (["--log", "mode=0600"], "--log: unknown parameter 'mode'"),
        (["--pid", "fd=-1"], "--pid fd: expected a file descriptor number, got '-1'"),
        (["--pid", "level=1"], "--pid: unknown parameter 'level'"),
        (["--pid", "bad", "--log", "fd=x,level=y"], "--log fd: "),  # --log is read first
        (["--log", "level=y", "--key", "pwdfd=z"], "--log level: "),
        (["--pid", "fd=p", "--key", "pwdfd=z"], "--pid fd: "),
    ],
)
def test_log_and_pid_errors_name_the_option(extra: list[str], says: str) -> None:
    with pytest.raises(OptionError) as caught:
        parse_swtpm([*BASE_SOCKET, *extra])
    assert str(caught.value).startswith(says)


def test_password_descriptors_of_key_and_migration_key() -> None:
    a = parse_swtpm([*LIBVIRT9_SOCKET, "--key", "pwdfd=7,mode=aes-256-cbc",
                     "--migration-key", "pwdfd=9,mode=aes-256-cbc"])
    assert a.password_fds == (7, 9)


def test_ctrl_owner_group_and_mode() -> None:
    a = parse_swtpm(["--tpm2", "--ctrl", "type=unixio,path=/s,mode=0660,uid=64055,gid=102",
                     "--tpmstate", "dir=/d"])
    assert (a.ctrl_mode, a.ctrl_uid, a.ctrl_gid) == (0o660, 64055, 102)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--ctrl", "type=unixio,path=/s", "--tpmstate", "dir=/d"], "--tpm2"),
        (["--tpm2", "--tpmstate", "dir=/d"], "--ctrl"),
        (["--tpm2", "--ctrl", "type=tcp", "--tpmstate", "dir=/d"], "unixio"),
        (["--tpm2", "--ctrl", "type=unixio,path=/s,colour=red", "--tpmstate", "dir=/d"],
         "colour"),
        (["--tpm2", "--ctrl", "type=unixio,path=/s,mode=9", "--tpmstate", "dir=/d"], "octal"),
        (["--tpm2", "--ctrl", "type=unixio,path=/s"], "--tpmstate"),
        (["--tpm2", "--ctrl", "type=unixio,path=/s", "--tpmstate", "dir=/d", "--bogus"],
         "--bogus"),
        (["--tpm2", "--ctrl", "type=unixio,path=/s", "--tpmstate", "dir=/d",
          "--key", "pwdfd=x"], "descriptor"),
    ],
)
def test_bad_swtpm_lines_name_the_option(argv: list[str], words: str) -> None:
    with pytest.raises(OptionError, match=words):
        parse_swtpm(argv)


def test_capabilities_are_the_json_libvirt_reads() -> None:
    assert parse_swtpm(["--print-capabilities"]).print_capabilities
    assert parse_setup(["--print-capabilities"]).print_capabilities
    for kind, features in (("swtpm", SWTPM_FEATURES), ("swtpm_setup", SETUP_FEATURES)):
        obj = json.loads(capabilities(kind, features))
        assert obj["type"] == kind and "tpm-2.0" in obj["features"]


def test_libvirt9_swtpm_setup_line() -> None:
    a = parse_setup(LIBVIRT9_SETUP)
    assert a.tpm_state == f"/var/lib/libvirt/swtpm/{UUID}/tpm2"
    assert a.vmid == f"dom:{UUID}" and a.not_overwrite and not a.overwrite
    assert a.ek == "rsa2048" and a.pcr_banks == () and not a.reconfigure


def test_setup_incoming_migration_pcr_banks_and_passwords() -> None:
    a = parse_setup(["--tpm2", "--tpm-state", "/d", "--overwrite", "--pcr-banks",
                     "sha256,sha384", "--pwdfile-fd", "5", "--cipher", "aes-256-cbc", "--ecc"])
    assert a.overwrite and a.pcr_banks == ("sha256", "sha384")
    assert a.password_fds == (5,) and a.ek == "ecc-p256"
    assert parse_setup(["--tpm2", "--tpm-state", "/d", "--rsa-keysize", "3072"]).ek == "rsa3072"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--tpm-state", "/d"], "--tpm2"),
        (["--tpm2"], "--tpm-state"),
        (["--tpm2", "--tpm-state", "/d", "--overwrite", "--not-overwrite"], "exclude"),
        (["--tpm2", "--tpm-state", "/d", "--reconfigure"], "--pcr-banks"),
        (["--tpm2", "--tpm-state", "/d", "--rsa-keysize", "1024"], "2048 or 3072"),
        (["--tpm2", "--tpm-state", "/d", "--take-ownership"], "take-ownership"),
    ],
)
def test_bad_setup_lines_name_the_option(argv: list[str], words: str) -> None:
    with pytest.raises(OptionError, match=words):
        parse_setup(argv)


def test_vm_name_from_vmid() -> None:
    assert vm_name(f"dom:{UUID}", "/x") == f"dom-{UUID}"
    # libvirt's names may hold any character; ours may not.
    assert vm_name(f"my vm/é:{UUID.upper()}", "/x") == f"my_vm__-{UUID}"
    assert vm_name(f"-.:{UUID}", "/x") == f"libvirt-{UUID}"
    long = vm_name(f"{'a' * 100}:{UUID}", "/x")
    assert len(long) == 61 and long.endswith(UUID)


def test_vm_name_without_vmid_is_the_domain_uuid_of_libvirts_path() -> None:
    assert vm_name("", f"/var/lib/libvirt/swtpm/{UUID}/tpm2") == f"libvirt-{UUID}"
    with pytest.raises(OptionError):
        vm_name("", "/no/uuid/here")


@given(st.text(max_size=200), st.sampled_from([UUID, "", "not-a-uuid"]))
def test_vm_name_is_always_a_valid_vm_name_or_refused(name: str, uuid: str) -> None:
    try:
        got = vm_name(f"{name}:{uuid}" if uuid else name, "/var/lib/libvirt/swtpm")
    except OptionError:
        return
    assert check_vm_name(got) == got


def test_parse_opts_bare_words_and_unknown_keys() -> None:
    assert parse_opts("--flags", "not-need-init,startup-clear",
                      ("not-need-init", "startup-clear")) == {
        "not-need-init": "", "startup-clear": ""}
    with pytest.raises(OptionError, match="'x'"):
        parse_opts("--log", "x=1", ("file",))


def test_conf_file_lines() -> None:
    text = "# sgxvtpm\nstate_dir = /var/lib/sgxvtpm\n\ncredentials=/etc/sgxvtpm/op  # op\n"
    assert parse_conf(text, "f") == {"state_dir": "/var/lib/sgxvtpm",
                                     "credentials": "/etc/sgxvtpm/op"}
    with pytest.raises(ConfigError, match="f:1"):
        parse_conf("statedir = /x\n", "f")


def test_environment_wins_over_the_conf_file(tmp_path: Path) -> None:
    conf = tmp_path / "sgxvtpm.conf"
    conf.write_text("state_dir = /from/conf\ncredentials = /conf/creds\n")
    env = {"SGXVTPM_CONF": str(conf)}
    assert locate(env).state_dir == "/from/conf"
    assert locate({**env, "SGXVTPM_STATE_DIR": "/from/env"}).state_dir == "/from/env"
    assert locate({**env, "SGXVTPM_CONFIG_DIR": "/env/creds"}).credentials == "/env/creds"
    with pytest.raises(ConfigError, match="no such file"):
        locate({"SGXVTPM_CONF": str(conf) + ".missing"})


def test_marker_round_trip_and_garbage(tmp_path: Path) -> None:
    assert Marker.read(tmp_path) is None
    (tmp_path / "sgxvtpm.json").write_text(Marker("vm1", "/var/lib/sgxvtpm").dumps())
    assert Marker.read(tmp_path) == Marker("vm1", "/var/lib/sgxvtpm")
    (tmp_path / "sgxvtpm.json").write_text("[1]")
    with pytest.raises(ConfigError):
        Marker.read(tmp_path)


def test_marker_flags_round_trip(tmp_path: Path) -> None:
    for marker in (Marker("", "/s", pending_incoming=True), Marker("vm1", "/s", incoming_new=True),
                   Marker("vm1", "/s", fleet_incoming=True)):
        (tmp_path / "sgxvtpm.json").write_text(marker.dumps())
        assert Marker.read(tmp_path) == marker


@given(st.text(min_size=1, max_size=80).filter(lambda n: "/" not in n and "\0" not in n),
       st.uuids())
def test_the_incoming_vm_is_named_as_on_the_source(domain: str, uuid: object) -> None:
    """B's swtpm socket names the VM from libvirt's log path and the UUID of its TPM
    state directory; A's swtpm_setup named it from --vmid NAME:UUID: the same name
    (the VM's fleet key and its blobs are bound to it)."""
    tpm_state = f"/var/lib/libvirt/swtpm/{uuid}/tpm2"
    on_a = vm_name(f"{domain}:{uuid}", tpm_state)
    on_b = vm_name(libvirt_domain(f"/var/log/swtpm/libvirt/qemu/{domain}-swtpm.log"), tpm_state)
    assert on_b == on_a


@pytest.mark.parametrize("log_file", [None, "/var/log/swtpm.log", "/x/-swtpm.log", "/x/dom.log"])
def test_an_incoming_domain_without_libvirts_log_name_is_refused(log_file: str | None) -> None:
    with pytest.raises(SetupError, match=r"DOMAIN-swtpm\.log"):
        libvirt_domain(log_file)
