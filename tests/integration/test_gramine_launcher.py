"""hostd --platform gramine: the launcher, with STAND-INS for Gramine's tools.

Gramine is not installed here and there is no SGX. The executables
``gramine-manifest``, ``gramine-sgx-sign`` and ``gramine-sgx`` put first on
PATH are the test's stand-ins (tests/helpers/gramine_standin.py): they take
the command lines Gramine documents, write Gramine's files, record each call,
and the ``gramine-sgx`` stand-in runs the enclave on the gramine-sim path
(real bootstrap, /dev/attestation tree, manager and instance code), over a
sim platform directory the stand-ins share. A plain file stands for
/dev/sgx_enclave through the launcher's test-only override
(``SGXVTPM_TEST_SGX_DEVICE``, platform/gramine/launcher.py).

What is checked: open_platform("gramine") refuses, naming what is missing,
without the device, without the tools, without collateral; the tools are
run with the documented argv in the build directory; MRENCLAVE and MRSIGNER
come from the .sig (SIGSTRUCT layout); hostd runs one ``gramine-sgx ROLE``
per enclave with its stream on stdin/stdout and PATH as its only
environment; a VMM client whose policy is the manager's .sig MRENCLAVE
creates a VM, and a K2 client pinned to the instance's .sig MRENCLAVE uses
its TPM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from tests.helpers import gramine_standin
from tests.helpers.hostd import Hostd
from tests.helpers.pccs import FakePccs
from tests.helpers.swtpm import Swtpm

from sgxvtpm.endpoint.k2 import K2Client
from sgxvtpm.platform import MeasurementPolicy, PlatformError, open_platform
from sgxvtpm.platform.gramine import sigstruct
from sgxvtpm.platform.gramine.launcher import COLLATERAL_FILE, DEVICE_ENV
from sgxvtpm.platform.sim import SimPlatformDir, provision
from sgxvtpm.platform.tpm_counters import PIN_FILE
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_RH, TPM2_SU, TPMA_NV
from sgxvtpm.tpm.nv import execute
from sgxvtpm.vmm.client import VmmClient

pytestmark = pytest.mark.integration

RELEASE = "sgxvtpm.enclaves.specs:release"
NV_ATTRS = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD


@dataclasses.dataclass
class StandIns:
    bin: Path
    log: Path
    sim_platform: Path
    home: Path
    device: Path

    def calls(self, tool: str) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        entries = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [e for e in entries if e["tool"] == tool]

    def env(self, with_tools: bool = True, with_device: bool = True) -> dict[str, str]:
        path = os.environ["PATH"]
        env = {"PATH": f"{self.bin}:{path}" if with_tools else path, "HOME": str(self.home)}
        if with_device:
            env[DEVICE_ENV] = str(self.device)
        return env


@pytest.fixture
def standins(tmp_path: Path) -> StandIns:
    s = StandIns(tmp_path / "bin", tmp_path / "standin.jsonl", tmp_path / "sim-platform",
                 tmp_path / "home", tmp_path / "sgx_enclave")  # fmt: skip
    gramine_standin.install(s.bin, s.log, s.sim_platform)
    SimPlatformDir.open_or_create(s.sim_platform)
    key_dir = s.home / ".config" / "gramine"  # gramine-sgx-gen-private-key's default place
    key_dir.mkdir(parents=True)
    (key_dir / "enclave-key.pem").write_bytes(
        gramine_standin.sgx_signing_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )  # fmt: skip
    s.device.write_bytes(b"")
    return s


def _platform_dir(root: Path, standins: StandIns) -> Path:
    directory = root / "platform"
    directory.mkdir(parents=True, mode=0o700)
    collateral = SimPlatformDir.open_or_create(standins.sim_platform).dcap_collateral()
    (directory / COLLATERAL_FILE).write_text(collateral)
    return directory


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    yield monkeypatch


def _set(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_refuses_without_the_sgx_device(
    tmp_path: Path, standins: StandIns, environ: pytest.MonkeyPatch
) -> None:
    if Path("/dev/sgx_enclave").exists():
        pytest.skip("this machine has SGX")
    _set(environ, standins.env(with_device=False))
    with pytest.raises(PlatformError, match=r"needs SGX hardware.*no /dev/sgx_enclave"):
        open_platform("gramine", _platform_dir(tmp_path, standins), release=RELEASE)
    assert standins.calls("gramine-manifest") == []


def test_refuses_without_gramines_tools(
    tmp_path: Path, standins: StandIns, environ: pytest.MonkeyPatch
) -> None:
    _set(environ, standins.env(with_tools=False))
    with pytest.raises(
        PlatformError,
        match="gramine-manifest, gramine-sgx-sign, gramine-sgx not found on PATH",
    ):
        open_platform("gramine", _platform_dir(tmp_path, standins), release=RELEASE)


def test_refuses_without_collateral(
    tmp_path: Path, standins: StandIns, environ: pytest.MonkeyPatch
) -> None:
    _set(environ, standins.env())
    directory = _platform_dir(tmp_path, standins)
    (directory / COLLATERAL_FILE).unlink()
    with pytest.raises(PlatformError, match=f"DCAP collateral .*{COLLATERAL_FILE}"):
        open_platform("gramine", directory, release=RELEASE)


def test_build_runs_gramines_tools_and_reads_the_sig(
    tmp_path: Path, standins: StandIns, environ: pytest.MonkeyPatch
) -> None:
    from sgxvtpm.enclaves.specs import instance_spec, manager_spec

    _set(environ, standins.env())
    directory = _platform_dir(tmp_path, standins)
    backend = open_platform("gramine", directory, release=RELEASE)
    build = directory / "gramine"
    try:
        manifest_calls = standins.calls("gramine-manifest")
        sign_calls = standins.calls("gramine-sgx-sign")
        assert [c["argv"] for c in manifest_calls] == [
            ["gramine-manifest", f"{role}.manifest.template", f"{role}.manifest"]
            for role in ("manager", "instance")
        ]
        assert [c["argv"] for c in sign_calls] == [
            ["gramine-sgx-sign", "--manifest", f"{role}.manifest", "--output",
             f"{role}.manifest.sgx"]
            for role in ("manager", "instance")
        ]  # fmt: skip
        assert {c["cwd"] for c in manifest_calls + sign_calls} == {str(build)}
        key = (standins.home / ".config/gramine/enclave-key.pem").read_bytes()
        modulus = serialization.load_pem_private_key(key, None).public_key().public_numbers().n  # type: ignore[union-attr]
        for role, spec in (("manager", manager_spec(backend)),
                           ("instance", instance_spec(backend))):  # fmt: skip
            sig = sigstruct.parse((build / f"{role}.sig").read_bytes())
            expanded = (build / f"{role}.manifest.sgx").read_bytes()
            assert sig.mrenclave == hashlib.sha256(expanded).digest()  # the stand-in's MRENCLAVE
            assert backend.measure(spec) == sig.mrenclave
            assert sig.mrsigner == hashlib.sha256(modulus.to_bytes(384, "little")).digest()
            assert (build / f"{role}.manifest.template").read_text().startswith(
                f"# sgxvtpm {role} enclave"
            )
        assert backend.attestation_root_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    finally:
        backend.close()


def _host_tpm(directory: Path) -> Swtpm:
    """Debian's swtpm as the host TPM, an RSA EK persistent at 0x81010001."""
    directory.mkdir()
    tpm = Swtpm(directory)
    create = wire.create_primary(wire.rsa2048_template(), TPM2_RH.ENDORSEMENT)
    transient = wire.parse_create_primary(execute(tpm.transact, create)).handle
    execute(tpm.transact, wire.evict_control(transient, 0x81010001))
    execute(tpm.transact, wire.flush_context(transient))
    return tpm


