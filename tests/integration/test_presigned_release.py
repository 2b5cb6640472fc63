"""hostd --release DIR: the vendor signs on its build host, hostd signs nothing.

The vendor's step is the real command line (``sgxvtpm release keygen``,
``sgxvtpm release sign``); hostd, its sim CPU and the enclaves are real
processes. What is checked (docs/REAL-SGX.md, SECURITY.md):

- a platform provisioned by ``hostd --release DIR`` holds no vendor key, and
  its CPU signs nothing; a VM is created on the shipped SIGSTRUCTs and its TPM
  answers; the MRSIGNER in the manager's quote and the instance's is the hash of
  the vendor's key, for clients pinned to the release's manifest;
- an enclave file changed on the host after signing is refused at EINIT;
- a release signed by another key launches, but a client pinned to the
  vendor's release manifest refuses it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.helpers.hostd import Hostd

from sgxvtpm.endpoint.k2 import K2Client
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.platform import open_platform
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU
from sgxvtpm.tpm.nv import execute
from sgxvtpm.vmm.pins import ENV as PINS_ENV

pytestmark = pytest.mark.integration


def sgxvtpm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sgxvtpm.cli", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """The vendor's release, made once for the module."""
    return vendor_release(tmp_path_factory.mktemp("build-host"), "vendor")


def vendor_release(where: Path, name: str) -> tuple[Path, bytes]:
    """A fresh vendor key and the release it signs (the build host's two commands);
    the release directory and the key's MRSIGNER (SHA-256 of its SubjectPublicKeyInfo)."""
    key, out = where / f"{name}.pem", where / name
    keygen = sgxvtpm("release", "keygen", str(key))
    assert keygen.returncode == 0, keygen.stderr
    sign = sgxvtpm("release", "sign", "--key", str(key), "--out", str(out))
    assert sign.returncode == 0, sign.stderr
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return out, hashlib.sha256(spki).digest()


@pytest.mark.parametrize("sim_root", [False, True], ids=["own-root", "sim-root"])
def test_presigned_release_runs_on_a_platform_without_the_vendor_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vendor: tuple[Path, bytes], sim_root: bool
) -> None:
    """Also under a sim root (whose own vendor key the CPU then leaves wrapped)."""
    release, mrsigner = vendor
    args = ["--release", str(release)]
    if sim_root:
        assert sgxvtpm("sim-root", "init", str(tmp_path / "root")).returncode == 0
        args += ["--sim-root", str(tmp_path / "root")]
    manifest = json.loads((release / "release.json").read_text())
    assert manifest["mrsigner"] == mrsigner.hex()
    monkeypatch.setenv(PINS_ENV, str(release / "release.json"))  # the clients' pins
    state = tmp_path / "state"
    h = Hostd(state, args=args)
    h.start()
    try:
        # The platform hostd provisioned holds no vendor key (the wrapped keys are
        # named in keys.json), and its CPU signed nothing.
        platform = state / "platform"
        assert sorted(json.loads((platform / "keys.json").read_text())) == [
            "attestation", "pck", "root_ca"
        ]  # fmt: skip
        assert "signer_public_key" not in json.loads((platform / "platform.json").read_text())
        assert "platform.release_signed" not in h.log()
        info = asyncio.run(h.vmm().create("vm1"))
        assert info.mrenclave == manifest["mrenclave"]["instance"]
        assert info.mrsigner == mrsigner.hex()
        with K2Client(h.binding("vm1")) as client:  # pinned: MRENCLAVE and MRSIGNER
            client.power_on()
            execute(client.transact, wire.startup(TPM2_SU.CLEAR))
            assert len(wire.parse_get_random(execute(client.transact, wire.get_random(8)))) == 8
        # The manager's quote (in its CA certificate), verified under the pins.
        verify = sgxvtpm("attest", "verify", "vm1", "--state-dir", str(state), "--json")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        facts = json.loads(verify.stdout)["facts"]
        assert facts["MRSIGNER"] == mrsigner.hex()
        assert facts["MRENCLAVE"] == manifest["mrenclave"]["manager"]
    finally:
        h.stop()


def test_enclave_file_changed_after_signing_is_refused_at_einit(
    tmp_path: Path, vendor: tuple[Path, bytes]
) -> None:
    """hostd run from a copy of the package in which one measured file changed after
    the vendor signed: the CPU measures the bytes the loader sends, EINIT refuses."""
    import sgxvtpm as package

    release, _ = vendor
    copy = tmp_path / "copy"
    shutil.copytree(Path(package.__file__).parent, copy / "sgxvtpm")
    with (copy / "sgxvtpm" / "enclaves" / "instance.py").open("a") as f:
        f.write("\n# changed on the host after the vendor signed\n")
    h = Hostd(tmp_path / "state", args=["--release", str(release)])
    h.env["PYTHONPATH"] = str(copy)
    with pytest.raises((RuntimeError, TimeoutError)):
        h.start(timeout=30)
    try:
        assert "enclave launch failed: SIGSTRUCT does not sign the measured enclave" in h.log()
        assert "hostd.listening" not in h.log()
    finally:
        if h.running():
            h.stop()


def test_release_of_another_key_launches_but_pinned_clients_refuse_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vendor: tuple[Path, bytes]
) -> None:
    release, _ = vendor
    other, other_mrsigner = vendor_release(tmp_path, "other")
    # Same code, so the same MRENCLAVEs: only MRSIGNER tells them apart.
    assert (json.loads((release / "release.json").read_text())["mrenclave"]
            == json.loads((other / "release.json").read_text())["mrenclave"])  # fmt: skip
    h = Hostd(tmp_path / "state", args=["--release", str(other)])
    h.start()
    try:
        monkeypatch.setenv(PINS_ENV, str(release / "release.json"))
        with pytest.raises(SgxvtpmError):
            asyncio.run(h.vmm().create("vm1"))
        monkeypatch.setenv(PINS_ENV, str(other / "release.json"))
        info = asyncio.run(h.vmm().create("vm2"))  # it did launch, under the other key
        assert info.mrsigner == other_mrsigner.hex()
    finally:
        h.stop()


def test_release_commands_refuse_bad_input_in_one_line(
    tmp_path: Path, vendor: tuple[Path, bytes]
) -> None:
    key = tmp_path / "vendor.pem"
    assert sgxvtpm("release", "keygen", str(key)).returncode == 0
    again = sgxvtpm("release", "keygen", str(key))
    assert again.returncode == 1
    assert again.stderr == f"sgxvtpm: error: {key} exists: a vendor key is never overwritten\n"
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    wrong = sgxvtpm("release", "sign", "--key", str(p384), "--out", str(tmp_path / "r"))
    assert wrong.returncode == 1
    assert wrong.stderr.count("\n") == 1 and "the sim signs with ECDSA P-256" in wrong.stderr
    # A sim release on another platform kind, and a directory without a release.
    from sgxvtpm.platform.release import ReleaseError

    release, _ = vendor
    with pytest.raises(ReleaseError, match="signed for platform 'sim', not 'gramine-sim'"):
        open_platform("gramine-sim", tmp_path / "platform", signed_release=release)
    h = Hostd(tmp_path / "state", args=["--release", str(tmp_path / "nothing")])
    with pytest.raises((RuntimeError, TimeoutError)):
        h.start(timeout=30)
    assert "sgxvtpm: error: no pre-signed release in" in h.log()
