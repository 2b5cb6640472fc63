"""hostd --counters tpm: the enclaves keep their rollback counters in a host TPM.

A real swtpm (Debian's) is the host's TPM, with an RSA EK made persistent at
0x81010001 (TCG's EK handle); hostd relays the enclaves' TPM commands to it
(TPM frames on each enclave's stream). On the sim and on gramine-sim: VM
NV writes advance the instance's counter *in the swtpm* (read here with
tpm2-pytss, with the counter's authValue as the enclave derives it); a
kill -9'd instance resumes its state; a sealed file rolled back behind a
kill is refused; a counter index undefined in the host TPM (and the swtpm
restarted) is refused as a missing counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers.hostd import Hostd, running_hostd
from tests.helpers.swtpm import Swtpm
from tests.helpers.vmtools import NV_ATTRS

from sgxvtpm.enclaves.sealing import Sealer, SealError, SealKind
from sgxvtpm.enclaves.specs import INSTANCE_PROD_ID, ISV_SVN
from sgxvtpm.endpoint.k2 import K2Client
from sgxvtpm.platform.base import (
    EnclaveIdentity,
    EnclavePlatform,
    KeyName,
    KeyPolicy,
    KeyRequest,
    PlatformError,
)
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.platform.sim.measure import ENCLAVE_ATTRIBUTES
from sgxvtpm.platform.tpm_counters import (
    PIN_FILE,
    CountersRefused,
    TpmCountedPlatform,
    TpmCounters,
    counter_secret,
    load_or_pin,
    open_host_counters,
)
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_RH, TPM2_SU
from sgxvtpm.tpm.nv import execute
from sgxvtpm.tpm.nvcounter import HostTpmCounters, pin_key

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("swtpm") is None, reason="Debian's swtpm is not installed"),
]

EK_HANDLE = 0x81010001
VM_INDEX = 0x01500002


def _host_tpm(directory: Path, state: Path) -> Swtpm:
    directory.mkdir(exist_ok=True)
    return Swtpm(directory, state=state)


@pytest.fixture
def host_tpm(tmp_path: Path) -> Iterator[Swtpm]:
    tpm = _host_tpm(tmp_path / "host-tpm", tmp_path / "host-tpm-state")
    tpm.persistent_primary(wire.rsa2048_template(), TPM2_RH.ENDORSEMENT, EK_HANDLE)
    yield tpm
    tpm.close()


def _vm_info(h: Hostd, name: str) -> dict[str, str]:
    info: dict[str, str] = json.loads((h.vm_dir(name) / "instance.json").read_text())
    return info


def _write_nv(h: Hostd, data: bytes, define: bool = False) -> None:
    with K2Client(h.binding("vm1")) as t:
        t.power_on()
        response = t.transact(wire.startup(TPM2_SU.CLEAR))
        assert wire.response_code(response) in (0, 0x100)  # started, or already
        if define:
            execute(t.transact, wire.nv_define_space(VM_INDEX, 8, NV_ATTRS))
        execute(t.transact, wire.nv_write(VM_INDEX, data))


def _read_nv(h: Hostd) -> bytes:
    deadline = time.monotonic() + 30
    while True:
        try:
            with K2Client(h.binding("vm1")) as t:
                t.power_on()
                t.transact(wire.startup(TPM2_SU.CLEAR))
                return wire.parse_nv_read(execute(t.transact, wire.nv_read(VM_INDEX, 8)))
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _pytss_counter(h: Hostd, tpm: Swtpm, name: str) -> int:
    """The instance's counter as tpm2-pytss reads it from the host TPM."""
    from tpm2_pytss import ESAPI, TCTILdr
    from tpm2_pytss.types import TPM2B_AUTH

    info = asyncio.run(h.vmm().show(name))
    identity = EnclaveIdentity(
        bytes.fromhex(info.mrenclave), bytes.fromhex(info.mrsigner), INSTANCE_PROD_ID, ISV_SVN,
        attributes=ENCLAVE_ATTRIBUTES,
    )
    platform = SimPlatformDir.open_or_create(h.state.platform).enclave_platform(identity)
    counters = HostTpmCounters(tpm.transact, EK_HANDLE, b"", counter_secret(platform))
    counter = f"instance_state:{info.instance_id}"
    index = counters.index(counter)
    with ESAPI(TCTILdr("swtpm", f"path={tpm.path}")) as esys:
        handle = esys.tr_from_tpmpublic(index)
        esys.tr_set_auth(handle, TPM2B_AUTH(counters._auth(counter)))
        data = esys.nv_read(handle, 8, 0, auth_handle=handle)
        return int.from_bytes(bytes(data), "big")