@pytest.mark.parametrize("counters", ["sim", "tpm"])
def test_hostd_platform_gramine_end_to_end(
    tmp_path: Path, standins: StandIns, environ: pytest.MonkeyPatch, counters: str
) -> None:
    """With the stand-in's counters (the sim CPU's), or a host TPM's (--counters tpm:)."""
    if counters == "tpm" and shutil.which("swtpm") is None:
        pytest.skip("Debian's swtpm is not installed")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    _platform_dir(state, standins)
    environ.setenv("SGXVTPM_PLATFORM", "gramine-sim")  # the client checks the stand-in's quotes
    tpm = _host_tpm(tmp_path / "host-tpm") if counters == "tpm" else None
    args = ["--platform", "gramine"]
    if tpm is not None:
        args += ["--counters", f"tpm:{tpm.tcti}"]
    h = Hostd(state, args=args)
    h.env.update(standins.env())
    h.start()
    try:
        build = state / "platform" / "gramine"
        signed = {role: sigstruct.parse((build / f"{role}.sig").read_bytes())
                  for role in ("manager", "instance")}  # fmt: skip
        manager_policy = MeasurementPolicy(mrenclaves=frozenset({signed["manager"].mrenclave}))
        vmm = VmmClient(h.state, credentials=h.credentials, policy=manager_policy)
        info = asyncio.run(vmm.create("vm1"))
        assert info.state == "running"
        assert info.mrenclave == signed["instance"].mrenclave.hex()
        assert info.mrsigner == signed["instance"].mrsigner.hex()
        runs = standins.calls("gramine-sgx")
        assert [r["argv"] for r in runs] == [["gramine-sgx", "manager"],
                                             ["gramine-sgx", "instance"]]  # fmt: skip
        for run in runs:
            assert run["cwd"] == str(build)
            assert run["fds"] == {"0": "socket", "1": "socket"}  # the host stream on stdio
            # PATH only: nothing of hostd's environment. (/bin/sh may export PWD,
            # SHLVL, _; the stand-in's Python sets LC_CTYPE, PEP 538's locale coercion.)
            assert set(run["env"]) - {"PWD", "SHLVL", "_", "LC_CTYPE"} == {"PATH"}
        binding = dataclasses.replace(
            h.binding("vm1"),
            policy=MeasurementPolicy(mrenclaves=frozenset({signed["instance"].mrenclave})),
        )
        with K2Client(binding) as client:
            client.power_on()
            execute(client.transact, wire.startup(TPM2_SU.CLEAR))
            assert len(wire.parse_get_random(execute(client.transact, wire.get_random(8)))) == 8
            execute(client.transact, wire.nv_define_space(0x01500002, 8, NV_ATTRS))
            execute(client.transact, wire.nv_write(0x01500002, b"gramine!"))  # a sealed commit
        # With --counters tpm: the enclaves pinned the host TPM's key at their first start.
        manager_pinned = (state / "manager" / PIN_FILE).exists()
        instance_pins = list((state / "instances").glob(f"*/{PIN_FILE}"))
        if counters == "tpm":
            assert manager_pinned and len(instance_pins) == 1
        else:
            assert not manager_pinned and instance_pins == []
    finally:
        h.stop()
        if tpm is not None:
            tpm.close()


