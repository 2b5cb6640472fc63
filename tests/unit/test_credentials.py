"""The client credentials directory (sgxvtpm/vmm/credentials.py) and hostd's --user.

Where the directory is, that it and its keys are private, that two hosts'
credentials never mix, that a host's attestation root is pinned once and a
different one is refused, and that handing the state directory to --user
cannot be steered outside it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.channel.evidence import build_self_signed
from sgxvtpm.host.hostd import HostdError, RunAs, _hand_over
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.vmm.credentials import ENV, Credentials, CredentialsError, default_credentials_dir
from sgxvtpm.wire.k1 import InstanceInfo


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def root_pem(cn: str) -> bytes:
    cert = build_self_signed(ec.generate_private_key(ec.SECP256R1()), cn, is_ca=True)
    return cert.public_bytes(serialization.Encoding.PEM)


# ------------------------------------------------------------------ where it is


def test_directory_from_env_then_xdg_then_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV, str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_credentials_dir() == tmp_path / "explicit"
    monkeypatch.delenv(ENV)
    assert default_credentials_dir() == tmp_path / "xdg" / "sgxvtpm"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert default_credentials_dir() == tmp_path / "home" / ".config" / "sgxvtpm"
    assert Credentials.at(tmp_path / "flag").root == tmp_path / "flag"


def test_operator_identity_is_private_and_created_once(tmp_path: Path) -> None:
    loose = tmp_path / "creds"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    creds = Credentials(loose)
    first = creds.operator_certificate()
    assert mode(loose) == 0o700
    assert mode(creds.operator_key) == 0o600
    assert creds.operator_certificate() == first
    assert creds.operator().cert_pem == first


def test_a_certificate_alone_is_enough_for_hostd(tmp_path: Path) -> None:
    creds = Credentials(tmp_path / "creds")
    creds.root.mkdir(mode=0o700)
    cert = root_pem("operator")
    creds.operator_cert.write_bytes(cert)
    assert creds.operator_certificate() == cert
    assert not creds.operator_key.exists()  # no identity was made up next to it


def test_missing_operator_identity_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="no usable operator identity in"):
        Credentials(tmp_path / "empty").operator()
    creds = Credentials(tmp_path / "key-only")
    creds.root.mkdir(mode=0o700)
    creds.operator_key.write_bytes(b"a key without its certificate")
    with pytest.raises(CredentialsError, match=r"has no certificate operator\.crt next to it"):
        creds.operator_certificate()


# ------------------------------------------------------------------ hosts


def test_hosts_are_keyed_by_their_state_directory(tmp_path: Path) -> None:
    creds = Credentials(tmp_path / "creds")
    a = creds.host(StateDir(tmp_path / "a"))
    b = creds.host(StateDir(tmp_path / "b"))
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert a.vm("vm1") != b.vm("vm1")
    assert creds.host(StateDir(tmp_path / "link")).root == a.root
    a.ensure()
    assert (a.root / "state_dir").read_text().strip() == str(tmp_path / "a")
    assert all(mode(d) == 0o700 for d in (creds.root, a.root.parent, a.root))


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x"])
def test_vm_names_stay_inside_the_host_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(CredentialsError, match="one path component"):
        Credentials(tmp_path).host(StateDir(tmp_path / "s")).vm(name)


def test_binding_key_is_0600_even_over_a_looser_old_file(tmp_path: Path) -> None:
    host = Credentials(tmp_path / "creds").host(StateDir(tmp_path / "s"))
    host.ensure()
    old = host.vm("vm1")
    old.mkdir(parents=True)
    (old / "vm.key").write_bytes(b"stale")
    (old / "vm.key").chmod(0o644)
    cert = root_pem("vm")
    directory = host.write_binding(
        "vm1", key=ec.generate_private_key(ec.SECP256R1()), vm_cert_pem=cert.decode(),
        ca_cert_pem=cert.decode(), instance=InstanceInfo("vm1", "0" * 32),
    )
    assert mode(directory / "vm.key") == 0o600
    assert b"PRIVATE KEY" in (directory / "vm.key").read_bytes()
    host.remove_binding("vm1")
    assert not directory.exists()


# ------------------------------------------------------------------ the pinned root


def test_root_is_pinned_once_and_a_different_one_is_refused(tmp_path: Path) -> None:
    host = Credentials(tmp_path / "creds").host(StateDir(tmp_path / "s"))
    first, second = root_pem("first"), root_pem("second")
    host.pin(first)
    host.pin(first)  # the same root again: nothing changes
    with pytest.raises(CredentialsError) as refused:
        host.pin(second)
    message = str(refused.value)
    assert "another platform attestation root" in message
    assert f"remove {host.root_ca}" in message
    assert "\n" not in message
    assert host.root_ca.read_bytes() == first


def test_without_hostd_the_pin_is_used_and_nothing_is_trusted_without_one(
    tmp_path: Path,
) -> None:
    host = Credentials(tmp_path / "creds").host(StateDir(tmp_path / "no-hostd"))
    with pytest.raises(CredentialsError, match="cannot reach hostd"):
        host.attestation_root()
    pinned = root_pem("pinned")
    host.pin(pinned)
    assert host.attestation_root() == pinned


# ------------------------------------------------------------------ hostd --user


def test_run_as_names_an_unprivileged_user() -> None:
    nobody = RunAs.parse("nobody")
    assert (nobody.uid, nobody.user) == (65534, "nobody")
    assert RunAs.parse("nobody:nogroup").gid == 65534
    assert RunAs.parse("65534:65534").user == "nobody"
    with pytest.raises(HostdError, match="no such user 'no-such-user-x'"):
        RunAs.parse("no-such-user-x")
    with pytest.raises(HostdError, match="no such group"):
        RunAs.parse("nobody:no-such-group-x")
    with pytest.raises(HostdError, match="not root"):
        RunAs.parse("root")
    with pytest.raises(HostdError, match="not root"):
        RunAs.parse("nobody:root")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_handing_the_state_over_follows_no_link_out_of_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's")
    state = StateDir(tmp_path / "state")
    state.ensure()
    state.platform.mkdir()
    (state.platform / "fuse.key").write_bytes(bytes(32))
    instance = state.root / "instances" / ("ab" * 16)
    instance.mkdir()
    (instance / "state.sealed").write_bytes(b"sealed")
    (instance / "planted").symlink_to(victim)
    os.link(victim, state.root / "manager" / "hardlink")
    (state.root / "manager" / "dir-link").symlink_to(tmp_path)

    nobody = RunAs.parse("nobody")
    _hand_over(state, nobody)

    assert victim.stat().st_uid == 0 and tmp_path.stat().st_uid == 0
    assert (instance / "state.sealed").stat().st_uid == nobody.uid
    assert instance.stat().st_uid == nobody.uid
    assert state.root.stat().st_uid == nobody.uid and mode(state.root) == 0o710
    assert state.platform.stat().st_uid == 0 and mode(state.platform) == 0o700
    assert (state.platform / "fuse.key").stat().st_uid == 0
