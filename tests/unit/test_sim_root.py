"""sim-root: platforms under one simulated provisioning authority attest each other.

Each platform keeps its own fuse key, platform id, PCK and attestation keys;
the root certificate and the vendor's enclave signing key are the authority's.
A platform under another root (or provisioned on its own) is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sgxvtpm.platform import AttestationError, EnclaveIdentity, PlatformError, init_sim_root
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.platform.sim.authority import SimAuthority

IDENT = EnclaveIdentity(b"\xa1" * 32, b"\xb2" * 32, isv_prod_id=1, isv_svn=1)
REPORT_DATA = bytes(range(64))


def _platform(path: Path, authority: SimAuthority | None) -> SimPlatformDir:
    return SimPlatformDir.open_or_create(path, authority=authority)


def test_two_platforms_under_one_root_verify_each_other(tmp_path: Path) -> None:
    init_sim_root(tmp_path / "root")
    authority = SimAuthority.open(tmp_path / "root")
    a = _platform(tmp_path / "a", authority)
    b = _platform(tmp_path / "b", authority)
    assert a.platform_id != b.platform_id
    assert (a.path / "fuse.key").read_bytes() != (b.path / "fuse.key").read_bytes()
    assert (a.path / "pck.pem").read_bytes() != (b.path / "pck.pem").read_bytes()
    assert a.root_certificate_pem == b.root_certificate_pem == authority.root_pem
    # The vendor's key: the same MRSIGNER on every host.
    assert a.signer_public_key == b.signer_public_key == authority.signer_public_der()
    quote_a = a.enclave_platform(IDENT).quote(REPORT_DATA)
    quote_b = b.enclave_platform(IDENT).quote(REPORT_DATA)
    assert b.verifier().verify(quote_a).report_data == REPORT_DATA
    assert a.verifier().verify(quote_b).identity == IDENT
    # Sealing keys stay per platform: the fuse keys differ.
    from sgxvtpm.platform.base import KeyName, KeyPolicy, KeyRequest

    request = KeyRequest(KeyName.SEAL, KeyPolicy.MRSIGNER)
    assert a.enclave_platform(IDENT).get_key(request) != b.enclave_platform(IDENT).get_key(
        request
    )


def test_a_presigned_release_opens_the_root_without_the_vendor_key(tmp_path: Path) -> None:
    """hostd --sim-root R --release DIR: the CPU leaves the vendor key wrapped, provisions
    a platform without one under the root, and reopens a development-mode platform."""
    init_sim_root(tmp_path / "root")
    authority = SimAuthority.open(tmp_path / "root", with_signer=False)
    assert authority.signer is None and authority.signer_public_der() == b""
    presigned = SimPlatformDir.open_or_create(
        tmp_path / "a", authority=authority, vendor_key=False
    )
    assert presigned.signer_public_key == b""
    assert presigned.root_certificate_pem == authority.root_pem
    developed = _platform(tmp_path / "b", SimAuthority.open(tmp_path / "root"))
    again = SimPlatformDir.open_or_create(developed.path, authority=authority, vendor_key=False)
    assert again.signer_public_key == developed.signer_public_key != b""


def test_platform_under_another_root_is_refused(tmp_path: Path) -> None:
    init_sim_root(tmp_path / "root1")
    init_sim_root(tmp_path / "root2")
    a = _platform(tmp_path / "a", SimAuthority.open(tmp_path / "root1"))
    c = _platform(tmp_path / "c", SimAuthority.open(tmp_path / "root2"))
    alone = _platform(tmp_path / "alone", None)
    for other in (c, alone):
        with pytest.raises(AttestationError):
            a.verifier().verify(other.enclave_platform(IDENT).quote(REPORT_DATA))
        with pytest.raises(AttestationError):
            other.verifier().verify(a.enclave_platform(IDENT).quote(REPORT_DATA))
    assert a.signer_public_key != c.signer_public_key


def test_existing_platform_must_be_under_the_given_root(tmp_path: Path) -> None:
    init_sim_root(tmp_path / "root1")
    init_sim_root(tmp_path / "root2")
    _platform(tmp_path / "a", SimAuthority.open(tmp_path / "root1"))
    _platform(tmp_path / "alone", None)
    with pytest.raises(PlatformError, match="another root"):
        _platform(tmp_path / "a", SimAuthority.open(tmp_path / "root2"))
    with pytest.raises(PlatformError, match="another root"):
        _platform(tmp_path / "alone", SimAuthority.open(tmp_path / "root1"))
    # Without --sim-root an existing platform opens as before.
    assert _platform(tmp_path / "a", None).root_certificate_pem == (
        tmp_path / "root1" / "root_ca.pem"
    ).read_bytes()


def test_sim_root_init_refuses_a_used_directory_and_open_refuses_a_non_root(
    tmp_path: Path,
) -> None:
    init_sim_root(tmp_path / "root")
    with pytest.raises(PlatformError, match="not empty"):
        init_sim_root(tmp_path / "root")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlatformError, match="not a sim root"):
        SimAuthority.open(tmp_path / "empty")
    (tmp_path / "root" / "root_ca.pem").write_bytes(
        (tmp_path / "root" / "root_ca.pem").read_bytes().replace(b"A", b"B", 1)
    )
    with pytest.raises(PlatformError, match="does not match"):
        SimAuthority.open(tmp_path / "root")
