"""What a process with hostd's uid finds in hostd's state directory, and what it can do with it.

:func:`loot_and_use` reads every file it can under the state directory,
collects the private keys and certificates in them (PEM, also inside JSON
strings, and DER), and tries each key as the operator on K1 and as a VM on
K2 to every instance it sees, paired with every certificate of that key and
self-signed; a fresh key is tried too. It also tries the credentials it is
given as controls, to show that a refusal comes from the enclaves and not
from a broken attempt. :func:`in_child` runs a function in a forked child,
optionally after dropping to another uid and gid (as hostd's --user does).

Everything the attempts need is imported here, at import time: after the
drop the interpreter's own library may not be readable (a Python installed
under root's home), so the child must not import anything new.
"""

from __future__ import annotations

import asyncio

# A child that dropped to another user may not read the interpreter's own
# library (a Python installed under root's home): everything it runs is
# imported here, before the fork.
import concurrent.futures.thread  # noqa: F401 - asyncio.to_thread, used by the VMM client
import contextlib
import grp  # noqa: F401 - `hostd --user` resolves groups
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import sgxvtpm.host.hostd  # noqa: F401 - what `sgxvtpm hostd` imports lazily (see above)
from sgxvtpm.channel import ClientCredential
from sgxvtpm.cli import main as cli_main
from sgxvtpm.enclaves.specs import expected_policy
from sgxvtpm.endpoint.k2 import K2Client, VmBinding
from sgxvtpm.host import hostd as _hostd  # noqa: F401 - the cli's hostd command (grp)
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.platform import platform_kind
from sgxvtpm.tpm import wire
from sgxvtpm.vmm.client import VmmClient

PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.S)
CREDENTIALS_ENV = "SGXVTPM_CONFIG_DIR"
TIMEOUT = 60.0


def scan(data: bytes) -> tuple[list[ec.EllipticCurvePrivateKey], list[x509.Certificate], bool]:
    """The EC private keys and certificates in ``data``; True if it holds any private key."""
    keys: list[ec.EllipticCurvePrivateKey] = []
    certs: list[x509.Certificate] = []
    found_private = False
    text = data.replace(b"\\n", b"\n")  # PEM inside a JSON string
    for block in PEM_BLOCK.finditer(text):
        label = block.group(1)
        with contextlib.suppress(ValueError, TypeError):
            if label.endswith(b"PRIVATE KEY"):
                found_private = True
                key = serialization.load_pem_private_key(block.group(0), None)
                if isinstance(key, ec.EllipticCurvePrivateKey):
                    keys.append(key)
            elif label == b"CERTIFICATE":
                certs.append(x509.load_pem_x509_certificate(block.group(0)))
    with contextlib.suppress(ValueError, TypeError):
        key = serialization.load_der_private_key(data, None)
        found_private = True
        if isinstance(key, ec.EllipticCurvePrivateKey):
            keys.append(key)
    return keys, certs, found_private


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ))


def opens_manager(state_dir: Path, credential: ClientCredential) -> bool:
    """K1 as ``credential``: does the manager answer a ``list``?"""
    client = VmmClient(StateDir(state_dir), operator=credential)
    try:
        asyncio.run(asyncio.wait_for(client.list(), TIMEOUT))
    except Exception:  # refused, in whichever way: the caller's controls show attempts work
        return False
    return True


def opens_instance(
    socket_path: Path, instance_id: str, credential: ClientCredential, root_pem: bytes
) -> bool:
    """K2 to ``instance_id`` as ``credential``: does its TPM answer a command?"""
    sim = platform_kind("sim")
    binding = VmBinding(socket_path, instance_id, credential, sim.quote_verifier(root_pem),
                        expected_policy("instance", sim))
    try:
        with K2Client(binding, timeout=TIMEOUT) as client:
            return len(client.transact(wire.get_random(8))) >= 10
    except Exception:  # refused, in whichever way: the caller's controls show attempts work
        return False


