"""The pre-signed release's files (platform/release.py, platform/sim/release.py), no processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sgxvtpm.enclaves.specs import release
from sgxvtpm.platform import generate_vendor_key, platform_kind
from sgxvtpm.platform.release import MANIFEST, ReleaseError, read_manifest, write_manifest
from sgxvtpm.platform.sim import release as sim_release
from sgxvtpm.platform.sim import sigstruct
from sgxvtpm.platform.sim.measure import mrsigner_of
from sgxvtpm.vmm import pins

SIM = platform_kind("sim")
HASHES = {"manager": b"\x01" * 32, "instance": b"\x02" * 32}


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    where = tmp_path_factory.mktemp("build-host")
    mrsigner = generate_vendor_key("sim", where / "vendor.pem")
    sim_release.sign(release(SIM), where / "vendor.pem", where / "release", SIM)
    return where / "release", mrsigner


def test_manifest_round_trip_and_is_the_clients_pins_file(tmp_path: Path) -> None:
    write_manifest(tmp_path, "sim", HASHES, b"\x03" * 32)
    assert read_manifest(tmp_path, "sim") == (HASHES, b"\x03" * 32)
    parsed = pins.parse((tmp_path / MANIFEST).read_text(), tmp_path / MANIFEST)
    assert parsed.mrenclave == HASHES and parsed.mrsigner == b"\x03" * 32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(platform="gramine"), "signed for platform 'gramine', not 'sim'"),
        (lambda m: m.update(format=2), "unsupported format 2"),
        (lambda m: m.update(mrsigner="00"), "a hash is not 32 bytes"),
        (lambda m: m["mrenclave"].pop("instance"), "not a release manifest"),
        (lambda m: m.update(mrenclave="zz"), "not a release manifest"),
    ],
)
def test_a_bad_manifest_is_one_clear_error(tmp_path: Path, change: object, message: str) -> None:
    manifest = write_manifest(tmp_path, "sim", HASHES, b"\x03" * 32)
    change(manifest)  # type: ignore[operator]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError, match=message):
        read_manifest(tmp_path, "sim")


def test_no_manifest_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(ReleaseError, match=f"no pre-signed release in {tmp_path}"):
        read_manifest(tmp_path, "sim")


def test_sim_release_holds_sigstructs_by_the_vendor_key(signed: tuple[Path, bytes]) -> None:
    directory, mrsigner = signed
    loaded = sim_release.load(directory, SIM)
    mrenclave, manifest_signer = read_manifest(directory, "sim")
    assert manifest_signer == mrsigner
    for role, data in loaded.items():
        sig = sigstruct.SigStruct.decode(data)
        assert mrsigner_of(sig.signer_public_key) == mrsigner
        assert sig.mrenclave == mrenclave[role] == SIM.measure(
            next(s for s in release(SIM) if s.name == role)
        )


def test_swapped_or_missing_sigstructs_are_refused(
    tmp_path: Path, signed: tuple[Path, bytes]
) -> None:
    directory, _ = signed
    copy = tmp_path / "release"
    copy.mkdir()
    (copy / MANIFEST).write_bytes((directory / MANIFEST).read_bytes())
    (copy / "manager.sigstruct").write_bytes((directory / "instance.sigstruct").read_bytes())
    (copy / "instance.sigstruct").write_bytes((directory / "manager.sigstruct").read_bytes())
    with pytest.raises(ReleaseError, match="not the SIGSTRUCT the release manifest names"):
        sim_release.load(copy, SIM)
    (copy / "instance.sigstruct").unlink()
    (copy / "manager.sigstruct").write_bytes((directory / "manager.sigstruct").read_bytes())
    with pytest.raises(ReleaseError, match=r"lacks instance\.sigstruct"):
        sim_release.load(copy, SIM)


def test_vendor_keys_are_new_files_0600(tmp_path: Path) -> None:
    key = tmp_path / "vendor.pem"
    generate_vendor_key("sim", key)
    assert key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ReleaseError, match="never overwritten"):
        generate_vendor_key("sim", key)