def _instance_pid(h: Hostd) -> int:
    pid = asyncio.run(h.vmm().show("vm1")).pid
    assert isinstance(pid, int)
    return pid


def _kill_instance(h: Hostd) -> None:
    pid = _instance_pid(h)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while asyncio.run(h.vmm().show("vm1")).pid in (pid, None):
        assert time.monotonic() < deadline, "the instance was not relaunched"
        time.sleep(0.1)


def _refused(h: Hostd, reason: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        shown = asyncio.run(h.vmm().show("vm1"))
        if shown.state == "error" and reason in shown.reason:
            return shown.reason
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)


PLATFORMS = ["sim", "gramine-sim"]


@contextlib.contextmanager
def _hostd_with_vm1(
    tmp_path: Path, host_tpm: Swtpm, platform: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Hostd]:
    """hostd on ``platform`` with its counters in ``host_tpm``, and a VM ``vm1`` created."""
    monkeypatch.setenv("SGXVTPM_PLATFORM", platform)
    args = ["--platform", platform, "--counters", f"tpm:{host_tpm.tcti}"]
    with running_hostd(tmp_path / "state", args=args) as h:
        asyncio.run(h.vmm().create("vm1"))
        yield h


@pytest.mark.parametrize("platform", PLATFORMS)
def test_hostd_counters_in_a_host_tpm(
    tmp_path: Path, host_tpm: Swtpm, platform: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _hostd_with_vm1(tmp_path, host_tpm, platform, monkeypatch) as h:
        state_dir = h.state.instance(_vm_info(h, "vm1")["instance_id"])
        assert (state_dir / PIN_FILE).exists()  # pinned at first start, sealed
        ek_name = pin_key(host_tpm.transact, EK_HANDLE)
        assert ek_name not in (state_dir / PIN_FILE).read_bytes()  # not in the clear
        _write_nv(h, b"first..!", define=True)
        before = _pytss_counter(h, host_tpm, "vm1")
        _write_nv(h, b"second!!")
        after = _pytss_counter(h, host_tpm, "vm1")
        assert after > before  # each NV commit moved the counter in the host TPM
        old = (state_dir / "state.sealed").read_bytes()

        _kill_instance(h)  # kill -9: the state resumes from the sealed file
        assert _read_nv(h) == b"second!!"

        _write_nv(h, b"third!!!")
        assert _pytss_counter(h, host_tpm, "vm1") > after
        (state_dir / "state.sealed").write_bytes(old)  # rolled back behind the instance
        _kill_instance(h)
        _refused(h, "older than the platform counter")
        assert "older than the platform counter" in h.log()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_undefined_host_counter_is_refused_as_missing(
    tmp_path: Path, host_tpm: Swtpm, platform: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _hostd_with_vm1(tmp_path, host_tpm, platform, monkeypatch) as h:
        _write_nv(h, b"data....", define=True)
        info = asyncio.run(h.vmm().show("vm1"))
        # The host's owner undefines the instance's counter index, then its TPM restarts.
        from tpm2_pytss import ESAPI, TCTILdr
        from tpm2_pytss.constants import ESYS_TR

        listed = subprocess.run(
            ["tpm2_getcap", "-T", host_tpm.tcti, "handles-nv-index"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        indices = [int(line.strip("- "), 16) for line in listed.split() if line.strip("- ")]
        assert len(indices) >= 2  # the manager's registry counter and the instance's
        identity = EnclaveIdentity(
            bytes.fromhex(info.mrenclave), bytes.fromhex(info.mrsigner), INSTANCE_PROD_ID, ISV_SVN,
            attributes=ENCLAVE_ATTRIBUTES,
        )
        platform_face = SimPlatformDir.open_or_create(h.state.platform).enclave_platform(identity)
        index = HostTpmCounters(
            host_tpm.transact, EK_HANDLE, b"", counter_secret(platform_face)
        ).index(f"instance_state:{info.instance_id}")
        assert index in indices
        with ESAPI(TCTILdr("swtpm", f"path={host_tpm.path}")) as esys:
            esys.nv_undefine_space(esys.tr_from_tpmpublic(index), auth_handle=ESYS_TR.OWNER)
        host_tpm.close()
        restarted = _host_tpm(tmp_path / "host-tpm", tmp_path / "host-tpm-state")
        try:
            _kill_instance(h)
            _refused(h, "platform counter unavailable")
        finally:
            restarted.close()


# ------------------------------------------------------------ the pin's rules


@pytest.fixture
def enclave_face(fresh_sim_platform: SimPlatformDir) -> EnclavePlatform:
    identity = EnclaveIdentity(b"\x01" * 32, b"\x02" * 32, INSTANCE_PROD_ID, ISV_SVN)
    return fresh_sim_platform.enclave_platform(identity)


def test_pin_is_sealed_at_first_start_and_kept(
    tmp_path: Path, host_tpm: Swtpm, enclave_face: EnclavePlatform
) -> None:
    state_dir = tmp_path / "enclave"
    state_dir.mkdir()
    config = load_or_pin(enclave_face, host_tpm.transact, state_dir, EK_HANDLE)
    assert config.key_name == pin_key(host_tpm.transact, EK_HANDLE)
    (state_dir / "state.sealed").write_bytes(b"sealed state")
    # The next start finds the pin: the host's handle no longer matters.
    again = load_or_pin(enclave_face, host_tpm.transact, state_dir, 0x81000099)
    assert (again.key_handle, again.key_name) == (EK_HANDLE, config.key_name)


@pytest.fixture
def pinned(tmp_path: Path, host_tpm: Swtpm, enclave_face: EnclavePlatform) -> Path:
    """An enclave's state directory, pinned to the host TPM's key at EK_HANDLE."""
    state_dir = tmp_path / "enclave"
    state_dir.mkdir()
    load_or_pin(enclave_face, host_tpm.transact, state_dir, EK_HANDLE)
    return state_dir


def test_removed_or_damaged_pin_is_refused(
    host_tpm: Swtpm, enclave_face: EnclavePlatform, pinned: Path
) -> None:
    state_dir = pinned
    (state_dir / "state.sealed").write_bytes(b"sealed state")
    pin = state_dir / PIN_FILE
    blob = bytearray(pin.read_bytes())
    blob[-1] ^= 1
    pin.write_bytes(bytes(blob))
    with pytest.raises(PlatformError, match="does not open"):
        load_or_pin(enclave_face, host_tpm.transact, state_dir, EK_HANDLE)
    pin.unlink()  # sealed state but no pin: pinning again would trust any TPM
    with pytest.raises(PlatformError, match="no host TPM pin"):
        load_or_pin(enclave_face, host_tpm.transact, state_dir, EK_HANDLE)
    assert not pin.exists()


def test_a_pinned_enclave_refuses_other_counters(
    tmp_path: Path, host_tpm: Swtpm, enclave_face: EnclavePlatform, pinned: Path
) -> None:
    state_dir = pinned
    a, b = socket.socketpair()
    with a, b, pytest.raises(CountersRefused, match="--counters tpm"):
        open_host_counters(enclave_face, a, {"state_dir": str(state_dir)})
    with a, b, pytest.raises(CountersRefused, match="need the enclave's state_dir"):
        open_host_counters(enclave_face, a, {"tpm_counters": {"key_handle": EK_HANDLE}})
    # Without a pin and without the launch argument: the platform's own counters.
    other = tmp_path / "other"
    other.mkdir()
    with a, b:
        platform, stream, tap = open_host_counters(enclave_face, a, {"state_dir": str(other)})
    assert (platform, stream, tap) == (enclave_face, a, None)


@pytest.mark.parametrize(
    ("counters", "says"),
    [
        ("tpm:/nonexistent/tpmrm0", "cannot open the host TPM /nonexistent/tpmrm0"),
        ("tpm:mssim:port=2321", "unknown host TPM 'mssim:port=2321'"),
        ("tpm2", "--counters 'tpm2': give sim, or tpm:"),
    ],
)
def test_a_bad_counters_option_is_one_line(tmp_path: Path, counters: str, says: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sgxvtpm.cli", "hostd", "--state-dir", str(tmp_path / "s"),
         "--counters", counters],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"sgxvtpm: error: {says}"), done.stderr


def test_seal_keys_are_bound_to_the_pin(enclave_face: EnclavePlatform) -> None:
    """What is sealed under one pinned TPM key opens under no other (SECURITY.md)."""
    counters = TpmCounters(HostTpmCounters(lambda c: b"", EK_HANDLE, b"", bytes(32)))
    seal = KeyRequest(KeyName.SEAL, KeyPolicy.MRSIGNER, isv_svn=ISV_SVN)
    report = KeyRequest(KeyName.REPORT)
    pinned_a = TpmCountedPlatform(enclave_face, counters, bind=b"\x00\x0bname-a")
    pinned_b = TpmCountedPlatform(enclave_face, counters, bind=b"\x00\x0bname-b")
    keys = {p.get_key(seal) for p in (enclave_face, pinned_a, pinned_b)}
    assert len(keys) == 3 and all(len(k) == len(enclave_face.get_key(seal)) for k in keys)
    assert pinned_a.get_key(seal) == TpmCountedPlatform(
        enclave_face, counters, bind=b"\x00\x0bname-a"
    ).get_key(seal)
    assert pinned_a.get_key(report) == pinned_b.get_key(report) == enclave_face.get_key(report)
    blob = Sealer(pinned_a, SealKind.INSTANCE_STATE, "i1").seal(b"state", 1, "vm1")
    assert Sealer(pinned_a, SealKind.INSTANCE_STATE, "i1").unseal(blob)[1] == b"state"
    with pytest.raises(SealError):
        Sealer(pinned_b, SealKind.INSTANCE_STATE, "i1").unseal(blob)


def test_the_manager_refuses_without_its_counters_or_its_pin(
    tmp_path: Path, host_tpm: Swtpm
) -> None:
    """hostd says why in one line: run without --counters tpm: after using it, or with the
    manager's pin removed (its registry stays sealed to the pinned TPM)."""
    state = tmp_path / "state"
    args = ["--counters", f"tpm:{host_tpm.tcti}"]
    h = Hostd(state, args=args)
    h.start()
    h.stop()
    pin = h.state.manager / PIN_FILE
    assert pin.exists() and (h.state.manager / "registry.sealed").exists()
    h.args = []  # the sim counters: refused, the registry's counter is in the host TPM
    with pytest.raises(RuntimeError, match="counters are in the host's TPM"):
        h.start()
    pin.unlink()
    h.args = args
    with pytest.raises(RuntimeError, match="holds sealed state but no host TPM pin"):
        h.start()
    assert "manager.counters_refused" in h.log()