def loot_and_use(
    state_dir: Path,
    root_pem: bytes,
    credentials_dir: Path,
    controls: dict[str, tuple[str, str]] | None = None,
    hostd_pid: int | None = None,
) -> dict[str, Any]:
    """Read all of ``state_dir`` one can, then try every key found (see the module doc).

    ``credentials_dir``: the attacker's own (it pins the platform root there
    on first contact, as any client does). ``controls``: label -> (key PEM,
    cert PEM) of real credentials, tried as the operator and as a VM.
    """
    os.environ[CREDENTIALS_ENV] = str(credentials_dir)
    keys: list[tuple[str, ec.EllipticCurvePrivateKey]] = []
    certs: list[x509.Certificate] = []
    key_files: list[str] = []
    unreadable: list[str] = []
    read: list[str] = []
    for top, _dirs, files in os.walk(state_dir, onerror=lambda e: unreadable.append(e.filename)):
        for name in files:
            path = os.path.join(top, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                unreadable.append(path)
                continue
            read.append(path)
            found, found_certs, private = scan(data)
            keys += [(path, k) for k in found]
            certs += found_certs
            if private:
                key_files.append(path)

    candidates: dict[str, ClientCredential] = {}
    for path, key in keys:
        candidates[f"{path} self-signed"] = ClientCredential.self_signed(key, "found")
        for cert in certs:
            if _spki(cert.public_key()) == _spki(key.public_key()):
                candidates[f"{path} with its certificate"] = ClientCredential(key, cert)
    fresh = ec.generate_private_key(ec.SECP256R1())
    candidates["a fresh key"] = ClientCredential.self_signed(fresh, "sgxvtpm operator")

    instances = sorted(p.name for p in (state_dir / "instances").glob("*") if p.is_dir())
    socket_path = state_dir / "hostd.sock"
    result: dict[str, Any] = {
        "read": read,
        "unreadable": unreadable,
        "private_key_files": key_files,
        "instances": instances,
        "k1_opened": [label for label, c in candidates.items() if opens_manager(state_dir, c)],
        "k2_opened": [
            f"{label} -> {iid}"
            for label, c in candidates.items()
            for iid in instances
            if opens_instance(socket_path, iid, c, root_pem)
        ],
        "controls": {},
    }
    for label, (key_pem, cert_pem) in (controls or {}).items():
        key = serialization.load_pem_private_key(key_pem.encode(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        control = ClientCredential(key, x509.load_pem_x509_certificate(cert_pem.encode()))
        result["controls"][label] = {
            "k1": opens_manager(state_dir, control),
            "k2": [iid for iid in instances if opens_instance(socket_path, iid, control, root_pem)],
        }
    if hostd_pid is not None:
        try:
            with open(f"/proc/{hostd_pid}/mem", "rb"):
                result["hostd_memory_readable"] = True
        except OSError:
            result["hostd_memory_readable"] = False
    return result


def in_child(
    fn: Callable[..., Any], *args: Any, uid: int | None = None, gid: int | None = None
) -> Any:
    """``fn(*args)`` in a forked child (after setgroups/setgid/setuid to ``uid``/``gid``
    if given); its JSON-able result, or AssertionError with the child's exception."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(r)
            if uid is not None and gid is not None:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            out: dict[str, Any] = {"result": fn(*args)}
        except BaseException as exc:
            out = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            with os.fdopen(w, "wb") as pipe:
                pipe.write(json.dumps(out, default=str).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    out = json.loads(data)
    if "error" in out:
        raise AssertionError(f"in the child: {out['error']}")
    return out["result"]


def cli_in_child(argv: list[str], uid: int, gid: int) -> tuple[int, str]:
    """``sgxvtpm ARGV`` run in process by a child with ``uid``/``gid``: (status, stderr)."""

    def run() -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = cli_main(argv)
        return status, err.getvalue()

    status, stderr = in_child(run, uid=uid, gid=gid)
    return int(status), str(stderr)
