"""The sim platform keeps SGX's boundary (SECURITY.md properties 2-4).

- Only the sim CPU process holds the platform's secrets: hostd, the zygote and
  every enclave are scanned for them in memory.
- EINIT: an enclave runs only with a SIGSTRUCT that verifies and signs exactly
  its measured identity; MRSIGNER is the hash of the key that verified it.
- A debug enclave is refused by a default measurement policy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.helpers.echo_client import ECHO_SOURCE, call, echo_spec
from tests.helpers.hostd import Hostd

from sgxvtpm.platform import EnclaveSpec, MeasurementPolicy, PlatformError
from sgxvtpm.platform.base import is_debug
from sgxvtpm.platform.sim import SimLoader, SimPlatformDir, egetkey, mrsigner_of, sigstruct
from sgxvtpm.platform.sim.measure import attributes_of, mrenclave_of, read_code
from sgxvtpm.platform.sim.spawn import CLEAN_ENV
from sgxvtpm.vmm.client import VmmClient

pytestmark = pytest.mark.integration

# -- memory of every process but the CPU ----------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = _children(p)
        out += kids
        todo += kids
    return out


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _memory_holds(pid: int, needles: list[bytes]) -> list[bytes]:
    """Which of ``needles`` appear anywhere in ``pid``'s readable memory (we are root)."""
    found: set[bytes] = set()
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                data = os.pread(fd, end - start, start)
            except OSError:
                continue
            found.update(n for n in needles if n in data)
    finally:
        os.close(fd)
    return sorted(found)


def _platform_secrets(path: Path) -> list[bytes]:
    """The fuse key and derived base key, and the private scalars (both byte orders)."""
    platform = SimPlatformDir(path)
    fuse = (path / "fuse.key").read_bytes()
    secrets = [fuse, egetkey.derive_base_key(fuse)]
    for name in ("attestation", "signer"):
        scalar = platform._private_key(name).private_numbers().private_value.to_bytes(32, "big")
        secrets += [scalar, scalar[::-1]]
    return secrets


def test_only_the_cpu_process_holds_platform_secrets(hostd: Hostd) -> None:
    asyncio.run(VmmClient(hostd.state).create("vm1"))
    assert hostd.proc is not None
    secrets = _platform_secrets(hostd.state.platform)
    fuse = secrets[0]
    processes = {pid: _comm(pid) for pid in [hostd.proc.pid, *_descendants(hostd.proc.pid)]}
    enclaves = [pid for pid, comm in processes.items() if comm.startswith("enclave:")]
    assert len(enclaves) == 2, processes  # the manager and vm1's instance
    holders = {pid: _memory_holds(pid, secrets) for pid in processes}
    cpus = [pid for pid, found in holders.items() if fuse in found]
    # The scan finds the fuse key where it must be: in exactly one process,
    # the CPU, a direct child of hostd (hostd itself never opens the platform).
    assert len(cpus) == 1 and cpus[0] in _children(hostd.proc.pid), processes
    leaks = {processes[p]: len(found) for p, found in holders.items() if found and p != cpus[0]}
    assert leaks == {}
    # The platform's processes (CPU, zygote, enclaves) inherit nothing of
    # hostd's environment: no PYTHON*, LD_PRELOAD, LD_LIBRARY_PATH.
    for pid in _descendants(hostd.proc.pid):
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in raw if item)
        assert env == CLEAN_ENV, (processes.get(pid), sorted(env))


# -- EINIT and SIGSTRUCT ---------------------------------------------------------


@pytest.fixture(scope="module")
def echo(echo_code: Path) -> EnclaveSpec:
    return echo_spec(echo_code)


def _signed_by(key: ec.EllipticCurvePrivateKey, spec: EnclaveSpec) -> EnclaveSpec:
    mrenclave = mrenclave_of(spec.entry, read_code(spec.code_files), spec.config)
    sig = sigstruct.sign(key, mrenclave, attributes_of(spec.debug), spec.isv_prod_id, spec.isv_svn)
    return dataclasses.replace(spec, sigstruct=sig.encode())


def test_unsigned_enclave_is_refused(sim_loader: SimLoader, echo: EnclaveSpec) -> None:
    with pytest.raises(PlatformError, match="SIGSTRUCT"):
        sim_loader.launch(echo, {})


def test_forged_signature_is_refused(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo: EnclaveSpec
) -> None:
    good = sigstruct.SigStruct.decode(sim_platform.sign(echo).sigstruct)
    bad_sig = bytearray(good.signature)
    bad_sig[-1] ^= 1
    forged = dataclasses.replace(good, signature=bytes(bad_sig))
    with pytest.raises(PlatformError, match="SIGSTRUCT"):
        sim_loader.launch(dataclasses.replace(echo, sigstruct=forged.encode()), {})
    # The genuine signer's key named with another key's signature: still refused.
    stranger = ec.generate_private_key(ec.SECP256R1())
    other = sigstruct.SigStruct.decode(_signed_by(stranger, echo).sigstruct)
    spliced = dataclasses.replace(other, signer_public_key=good.signer_public_key)
    with pytest.raises(PlatformError, match="SIGSTRUCT"):
        sim_loader.launch(dataclasses.replace(echo, sigstruct=spliced.encode()), {})


def test_genuine_signature_for_other_code_is_refused(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo: EnclaveSpec, tmp_path: Path
) -> None:
    signed = sim_platform.sign(echo)
    other = tmp_path / "sim_echo_enclave.py"
    other.write_bytes(ECHO_SOURCE.read_bytes() + b"\nPAYLOAD = 1\n")
    with pytest.raises(PlatformError, match="does not sign the measured enclave"):
        sim_loader.launch(dataclasses.replace(signed, code_files=[other]), {})
    with pytest.raises(PlatformError, match="does not sign the measured enclave"):
        sim_loader.launch(dataclasses.replace(signed, isv_svn=signed.isv_svn + 1), {})


def test_mrsigner_is_the_key_that_verified(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo: EnclaveSpec
) -> None:
    """Code signed by someone else runs, but as that signer: none of our signer's keys."""
    stranger = ec.generate_private_key(ec.SECP256R1())
    genuine = sim_loader.launch(sim_platform.sign(echo), {})
    foreign = sim_loader.launch(_signed_by(stranger, echo), {})
    try:
        assert genuine.identity.mrsigner == mrsigner_of(sim_platform.signer_public_key)
        assert foreign.identity.mrsigner != genuine.identity.mrsigner
        assert foreign.identity.mrenclave == genuine.identity.mrenclave
        assert call(foreign.stream, b"K") != call(genuine.stream, b"K")
    finally:
        genuine.stop()
        foreign.stop()


def test_debug_enclave_is_refused_by_default_policy(
    sim_platform: SimPlatformDir, sim_loader: SimLoader, echo: EnclaveSpec
) -> None:
    handle = sim_loader.launch(sim_platform.sign(dataclasses.replace(echo, debug=True)), {})
    try:
        quoted = sim_platform.verifier().verify(call(handle.stream, b"Q" + bytes(64))).identity
    finally:
        handle.stop()
    assert is_debug(quoted)
    policy = MeasurementPolicy(mrenclaves=frozenset({quoted.mrenclave}))
    assert not policy.accepts(quoted)
    assert dataclasses.replace(policy, allow_debug=True).accepts(quoted)
    by_signer = MeasurementPolicy(mrsigner=quoted.mrsigner, isv_prod_id=7, min_isv_svn=0)
    assert not by_signer.accepts(quoted)
