"""The platform directory: permissions, wrapped keys, identity; platform_kind, open_platform."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sgxvtpm.enclaves.specs import manager_spec
from sgxvtpm.platform import (
    AttestationError,
    EnclaveIdentity,
    PlatformError,
    open_platform,
    platform_kind,
)
from sgxvtpm.platform.sim import SimPlatformDir, mrsigner_of
from sgxvtpm.platform.sim.provision import PlatformKeys

IDENT = EnclaveIdentity(b"\x01" * 32, b"\x02" * 32, 1, 1)


def test_modes(tmp_path: Path) -> None:
    pdir = SimPlatformDir.open_or_create(tmp_path / "p")
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "p" / "fuse.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "p" / "keys.json").stat().st_mode) == 0o600
    assert len((tmp_path / "p" / "fuse.key").read_bytes()) == 32
    assert pdir.path == tmp_path / "p"


def test_private_keys_are_not_on_disk_in_the_clear(tmp_path: Path) -> None:
    keys = PlatformKeys.generate()
    SimPlatformDir.open_or_create(tmp_path / "p", keys=keys)
    on_disk = b"".join(f.read_bytes() for f in (tmp_path / "p").rglob("*") if f.is_file())
    for key in keys.by_name().values():
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for secret in (scalar, der, scalar.hex().encode(), der.hex().encode()):
            assert secret not in on_disk


def test_reopen_keeps_identity(tmp_path: Path) -> None:
    first = SimPlatformDir.open_or_create(tmp_path / "p")
    again = SimPlatformDir.open_or_create(tmp_path / "p")
    assert again.platform_id == first.platform_id
    assert again.root_certificate_pem == first.root_certificate_pem
    assert again.signer_public_key == first.signer_public_key
    quote = again.enclave_platform(IDENT).quote(bytes(64))
    assert first.verifier().verify(quote).platform_id == first.platform_id


def test_two_platforms_are_independent(tmp_path: Path) -> None:
    a = SimPlatformDir.open_or_create(tmp_path / "a")
    b = SimPlatformDir.open_or_create(tmp_path / "b")
    assert a.platform_id != b.platform_id
    assert a.root_certificate_pem != b.root_certificate_pem
    assert a.signer_public_key != b.signer_public_key
    assert (tmp_path / "a" / "fuse.key").read_bytes() != (tmp_path / "b" / "fuse.key").read_bytes()


def test_signer_key_gives_mrsigner(tmp_path: Path) -> None:
    pdir = SimPlatformDir.open_or_create(tmp_path / "p")
    pub = pdir.signer_private_key().public_key()
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert der == pdir.signer_public_key
    assert len(mrsigner_of(der)) == 32


def test_a_platform_for_a_presigned_release_holds_no_vendor_key(tmp_path: Path) -> None:
    """hostd --release DIR provisions without a vendor key; reopened, it still has none
    and refuses to sign (development mode needs a platform that has one)."""
    SimPlatformDir.open_or_create(tmp_path / "p", vendor_key=False)
    pdir = SimPlatformDir.open_or_create(tmp_path / "p")
    assert pdir.signer_public_key == b""
    assert "signer" not in json.loads((tmp_path / "p" / "keys.json").read_text())
    with pytest.raises(PlatformError, match=r"holds no vendor signing key.*--release DIR"):
        pdir.sign(manager_spec(platform_kind("sim")))
    assert pdir.verifier() is not None  # the rest of the platform works as before


def test_world_readable_fuse_key_is_refused(tmp_path: Path) -> None:
    SimPlatformDir.open_or_create(tmp_path / "p")
    (tmp_path / "p" / "fuse.key").chmod(0o644)
    with pytest.raises(PlatformError, match="chmod 0600"):
        SimPlatformDir.open_or_create(tmp_path / "p")


def test_tampered_wrapped_key_is_refused(tmp_path: Path) -> None:
    SimPlatformDir.open_or_create(tmp_path / "p")
    path = tmp_path / "p" / "keys.json"
    wrapped = json.loads(path.read_text())
    blob = bytearray(bytes.fromhex(wrapped["attestation"]))
    blob[20] ^= 1
    wrapped["attestation"] = blob.hex()
    path.write_text(json.dumps(wrapped))
    pdir = SimPlatformDir.open_or_create(tmp_path / "p")
    with pytest.raises(PlatformError, match="does not unwrap"):
        pdir.enclave_platform(IDENT).quote(bytes(64))


def test_swapped_wrapped_keys_are_refused(tmp_path: Path) -> None:
    SimPlatformDir.open_or_create(tmp_path / "p")
    path = tmp_path / "p" / "keys.json"
    wrapped = json.loads(path.read_text())
    wrapped["attestation"], wrapped["signer"] = wrapped["signer"], wrapped["attestation"]
    path.write_text(json.dumps(wrapped))
    with pytest.raises(PlatformError):
        SimPlatformDir.open_or_create(tmp_path / "p").signer_private_key()


def test_incomplete_directory_is_refused(tmp_path: Path) -> None:
    SimPlatformDir.open_or_create(tmp_path / "p")
    (tmp_path / "p" / "pck.pem").unlink()
    with pytest.raises(PlatformError, match="not a complete sim platform"):
        SimPlatformDir(tmp_path / "p")


def test_platform_kind_verifies_this_platforms_quotes(tmp_path: Path) -> None:
    """platform_kind("sim"): the verifier's face of the seam, and the enclave's own verifier."""
    pdir = SimPlatformDir.open_or_create(tmp_path / "p")
    other = SimPlatformDir.open_or_create(tmp_path / "other")
    kind = platform_kind("sim")
    assert kind.name == "sim" and platform_kind() is kind
    quote = pdir.enclave_platform(IDENT).quote(bytes(64))
    assert kind.quote_verifier(pdir.root_certificate_pem).verify(quote).identity == IDENT
    # An enclave checks its peers against its own platform's root, not another's.
    assert other.enclave_platform(IDENT).quote_verifier().verify(
        other.enclave_platform(IDENT).quote(bytes(64))).identity == IDENT
    with pytest.raises(AttestationError):
        other.enclave_platform(IDENT).quote_verifier().verify(quote)
    with pytest.raises(PlatformError):
        kind.quote_verifier(b"not a pem")


def test_platforms_other_than_sim_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(PlatformError, match=r"needs SGX hardware|gramine-sgx launcher"):
        open_platform("gramine", tmp_path / "gramine")
    # The gramine kind exists (manifests, the enclave side) but cannot compute a
    # real build's MRENCLAVE: that comes from gramine-sgx-sign.
    with pytest.raises(PlatformError, match="gramine-sgx-sign"):
        platform_kind("gramine").measure(manager_spec(platform_kind("sim")))
    for make in (platform_kind, lambda name: open_platform(name, tmp_path / name)):
        with pytest.raises(ValueError, match="unknown platform 'tdx'"):
            make("tdx")
    assert list(tmp_path.iterdir()) == []  # nothing was provisioned or started


@pytest.mark.parametrize("lost", ["platform.json", "fuse.key", "keys.json"])
def test_a_platform_that_lost_a_file_is_not_provisioned_again(tmp_path: Path, lost: str) -> None:
    """Provisioning over a damaged platform would silently orphan every sealed VM."""
    first = SimPlatformDir.open_or_create(tmp_path / "p")
    (tmp_path / "p" / lost).unlink()
    with pytest.raises(PlatformError, match="is incomplete or damaged"):
        SimPlatformDir.open_or_create(tmp_path / "p")
    assert (tmp_path / "p" / "root_ca.pem").read_bytes() == first.root_certificate_pem
