"""tpm2-tools against any TPM reachable by a TCTI string (swtpm, mssim, sgxvtpm's endpoint).

:func:`attestation_round` is the full remote-attestation exchange a verifier
runs with a TPM, done with tpm2-tools only:

1. ``tpm2_createek`` - the EK (from the TCG template; same key as the persistent one);
2. ``tpm2_createak`` - a restricted RSA signing key under the EK;
3. ``tpm2_makecredential -T none`` - the verifier, off-TPM, encrypts a secret
   to the EK public key, bound to the AK's name;
4. ``tpm2_activatecredential`` - only the TPM holding both keys recovers it
   (EK use authorized by PolicySecret(TPM_RH_ENDORSEMENT));
5. ``tpm2_pcrextend`` then ``tpm2_quote`` with a verifier nonce;
6. ``tpm2_checkquote`` - signature, nonce and PCR digest checked off-TPM;
   the same check with a wrong nonce must fail.

Without a resource manager every tool leaves its transient objects and
sessions in the TPM, so each step is followed by ``tpm2_flushcontext -t/-s``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from sgxvtpm.tpm.ek import public_key_from_tpmt


class ToolError(AssertionError):
    """A tpm2-tools command failed; the message holds its stderr."""


def run_tool(
    tcti: str | None, *argv: str, cwd: Path, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Run one tpm2-tools command with ``-T tcti``.

    ``None`` gives ``-T none`` (tools that may use a TPM, e.g. makecredential);
    ``""`` gives no -T at all (tpm2_checkquote refuses the option).
    """
    env = dict(os.environ)
    env.pop("TPM2TOOLS_TCTI", None)
    tcti_args = [] if tcti == "" else ["-T", tcti or "none"]
    cmd = [argv[0], *tcti_args, *argv[1:]]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=60)
    if check and proc.returncode != 0:
        raise ToolError(
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    return proc


def flush(tcti: str, cwd: Path) -> None:
    run_tool(tcti, "tpm2_flushcontext", "-t", cwd=cwd)
    run_tool(tcti, "tpm2_flushcontext", "-s", cwd=cwd)


def tss_public_spki(path: Path) -> bytes:
    """DER SubjectPublicKeyInfo of a TSS TPM2B_PUBLIC file (tpm2_createek -u)."""
    data = path.read_bytes()
    size = int.from_bytes(data[:2], "big")
    key = public_key_from_tpmt(data[2 : 2 + size])
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class RoundResult:
    ek_spki: bytes  # the EK tpm2_createek made, as DER SPKI
    ak_name: bytes
    secret: bytes
    activated: bytes  # what tpm2_activatecredential recovered
    quote_checked: bool  # tpm2_checkquote accepted the right nonce
    wrong_nonce_rejected: bool  # and refused a wrong one


def attestation_round(tcti: str, workdir: Path, *, ek_alg: str = "rsa") -> RoundResult:
    """Run steps 1-6 above against the TPM at ``tcti``; files go to ``workdir``."""
    w = workdir
    w.mkdir(parents=True, exist_ok=True)
    run_tool(tcti, "tpm2_createek", "-c", "ek.ctx", "-G", ek_alg, "-u", "ek.pub", cwd=w)
    flush(tcti, w)
    run_tool(
        tcti, "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g", "sha256",
        "-s", "rsassa", "-u", "ak.pem", "-f", "pem", "-n", "ak.name", cwd=w,
    )  # fmt: skip
    flush(tcti, w)
    secret = os.urandom(32)
    (w / "secret").write_bytes(secret)
    ak_name = (w / "ak.name").read_bytes()
    run_tool(
        None, "tpm2_makecredential", "-e", "ek.pub", "-s", "secret", "-n", ak_name.hex(),
        "-o", "cred.out", cwd=w,
    )  # fmt: skip
    run_tool(tcti, "tpm2_startauthsession", "--policy-session", "-S", "session.ctx", cwd=w)
    run_tool(tcti, "tpm2_policysecret", "-S", "session.ctx", "-c", "e", cwd=w)
    run_tool(
        tcti, "tpm2_activatecredential", "-c", "ak.ctx", "-C", "ek.ctx", "-i", "cred.out",
        "-o", "activated", "-P", "session:session.ctx", cwd=w,
    )  # fmt: skip
    run_tool(tcti, "tpm2_flushcontext", "session.ctx", cwd=w)
    flush(tcti, w)
    measurement = hashlib.sha256(b"sgxvtpm attestation round").hexdigest()
    run_tool(tcti, "tpm2_pcrextend", f"16:sha256={measurement}", cwd=w)
    nonce = os.urandom(16).hex()
    run_tool(
        tcti, "tpm2_quote", "-c", "ak.ctx", "-l", "sha256:0,1,2,3,16", "-q", nonce,
        "-m", "quote.msg", "-s", "quote.sig", "-o", "quote.pcrs", "-g", "sha256", cwd=w,
    )  # fmt: skip
    flush(tcti, w)
    check = ["tpm2_checkquote", "-u", "ak.pem", "-m", "quote.msg", "-s", "quote.sig",
             "-f", "quote.pcrs", "-g", "sha256", "-q"]  # fmt: skip
    good = run_tool("", *check, nonce, cwd=w, check=False)
    bad = run_tool("", *check, "00" * 16, cwd=w, check=False)
    return RoundResult(
        ek_spki=tss_public_spki(w / "ek.pub"),
        ak_name=ak_name,
        secret=secret,
        activated=(w / "activated").read_bytes(),
        quote_checked=good.returncode == 0,
        wrong_nonce_rejected=bad.returncode != 0,
    )
