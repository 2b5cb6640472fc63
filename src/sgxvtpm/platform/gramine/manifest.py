"""Gramine manifests for the two enclave roles, rendered from the measured set and checked.

``sgxvtpm gramine manifest --role manager|instance`` prints a manifest
template for Gramine v1.9: ``gramine-manifest`` fills Gramine's own
placeholders (``{{ gramine.libos }}``, ``{{ gramine.runtimedir() }}``), then
``gramine-sgx-sign`` hashes the trusted files into MRENCLAVE
(docs/REAL-SGX.md). What is rendered here:

- the role, fixed in the measured ``loader.argv`` (the bootstrap and the
  entry point: the host cannot start a manager as an instance);
- ``sgx.trusted_files``: the sgxvtpm files of the role's measured closure
  (enclaves/specs.py, the same list the sim measures; the instance's
  includes libtpms) one by one, plus what the interpreter needs (Gramine's
  runtime, python, its standard library, the third-party packages the
  enclave imports, the system libraries they load) and the EGETKEY helper;
  no directory entry covers any sgxvtpm file, so with
  ``sgx.file_check_policy = "strict"`` no other sgxvtpm module can load;
- ``sgx.allowed_files``: the state directory only (justified below), and in
  it hostd's public copy of the DCAP collateral by name (bootstrap.py).

:func:`check` parses the result (tomllib) and checks every key against the
types of Gramine's manifest schema (manifest-syntax.rst) and the trusted
sgxvtpm files against the measured list.
"""

from __future__ import annotations

import json
import sys
import sysconfig
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgxvtpm.platform.base import EnclaveSpec, PlatformError
from sgxvtpm.platform.gramine.bootstrap import PUBLIC_COLLATERAL

BOOTSTRAP = "sgxvtpm.platform.gramine.bootstrap"
ARCH_LIBDIR = "/lib/x86_64-linux-gnu"
# Third-party packages the enclaves import (cryptography's Rust and cffi
# parts; dcap-qvl for peers' quotes), as installed for this interpreter.
THIRD_PARTY = ("cryptography", "_cffi_backend", "cffi", "dcap_qvl")
ENCLAVE_SIZE = {"manager": "1G", "instance": "1G"}  # with EDMM, the most it may grow to
# main, the two stdio bridge threads, asyncio's executor, Gramine's own (IPC, async)
MAX_THREADS = 8

# Gramine manifest keys this renderer may emit, with their TOML value types.
SCHEMA: dict[str, type | tuple[type, ...]] = {
    "loader.entrypoint.uri": str,
    "libos.entrypoint": str,
    "loader.argv": list,
    "loader.log_level": str,
    "loader.env.LD_LIBRARY_PATH": str,
    "loader.env.PYTHONDONTWRITEBYTECODE": str,
    "sys.enable_sigterm_injection": bool,
    "sys.disallow_subprocesses": bool,
    "fs.mounts": list,
    "sgx.debug": bool,
    "sgx.edmm_enable": bool,
    "sgx.enclave_size": str,
    "sgx.max_threads": int,
    "sgx.remote_attestation": str,
    "sgx.isvprodid": int,
    "sgx.isvsvn": int,
    "sgx.file_check_policy": str,
    "sgx.trusted_files": list,
    "sgx.allowed_files": list,
}
_ENUMS = {
    "loader.log_level": {"none", "error", "warning", "debug", "trace", "all"},
    "sgx.remote_attestation": {"none", "epid", "dcap"},
    "sgx.file_check_policy": {"strict", "allow_all_but_log"},
}
_MOUNT_KEYS = {"type", "path", "uri", "key_name"}


@dataclass(frozen=True)
class Manifest:
    role: str
    text: str
    trusted_sgxvtpm: tuple[Path, ...]


def _q(value: str) -> str:
    return json.dumps(value)  # a TOML basic string is a JSON string for these paths


