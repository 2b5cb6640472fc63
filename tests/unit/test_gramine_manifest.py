"""The Gramine manifest templates: rendered from the measured set, checked against the schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgxvtpm.enclaves.specs import (
    ENTRY_MODULES,
    PACKAGE_ROOT,
    import_closure,
    instance_spec,
    manager_spec,
)
from sgxvtpm.platform import PlatformError, platform_kind
from sgxvtpm.platform.base import KeyName, KeyPolicy, KeyRequest, TargetInfo
from sgxvtpm.platform.gramine import manifest
from sgxvtpm.platform.gramine.backend import GRAMINE
from sgxvtpm.platform.gramine.structs import (
    pack_key_request,
    pack_target_info,
    parse_key_request,
    parse_target_info,
)


def rendered(role: str, tmp_path: Path) -> manifest.Manifest:
    spec = manager_spec(GRAMINE) if role == "manager" else instance_spec(GRAMINE)
    return manifest.render(spec, role, state_dir=tmp_path, package_root=PACKAGE_ROOT)


@pytest.mark.parametrize("role", ["manager", "instance"])
def test_trusted_files_are_the_measured_set_the_sim_measures(role: str, tmp_path: Path) -> None:
    m = rendered(role, tmp_path)
    doc = manifest.check(m.text, m.trusted_sgxvtpm, PACKAGE_ROOT)
    spec_of = manager_spec if role == "manager" else instance_spec
    # Exactly the files enclaves/specs.py measures for this kind of platform ...
    assert set(m.trusted_sgxvtpm) == {p.resolve() for p in spec_of(GRAMINE).code_files}
    # ... and, but for each platform's own bootstrap, the sim's measured files.
    sim = {p.resolve() for p in spec_of(platform_kind("sim")).code_files}
    common = set(import_closure(ENTRY_MODULES).values())
    assert common <= sim and common <= set(m.trusted_sgxvtpm)
    assert (sim - set(import_closure(platform_kind("sim").enclave_bootstrap).values())) <= set(
        m.trusted_sgxvtpm
    )
    # The role is fixed in the measured argv.
    entry = spec_of(GRAMINE).entry
    assert doc["loader"]["argv"][-2:] == [manifest.BOOTSTRAP, entry]
    assert doc["sgx"]["remote_attestation"] == "dcap" and doc["sgx"]["debug"] is False
    # The state directory, and in it hostd's public copy of the collateral by name (a
    # running enclave re-reads it, hostd --pccs); it is no trusted file.
    collateral = f"file:{tmp_path}/collateral.json"
    assert doc["sgx"]["allowed_files"] == [f"file:{tmp_path}/", collateral]
    assert collateral not in doc["sgx"]["trusted_files"]
    libtpms = [u for u in doc["sgx"]["trusted_files"] if "libtpms" in u]
    assert bool(libtpms) == (role == "instance")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("sgx.max_threads = 8", 'sgx.max_threads = "8"'), "must be a int"),
        (("sgx.isvsvn = 1", "sgx.isvsvn = true"), "must be a int"),
        (('loader.log_level = "error"', 'loader.log_level = "loud"'), "not a Gramine value"),
        (("sgx.debug = false", "sgx.debug = false\nsgx.insecure__keys = 1"), "schema knows"),
        (("sgx.debug = false", "sgx.debug = true"), "sgx.debug = false"),
        (("sgx.trusted_files = [", f'sgx.trusted_files = [\n  "file:{PACKAGE_ROOT}/",'),
         "covers the whole sgxvtpm package"),
        (("sgx.trusted_files = [",
          f'sgx.trusted_files = [\n  "file:{PACKAGE_ROOT}/host/hostd.py",'), "extra"),
        (("fs.mounts = [", 'fs.mounts = [\n  { path = "rel", uri = "file:x" },'), "not absolute"),
        (("]\nsgx.debug", "\nsgx.debug"), "not TOML"),
    ],
)
def test_check_refuses(change: tuple[str, str], message: str, tmp_path: Path) -> None:
    m = rendered("manager", tmp_path)
    assert change[0] in m.text
    with pytest.raises(PlatformError, match=message):
        manifest.check(m.text.replace(change[0], change[1], 1), m.trusted_sgxvtpm, PACKAGE_ROOT)


def test_check_refuses_a_missing_measured_file(tmp_path: Path) -> None:
    m = rendered("instance", tmp_path)
    dropped = next(p for p in m.trusted_sgxvtpm if p.name == "vtpm_core.py")
    text = m.text.replace(f'  "file:{dropped}",\n', "")
    with pytest.raises(PlatformError, match="missing"):
        manifest.check(text, m.trusted_sgxvtpm, PACKAGE_ROOT)


def test_cli_prints_a_checked_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sgxvtpm.cli import main

    assert main(["gramine", "manifest", "--role", "instance", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sgxvtpm.enclaves.instance:main" in out and "sgx.trusted_files" in out


# -- TARGETINFO and KEYREQUEST (SDM 38.16, 38.18) --------------------------------


def test_key_request_layout() -> None:
    raw = pack_key_request(
        KeyRequest(KeyName.SEAL, KeyPolicy.MRSIGNER, isv_svn=0x0102, cpu_svn=bytes(range(16)),
                   key_id=b"\x07" * 32, config_svn=0x0304)
    )
    assert len(raw) == 512
    assert raw[0:2] == b"\x04\x00" and raw[2:4] == b"\x02\x00" and raw[4:6] == b"\x02\x01"
    assert raw[8:24] == bytes(range(16)) and raw[40:72] == b"\x07" * 32
    assert raw[24:40] == bytes.fromhex("ffffffffffffffff1bfff9ffffffffff")  # Gramine's masks
    assert raw[72:76] == b"\xff" * 4 and raw[76:78] == b"\x04\x03" and not any(raw[78:])


@given(
    name=st.sampled_from(list(KeyName)),
    policy=st.sampled_from([KeyPolicy.MRENCLAVE, KeyPolicy.MRSIGNER]),
    svn=st.integers(0, 0xFFFF),
    cpu=st.binary(min_size=16, max_size=16),
    key_id=st.binary(min_size=32, max_size=32),
)
def test_key_request_round_trip(
    name: KeyName, policy: KeyPolicy, svn: int, cpu: bytes, key_id: bytes
) -> None:
    request = KeyRequest(name, policy, isv_svn=svn, cpu_svn=cpu, key_id=key_id)
    assert parse_key_request(pack_key_request(request)) == request


@given(st.binary(min_size=0, max_size=600))
def test_key_request_parser_answers_a_request_or_value_error(raw: bytes) -> None:
    try:
        request = parse_key_request(raw)
    except ValueError:
        return
    assert len(raw) == 512 and isinstance(request, KeyRequest)


@given(
    mrenclave=st.binary(min_size=32, max_size=32),
    attributes=st.binary(min_size=16, max_size=16),
    misc=st.integers(0, 0xFFFFFFFF),
)
def test_target_info_round_trip(mrenclave: bytes, attributes: bytes, misc: int) -> None:
    target = TargetInfo(mrenclave, attributes, misc)
    raw = pack_target_info(target)
    assert len(raw) == 512 and raw[:32] == mrenclave and raw[32:48] == attributes
    assert parse_target_info(raw) == target