def test_hostd_runs_a_presigned_gramine_release_without_signing(
    tmp_path: Path, standins: StandIns, environ: pytest.MonkeyPatch
) -> None:
    """The vendor signs on the build host (`sgxvtpm release sign --platform gramine --key`);
    `hostd --platform gramine --release DIR` runs gramine-sgx on the shipped files only,
    on a host without gramine-manifest or gramine-sgx-sign at all."""
    import subprocess
    import sys

    from sgxvtpm.platform import generate_vendor_key
    from sgxvtpm.vmm.pins import ENV as PINS_ENV

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    _platform_dir(state, standins)
    key, release = tmp_path / "vendor.pem", tmp_path / "release"
    mrsigner = generate_vendor_key("gramine", key)  # RSA-3072, e = 3
    sign = subprocess.run(
        [sys.executable, "-m", "sgxvtpm.cli", "release", "sign", "--platform", "gramine",
         "--key", str(key), "--state-dir", str(state), "--out", str(release)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **standins.env()},
    )  # fmt: skip
    assert sign.returncode == 0, sign.stderr
    assert [c["argv"][:3] for c in standins.calls("gramine-sgx-sign")] == [
        ["gramine-sgx-sign", "--key", str(key)]
    ] * 2
    manifest = json.loads((release / "release.json").read_text())
    assert manifest["mrsigner"] == mrsigner.hex()
    # The serving host: no signing tools, and nothing recorded from here on.
    (standins.bin / "gramine-manifest").unlink()
    (standins.bin / "gramine-sgx-sign").unlink()
    standins.log.unlink()
    environ.setenv("SGXVTPM_PLATFORM", "gramine-sim")  # the client checks the stand-in's quotes
    environ.setenv(PINS_ENV, str(release / "release.json"))  # copied from the vendor
    h = Hostd(state, args=["--platform", "gramine", "--release", str(release)])
    h.env.update(standins.env())
    h.start()
    try:
        info = asyncio.run(h.vmm().create("vm1"))
        assert info.mrenclave == manifest["mrenclave"]["instance"]
        assert info.mrsigner == mrsigner.hex()
        with K2Client(h.binding("vm1")) as client:
            client.power_on()
            execute(client.transact, wire.startup(TPM2_SU.CLEAR))
            assert len(wire.parse_get_random(execute(client.transact, wire.get_random(8)))) == 8
        assert standins.calls("gramine-manifest") == standins.calls("gramine-sgx-sign") == []
        runs = standins.calls("gramine-sgx")
        assert [r["argv"] for r in runs] == [["gramine-sgx", "manager"],
                                             ["gramine-sgx", "instance"]]  # fmt: skip
        assert {r["cwd"] for r in runs} == {str(release)}
        assert not (state / "platform" / "gramine").exists()  # nothing built here
    finally:
        h.stop()
    # Signed for another host's state directory (the manifests name it): refused.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    _set(environ, standins.env())
    with pytest.raises(PlatformError, match="not signed for the state directory"):
        open_platform("gramine", _platform_dir(elsewhere, standins), signed_release=release)


