"""EK manufacturing over a raw socket into Debian's swtpm, read back by tpm2-tools and openssl.

Also the golden comparison with swtpm_setup 0.7.1: our templates give the
very keys its EKs have, at the same handles and NV indices, with the same NV
attributes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.helpers.ek_ca import POLICY, ManagerCa, manager_ca, pem
from tests.helpers.ek_tools import attestation_round, run_tool, tss_public_spki
from tests.helpers.swtpm import Swtpm, swtpm_setup

from sgxvtpm.attest import verify_ek_chain
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_RC, TPM2_RH
from sgxvtpm.tpm.ek import (
    PLATFORM_CERT_NV_INDEX,
    Manufactured,
    create_ek,
    manufacture,
    profile,
    read_ek_certificate,
    read_ek_public,
)
from sgxvtpm.tpm.nv import read_all, read_nv_public

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (shutil.which("swtpm") and shutil.which("tpm2_getekcertificate")),
        reason="needs swtpm and tpm2-tools",
    ),
]

# TPMA_NV as tpm2_nvreadpublic shows them: swtpm_setup's attributes, WRITTEN, WRITELOCKED.
WRITTEN_LOCKED = 0x62072801


def _spki(cert_der: bytes) -> bytes:
    return (
        x509.load_der_x509_certificate(cert_der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@dataclass
class Made:
    tpm: Swtpm
    ca: ManagerCa
    made: Manufactured
    dir: Path


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Made]:
    d = tmp_path_factory.mktemp("ek-swtpm")
    ca = manager_ca(d / "platform")
    with Swtpm(d) as tpm:
        result = manufacture(
            tpm.transact, ["rsa2048", "ecc-p256"], ca.sign_ek,
            platform_cert=ca.sign_platform, pcr_banks=["sha256", "sha384"],
        )  # fmt: skip
        tpm.reset()  # PCR_Allocate takes effect at the next TPM reset
        (d / "ca.pem").write_bytes(ca.cert_pem)
        yield Made(tpm, ca, result, d)


def test_tpm2_getekcertificate_returns_our_certificates(made: Made) -> None:
    run_tool(made.tpm.tcti, "tpm2_getekcertificate", "-o", "rsa.der", "-o", "ecc.der", cwd=made.dir)
    assert (made.dir / "rsa.der").read_bytes() == made.made.ek_certificates["rsa2048"]
    assert (made.dir / "ecc.der").read_bytes() == made.made.ek_certificates["ecc-p256"]


@pytest.mark.parametrize(("index", "alg"), [("0x01c00002", "rsa2048"), ("0x01c0000a", "ecc-p256")])
def test_tpm2_nvread_and_attributes(made: Made, index: str, alg: str) -> None:
    out = made.dir / f"nv-{alg}.der"
    run_tool(made.tpm.tcti, "tpm2_nvread", index, "-C", "o", "-o", str(out), cwd=made.dir)
    assert out.read_bytes() == made.made.ek_certificates[alg]
    shown = run_tool(made.tpm.tcti, "tpm2_nvreadpublic", index, cwd=made.dir).stdout.decode()
    assert re.search(r"value: 0x62072801", shown), shown
    assert read_nv_public(made.tpm.transact, int(index, 16)).attributes == WRITTEN_LOCKED


def test_certificates_are_write_locked(made: Made) -> None:
    index = profile("rsa2048").nv_index
    cmd = wire.nv_write(index, b"\0" * 8, 0, auth_handle=TPM2_RH.PLATFORM)
    assert wire.response_code(made.tpm.transact(cmd)) == TPM2_RC.NV_LOCKED
    assert read_ek_certificate(made.tpm.transact, "rsa2048") == made.made.ek_certificates["rsa2048"]


def test_platform_certificate_stored(made: Made) -> None:
    assert made.made.platform_certificate is not None
    assert read_all(made.tpm.transact, PLATFORM_CERT_NV_INDEX) == made.made.platform_certificate
    assert read_nv_public(made.tpm.transact, PLATFORM_CERT_NV_INDEX).attributes == WRITTEN_LOCKED


@pytest.mark.parametrize("alg", ["rsa2048", "ecc-p256"])
def test_openssl_verify_accepts_with_manager_ca(made: Made, alg: str, tmp_path: Path) -> None:
    ek_pem = tmp_path / "ek.pem"
    ek_pem.write_bytes(pem(made.made.ek_certificates[alg]))
    ok = subprocess.run(
        ["openssl", "verify", "-CAfile", str(made.dir / "ca.pem"), str(ek_pem)], capture_output=True
    )
    assert ok.returncode == 0, ok.stderr
    assert b": OK" in ok.stdout
    stranger = manager_ca(made.dir / "platform")
    (tmp_path / "other.pem").write_bytes(stranger.cert_pem)
    bad = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "other.pem"), str(ek_pem)],
        capture_output=True,
    )
    assert bad.returncode != 0


@pytest.mark.parametrize(("tool_alg", "alg"), [("rsa", "rsa2048"), ("ecc", "ecc-p256")])
def test_tpm2_createek_gives_the_certified_key(made: Made, tool_alg: str, alg: str) -> None:
    pub = f"createek-{tool_alg}.pub"
    run_tool(
        made.tpm.tcti,
        "tpm2_createek",
        "-c",
        f"ek-{tool_alg}.ctx",
        "-G",
        tool_alg,
        "-u",
        pub,
        cwd=made.dir,
    )
    run_tool(made.tpm.tcti, "tpm2_flushcontext", "-t", cwd=made.dir)
    assert tss_public_spki(made.dir / pub) == _spki(made.made.ek_certificates[alg])


def test_persistent_handles(made: Made) -> None:
    shown = run_tool(
        made.tpm.tcti, "tpm2_getcap", "handles-persistent", cwd=made.dir
    ).stdout.decode()
    assert shown.split() == ["-", "0x81010001", "-", "0x81010002"]
    for ek in made.made.eks:
        assert read_ek_public(made.tpm.transact, ek.alg) == ek


def test_pcr_banks_allocated_after_reset(made: Made) -> None:
    shown = run_tool(made.tpm.tcti, "tpm2_getcap", "pcrs", cwd=made.dir).stdout.decode()
    banks = dict(re.findall(r"- (\w+): \[(.*?)\]", shown))
    assert banks["sha256"].strip().startswith("0, 1, 2")
    assert banks["sha384"].strip().startswith("0, 1, 2")
    assert banks["sha1"].strip() == "" and banks["sha512"].strip() == ""


def test_attest_verify_with_ek_read_from_tpm(made: Made) -> None:
    for alg, cert in made.made.ek_certificates.items():
        report = verify_ek_chain(
            cert, made.ca.cert_der, policy=POLICY, verifier=made.ca.verifier(),
            ek_public=read_ek_public(made.tpm.transact, alg),
        )  # fmt: skip
        assert report.ok, report.render()


def test_remote_attestation_round_with_tpm2_tools(made: Made) -> None:
    result = attestation_round(made.tpm.tcti, made.dir / "round")
    assert result.activated == result.secret
    assert result.quote_checked
    assert result.wrong_nonce_rejected
    # the EK the verifier encrypted to is the certified one
    assert result.ek_spki == _spki(made.made.ek_certificates["rsa2048"])


# ---------------------------------------------------------------- swtpm_setup golden


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("swtpm-setup")
    swtpm_setup(d / "state-2048", d)
    swtpm_setup(d / "state-3072", d, "--rsa-keysize", "3072")
    return d


@pytest.mark.parametrize(
    ("state", "algs"),
    [("state-2048", ["rsa2048", "ecc-p384"]), ("state-3072", ["rsa3072", "ecc-p384"])],
)
def test_templates_give_swtpm_setup_keys(setup_dirs: Path, state: str, algs: list[str]) -> None:
    run = setup_dirs / f"run-{state}"
    run.mkdir()
    with Swtpm(run, state=setup_dirs / state) as tpm:
        handles = run_tool(tpm.tcti, "tpm2_getcap", "handles-persistent", cwd=run).stdout.decode()
        indices = run_tool(tpm.tcti, "tpm2_getcap", "handles-nv-index", cwd=run).stdout.decode()
        for alg in algs:
            prof = profile(alg)
            theirs = read_ek_public(tpm.transact, alg)  # at the handle we expect
            ours = create_ek(tpm.transact, alg, persist=False)
            assert ours.public_area == theirs.public_area, alg
            assert f"0x{prof.handle:X}" in handles
            assert f"0x{prof.nv_index:X}" in indices.upper().replace("0X", "0x")
            nv = read_nv_public(tpm.transact, prof.nv_index)
            assert nv.attributes == 0x62072001  # swtpm_setup without --lock-nvram: not locked
            cert = read_ek_certificate(tpm.transact, alg)
            assert _spki(cert) == _spki_key(theirs.public_key)
        assert read_nv_public(tpm.transact, PLATFORM_CERT_NV_INDEX).attributes == 0x62072001


def _spki_key(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_our_high_range_eks_land_where_swtpm_setup_puts_them(tmp_path: Path) -> None:
    ca = manager_ca(tmp_path / "platform")
    with Swtpm(tmp_path) as tpm:
        made = manufacture(tpm.transact, ["rsa3072", "ecc-p384"], ca.sign_ek)
        handles = run_tool(
            tpm.tcti, "tpm2_getcap", "handles-persistent", cwd=tmp_path
        ).stdout.decode()
        assert handles.split() == ["-", "0x81010016", "-", "0x8101001C"]
        for alg in ("rsa3072", "ecc-p384"):
            assert read_ek_certificate(tpm.transact, alg) == made.ek_certificates[alg]
            report = verify_ek_chain(
                made.ek_certificates[alg], ca.cert_der, policy=POLICY, verifier=ca.verifier(),
                ek_public=read_ek_public(tpm.transact, alg),
            )  # fmt: skip
            assert report.ok, report.render()