def interpreter_files() -> list[str]:
    """URIs of what python needs in the enclave (not sgxvtpm)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    dynload = str(sysconfig.get_config_var("DESTSHARED") or f"{stdlib}/lib-dynload")
    site = Path(sysconfig.get_paths()["purelib"])
    uris = [
        "file:{{ gramine.runtimedir() }}/",
        f"file:{Path(sys.executable).resolve()}",
        f"file:{stdlib}/",
        f"file:{dynload}/",
        f"file:{ARCH_LIBDIR}/",  # libcrypto/libssl (cryptography, libtpms), libffi, libz
    ]
    for name in THIRD_PARTY:
        for candidate in sorted(site.glob(f"{name}*")):
            suffix = "/" if candidate.is_dir() else ""
            uris.append(f"file:{candidate}{suffix}")
    return uris


def render(spec: EnclaveSpec, role: str, *, state_dir: Path, package_root: Path) -> Manifest:
    """The manifest template of ``spec`` (manager_spec or instance_spec of the gramine kind)."""
    if role not in ENCLAVE_SIZE:
        raise PlatformError(f"unknown enclave role {role!r}: expected manager or instance")
    python = str(Path(sys.executable).resolve())
    site = Path(sysconfig.get_paths()["purelib"])
    sgxvtpm_files = tuple(sorted(Path(p).resolve() for p in spec.code_files))
    trusted = [
        *interpreter_files(),
        *(f"file:{p}" for p in sgxvtpm_files),
        # The EGETKEY helper (egetkey.c, built on the SGX host): REPORT keys and
        # keys of older SVNs, which /dev/attestation/keys does not give.
        f"file:{package_root / 'platform' / 'gramine' / 'libsgxvtpm_egetkey.so'}",
    ]
    lines = [
        f"# sgxvtpm {role} enclave, Gramine v1.9 manifest template.",
        f"# Rendered by `sgxvtpm gramine manifest --role {role}`; then run gramine-manifest",
        "# (Gramine's own placeholders) and gramine-sgx-sign. See docs/REAL-SGX.md.",
        'loader.entrypoint.uri = "file:{{ gramine.libos }}"',
        f"libos.entrypoint = {_q(python)}",
        "# The role is fixed here, in the measured argv: the bootstrap then the entry point.",
        f"loader.argv = [{', '.join(_q(a) for a in (python, '-I', '-m', BOOTSTRAP, spec.entry))}]",
        'loader.log_level = "error"  # the only level fit for production (manifest-syntax.rst)',
        f'loader.env.LD_LIBRARY_PATH = "/lib:{ARCH_LIBDIR}:/usr{ARCH_LIBDIR}"',
        'loader.env.PYTHONDONTWRITEBYTECODE = "1"  # trusted files are read-only; no .pyc writes',
        "# hostd stops an enclave by closing its stream; SIGTERM is the fallback, on which",
        "# the enclave saves its state (a one-time injection the host may time as it likes).",
        "sys.enable_sigterm_injection = true",
        "# One enclave per process: a fork would be a new enclave (no zygote on Gramine).",
        "sys.disallow_subprocesses = true",
        "fs.mounts = [",
        '  { path = "/lib", uri = "file:{{ gramine.runtimedir() }}" },',
        f'  {{ path = "{ARCH_LIBDIR}", uri = "file:{ARCH_LIBDIR}" }},',
        '  { path = "/usr", uri = "file:/usr" },',
        f"  {{ path = {_q(python)}, uri = {_q('file:' + python)} }},",
        f"  {{ path = {_q(str(Path(python).parent.parent))}, "
        f"uri = {_q('file:' + str(Path(python).parent.parent))} }},",
        f"  {{ path = {_q(str(package_root))}, uri = {_q('file:' + str(package_root))} }},",
        f"  {{ path = {_q(str(site))}, uri = {_q('file:' + str(site))} }},",
        f"  {{ path = {_q(str(state_dir))}, uri = {_q('file:' + str(state_dir))} }},",
        "]",
        "sgx.debug = false",
        "sgx.edmm_enable = true  # EPC is committed as the interpreter grows (Linux >= 6.0)",
        f'sgx.enclave_size = "{ENCLAVE_SIZE[role]}"',
        f"sgx.max_threads = {MAX_THREADS}",
        'sgx.remote_attestation = "dcap"',
        f"sgx.isvprodid = {spec.isv_prod_id}",
        f"sgx.isvsvn = {spec.isv_svn}",
        'sgx.file_check_policy = "strict"',
        "sgx.trusted_files = [",
        *(f"  {_q(uri)}," for uri in trusted),
        "]",
        "# The state directory: the sealed registry or TPM state, the only files an enclave",
        "# writes. They are sealed by the enclave itself (AES-GCM under its SEAL key, fresh",
        "# by the counter backend), so they need no Gramine encrypted mount, whose rollback",
        "# protection ends when the file is closed.",
        "# hostd's public copy of the DCAP collateral (signed data, checked under the pinned",
        "# root at each use): a running enclave re-reads it when a quote fails with its",
        "# launch copy (hostd --pccs keeps it fresh). Named on its own: it must stay readable",
        "# should the state directory entry ever narrow.",
        "sgx.allowed_files = [",
        f"  {_q('file:' + str(state_dir) + '/')},",
        f"  {_q('file:' + str(state_dir / PUBLIC_COLLATERAL))},",
        "]",
        "",
    ]
    return Manifest(role, "\n".join(lines), sgxvtpm_files)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check(text: str, expected_sgxvtpm: Sequence[Path], package_root: Path) -> dict[str, Any]:
    """Parse a rendered manifest and check it; PlatformError naming the first problem.

    Checks: TOML syntax; every key is a Gramine key of the right type (and
    enumerations take a documented value); mounts are tables of known keys
    with absolute paths; the trusted sgxvtpm files are exactly
    ``expected_sgxvtpm``, and no trusted or allowed entry is a directory
    containing the package; remote attestation is DCAP, not debug.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlatformError(f"manifest is not TOML: {exc}") from None
    flat = _flatten(doc)
    for key, value in flat.items():
        kind = SCHEMA.get(key)
        if kind is None:
            raise PlatformError(f"manifest key {key} is not one sgxvtpm's Gramine schema knows")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PlatformError(f"manifest key {key} must be a {getattr(kind, '__name__', kind)}")
        if key in _ENUMS and value not in _ENUMS[key]:
            raise PlatformError(f"manifest key {key} = {value!r}: not a Gramine value")
    for key in ("libos.entrypoint", "loader.entrypoint.uri", "loader.argv", "sgx.trusted_files"):
        if key not in flat:
            raise PlatformError(f"manifest lacks {key}")
    if flat.get("sgx.remote_attestation") != "dcap" or flat.get("sgx.debug") is not False:
        raise PlatformError(
            'manifest must set sgx.remote_attestation = "dcap" and sgx.debug = false'
        )
    if not all(isinstance(a, str) for a in flat["loader.argv"]):
        raise PlatformError("loader.argv must be a list of strings")
    for mount in flat.get("fs.mounts", []):
        if not isinstance(mount, dict) or set(mount) - _MOUNT_KEYS or "path" not in mount:
            raise PlatformError(f"fs.mounts entry {mount!r} is not a Gramine mount table")
        if not str(mount["path"]).startswith("/"):
            raise PlatformError(f"fs.mounts path {mount['path']!r} is not absolute")
    root = str(package_root.resolve())
    trusted: set[Path] = set()
    for key in ("sgx.trusted_files", "sgx.allowed_files"):
        for uri in flat.get(key, []):
            if not isinstance(uri, str) or not uri.startswith("file:"):
                raise PlatformError(f"{key} entry {uri!r} is not a file: URI string")
            path = uri[len("file:") :]
            if path.endswith("/") and (root + "/").startswith(path):
                raise PlatformError(f"{key} entry {uri} covers the whole sgxvtpm package")
            if key == "sgx.trusted_files" and path.startswith(root + "/") and path.endswith(".py"):
                trusted.add(Path(path))
            if key == "sgx.trusted_files" and not path.startswith(root + "/") and (
                "libtpms" in path
            ):
                trusted.add(Path(path))
    expected = {Path(p).resolve() for p in expected_sgxvtpm}
    if trusted != expected:
        missing = sorted(map(str, expected - trusted))
        extra = sorted(map(str, trusted - expected))
        raise PlatformError(f"trusted sgxvtpm files differ from the measured set: "
                            f"missing {missing}, extra {extra}")
    return doc