def test_hostd_platform_gramine_fetches_collateral_from_its_pccs_without_a_quote(
    tmp_path: Path, standins: StandIns, environ: pytest.MonkeyPatch
) -> None:
    """hostd --platform gramine --pccs: no quote for the host, so hostd fetches by the
    FMSPC and CA of the (expired) copy it has, checks the answer under the platform's
    root, and publishes it before any enclave starts; a VMM client then creates a VM
    with it. (The stand-in enclaves' platform is the stand-ins' sim platform, whose
    root the collateral chains to.)"""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    platform_dir = _platform_dir(state, standins)
    sim = SimPlatformDir.open_or_create(standins.sim_platform)
    root_key = sim._private_key("root_ca")
    now = datetime.datetime.now(datetime.UTC)
    expired = provision.collateral(root_key, sim.root_certificate_pem,
                                   now - datetime.timedelta(days=365 * 31))
    fresh = provision.collateral(root_key, sim.root_certificate_pem, now)
    (platform_dir / COLLATERAL_FILE).write_text(expired)
    environ.setenv("SGXVTPM_PLATFORM", "gramine-sim")  # the client checks the stand-in's quotes
    with FakePccs(fresh).running() as server:
        h = Hostd(state, args=["--platform", "gramine", "--pccs", server.url])
        h.env.update(standins.env())
        h.start()
        try:
            assert json.loads(h.state.collateral.read_text()) == json.loads(fresh)
            assert (platform_dir / COLLATERAL_FILE).read_text() == h.state.collateral.read_text()
            assert "/sgx/certification/v4/tcb?fmspc=00906ED50000" in server.requests
            keyed = [line for line in h.log().splitlines() if "hostd.collateral_key" in line]
            assert len(keyed) == 1 and '"ca": "processor"' in keyed[0]
            build = state / "platform" / "gramine"
            manager = sigstruct.parse((build / "manager.sig").read_bytes())
            policy = MeasurementPolicy(mrenclaves=frozenset({manager.mrenclave}))
            vmm = VmmClient(h.state, credentials=h.credentials, policy=policy)
            assert asyncio.run(vmm.create("vm1")).state == "running"
        finally:
            h.stop()
