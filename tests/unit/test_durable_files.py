"""util.durable.atomic_write and util.keyfile.write_private_key against a hostile directory.

The state directories may be writable by a less trusted user; these plant what
such a user would (a symlink at the temp name, a world-readable key file) and
check that no write follows it and that every file gets exactly its mode.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.util import durable
from sgxvtpm.util.durable import atomic_write
from sgxvtpm.util.keyfile import write_private_key


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def umask_077() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_write_does_not_follow_a_symlink_at_the_pid_temp_name(tmp_path: Path) -> None:
    """The temp name used to be .NAME.PID.tmp, opened without O_EXCL/O_NOFOLLOW."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "state.sealed"
    (tmp_path / f".{target.name}.{os.getpid()}.tmp").symlink_to(victim)
    atomic_write(target, b"new state")
    assert victim.read_bytes() == b"precious"
    assert target.read_bytes() == b"new state"
    assert not target.is_symlink()


def test_atomic_write_refuses_an_existing_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if the random part is guessed, a planted entry is never opened (O_EXCL, O_NOFOLLOW)."""
    monkeypatch.setattr(durable.secrets, "token_hex", lambda n: "guessed")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "key.pem"
    (tmp_path / ".key.pem.guessed.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"secret")
    assert victim.read_bytes() == b"precious"
    assert not target.exists()


def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "registry.sealed"
    target.symlink_to(victim)
    atomic_write(target, b"sealed")
    assert victim.read_bytes() == b"precious"
    assert target.read_bytes() == b"sealed" and not target.is_symlink()


def test_atomic_write_sets_the_exact_mode_whatever_the_umask(
    tmp_path: Path, umask_077: None
) -> None:
    atomic_write(tmp_path / "public.pem", b"cert", 0o644)
    atomic_write(tmp_path / "private", b"key")
    assert mode_of(tmp_path / "public.pem") == 0o644
    assert mode_of(tmp_path / "private") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private", "public.pem"]  # no temp left


def _key_pem(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def test_write_private_key_over_a_world_readable_file_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "vm.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    key = ec.generate_private_key(ec.SECP256R1())
    write_private_key(path, key)
    assert mode_of(path) == 0o600
    assert _key_pem(path).private_numbers() == key.private_numbers()


def test_write_private_key_does_not_write_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "readable-by-all"
    victim.write_bytes(b"")
    victim.chmod(0o644)
    path = tmp_path / "operator.key"
    path.symlink_to(victim)
    write_private_key(path, ec.generate_private_key(ec.SECP256R1()))
    assert victim.read_bytes() == b""
    assert not path.is_symlink() and mode_of(path) == 0o600
