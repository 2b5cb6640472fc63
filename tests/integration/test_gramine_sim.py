"""gramine-sim: the Gramine enclave code path on the sim platform (platform/sim/gramine_sim.py).

First the /dev/attestation tree and the EGETKEY helper, answered by a real
sim CPU ENCLU thread, against what the sim platform itself computes; then
hostd --platform gramine-sim end to end: the manager and an instance, each
its own stand-in process, and TPM commands over K2.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.helpers.hostd import running_hostd

from sgxvtpm.endpoint.k2 import K2Client
from sgxvtpm.platform import dcap
from sgxvtpm.platform.base import (
    AttestationError,
    EnclaveIdentity,
    KeyName,
    KeyPolicy,
    KeyRequest,
    PlatformError,
    TargetInfo,
)
from sgxvtpm.platform.gramine.attestation import AttestationFiles, GramineEnclavePlatform
from sgxvtpm.platform.gramine.structs import pack_key_request
from sgxvtpm.platform.sim.cpu import serve_enclu
from sgxvtpm.platform.sim.enclu import SimEnclaveClient
from sgxvtpm.platform.sim.gramine_sim import AttestationTree, SimEgetkey
from sgxvtpm.platform.sim.platform_dir import SimPlatformDir
from sgxvtpm.platform.sim.quote import SimQuoteVerifier
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU
from sgxvtpm.tpm.nv import execute

pytestmark = pytest.mark.integration

ME = EnclaveIdentity(b"\x11" * 32, b"\x22" * 32, 2, 3, attributes=bytes([0x05]) + bytes(15))
PEER = EnclaveIdentity(b"\x33" * 32, b"\x22" * 32, 1, 3, attributes=bytes([0x05]) + bytes(15))


@pytest.fixture
def gramine(sim_platform: SimPlatformDir) -> Iterator[tuple[GramineEnclavePlatform, Path]]:
    """A GramineEnclavePlatform over an attestation tree served for ``ME`` by a sim ENCLU thread."""
    cpu_end, enclave_end = socket.socketpair()
    thread = threading.Thread(
        target=serve_enclu, args=(cpu_end, sim_platform.enclave_platform(ME)), daemon=True
    )
    thread.start()
    client = SimEnclaveClient(enclave_end)
    tree = AttestationTree(client)
    root = x509.load_pem_x509_certificate(sim_platform.root_certificate_pem)
    verifier = dcap.DcapQuoteVerifier(
        dcap.load_collateral(sim_platform.dcap_collateral()),
        root.public_bytes(serialization.Encoding.DER),
    )
    platform = GramineEnclavePlatform(
        AttestationFiles(tree.root), verifier=verifier, egetkey=SimEgetkey(client), counters=client
    )
    try:
        yield platform, tree.root
    finally:
        tree.close()
        enclave_end.close()
        thread.join(5)


def test_tree_is_laid_out_as_gramine_documents(
    gramine: tuple[GramineEnclavePlatform, Path],
) -> None:
    _, root = gramine
    names = {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}
    assert names == {
        "attestation_type", "my_target_info", "user_report_data", "target_info", "report",
        "quote", "keys/_sgx_mrenclave", "keys/_sgx_mrsigner",
    }
    assert (root / "attestation_type").read_bytes() == b"dcap"
    # Reading a file twice gives it twice, whole (EOF after each read).
    assert len((root / "my_target_info").read_bytes()) == 512
    assert len((root / "my_target_info").read_bytes()) == 512


def test_identity_comes_from_the_report(gramine: tuple[GramineEnclavePlatform, Path]) -> None:
    platform, _ = gramine
    assert platform.identity == ME


def test_quote_is_over_user_report_data(
    gramine: tuple[GramineEnclavePlatform, Path], sim_platform: SimPlatformDir
) -> None:
    platform, root = gramine
    data = os.urandom(64)
    quote = platform.quote(data)
    verified = SimQuoteVerifier(sim_platform.root_certificate_pem).verify(quote)
    assert verified.report_data == data and verified.identity == ME
    # ... and through dcap-qvl, as the enclave checks its peers.
    assert platform.quote_verifier().verify(quote).report_data == data
    # By hand, as an application under Gramine does it: write, then read.
    other = os.urandom(64)
    (root / "user_report_data").write_bytes(other)
    assert SimQuoteVerifier(sim_platform.root_certificate_pem).verify(
        (root / "quote").read_bytes()
    ).report_data == other


def test_report_with_target_info_verifies_at_the_target(
    gramine: tuple[GramineEnclavePlatform, Path], sim_platform: SimPlatformDir
) -> None:
    platform, _ = gramine
    target = sim_platform.enclave_platform(PEER)
    data = os.urandom(64)
    report = platform.report(TargetInfo(PEER.mrenclave, PEER.attributes), data)
    body = target.verify_report(report)
    assert body.identity == ME and body.report_data == data


def test_verify_report_uses_the_egetkey_helper(
    gramine: tuple[GramineEnclavePlatform, Path], sim_platform: SimPlatformDir
) -> None:
    platform, _ = gramine
    peer = sim_platform.enclave_platform(PEER)
    report = peer.report(TargetInfo(ME.mrenclave, ME.attributes), b"\x5a" * 64)
    assert platform.verify_report(report).identity == PEER
    for i in (0, 100, 383, 400, 431):
        bad = bytearray(report)
        bad[i] ^= 1
        with pytest.raises(AttestationError):
            platform.verify_report(bytes(bad))
    # A report for another target does not verify here.
    other = peer.report(TargetInfo(b"\x44" * 32, ME.attributes), b"\x5a" * 64)
    with pytest.raises(AttestationError):
        platform.verify_report(other)


@pytest.mark.parametrize("policy", [KeyPolicy.MRENCLAVE, KeyPolicy.MRSIGNER])
def test_keys_files_are_egetkey_with_gramines_key_request(
    gramine: tuple[GramineEnclavePlatform, Path], sim_platform: SimPlatformDir, policy: KeyPolicy
) -> None:
    platform, root = gramine
    name = "_sgx_mrenclave" if policy is KeyPolicy.MRENCLAVE else "_sgx_mrsigner"
    request = KeyRequest(KeyName.SEAL, policy, isv_svn=ME.isv_svn)
    expected = sim_platform.enclave_platform(ME).get_key(request)
    assert (root / "keys" / name).read_bytes() == expected
    assert platform.get_key(request) == expected  # served from keys/
    # The helper gives the same key for the same KEYREQUEST.
    assert helper_of(platform).egetkey(pack_key_request(request)) == expected


def helper_of(platform: GramineEnclavePlatform) -> SimEgetkey:
    helper = platform._egetkey
    assert isinstance(helper, SimEgetkey)
    return helper


def test_old_svn_keys_go_through_the_helper(
    gramine: tuple[GramineEnclavePlatform, Path], sim_platform: SimPlatformDir
) -> None:
    platform, _ = gramine
    sim = sim_platform.enclave_platform(ME)
    for svn in (0, 1, 2):
        request = KeyRequest(KeyName.SEAL, KeyPolicy.MRSIGNER, isv_svn=svn)
        assert platform.get_key(request) == sim.get_key(request)
    with pytest.raises(PlatformError, match="ISVSVN"):
        platform.get_key(dataclasses.replace(request, isv_svn=ME.isv_svn + 1))
    with pytest.raises(PlatformError, match="KEYREQUEST"):
        helper_of(platform).egetkey(b"\x04" + bytes(510))


def test_without_a_helper_other_keys_are_refused(
    gramine: tuple[GramineEnclavePlatform, Path],
) -> None:
    platform, _ = gramine
    platform._egetkey = None
    with pytest.raises(PlatformError, match="no EGETKEY helper"):
        platform.get_key(KeyRequest(KeyName.SEAL, KeyPolicy.MRSIGNER, isv_svn=0))
    assert len(platform.get_key(KeyRequest(KeyName.SEAL, KeyPolicy.MRSIGNER, isv_svn=3))) == 16


def test_hostd_gramine_sim_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGXVTPM_PLATFORM", "gramine-sim")
    with running_hostd(tmp_path / "state", args=["--platform", "gramine-sim"]) as h:
        info = asyncio.run(h.vmm().create("vm1"))
        assert info.state == "running" and isinstance(info.pid, int)
        # One stand-in process per enclave, started by the sim CPU (no zygote).
        cmdline = Path(f"/proc/{info.pid}/cmdline").read_bytes().split(b"\0")
        assert b"sgxvtpm.platform.sim.gramine_sim" in cmdline
        assert b"sgxvtpm.enclaves.instance:main" in cmdline
        with K2Client(h.binding("vm1")) as client:
            client.power_on()
            execute(client.transact, wire.startup(TPM2_SU.CLEAR))
            assert len(wire.parse_get_random(execute(client.transact, wire.get_random(16)))) == 16
            digest = hashlib.sha256(b"gramine-sim").digest()
            execute(client.transact, wire.pcr_extend(16, digest))
            values = wire.parse_pcr_read(execute(client.transact, wire.pcr_read([16])))
        assert values.digests == [hashlib.sha256(bytes(32) + digest).digest()]
        # The sealed state went through keys/_sgx_mrsigner-derived sealing: not in the clear.
        sealed = list((tmp_path / "state").rglob("state.sealed"))
        assert sealed and all(b"gramine-sim" not in p.read_bytes() for p in sealed)


def test_repeated_exchanges_never_mix(gramine: tuple[GramineEnclavePlatform, Path]) -> None:
    """Each read of a pseudo-file is one whole answer to the last write (the pipes' races)."""
    platform, _ = gramine
    verifier = platform.quote_verifier()
    for _ in range(30):
        data = os.urandom(64)
        assert verifier.verify(platform.quote(data)).report_data == data
        report = platform.report(TargetInfo(ME.mrenclave, ME.attributes), data)
        assert platform.verify_report(report).report_data == data
