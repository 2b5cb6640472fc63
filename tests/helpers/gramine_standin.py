"""STAND-INS for Gramine's tools, for tests only: gramine-manifest, gramine-sgx-sign, gramine-sgx.

Gramine cannot be installed here and there is no SGX. These executables take
the command lines Gramine's manpages document, write the files Gramine
writes where Gramine writes them, record each call (argv, working
directory, environment, what fds 0 and 1 are) in a JSON-lines log, and:

- ``gramine-manifest [-D K=V]... SOURCE OUTPUT``: fills Gramine's two
  placeholders with a stand-in install path (``/standin/gramine``);
- ``gramine-sgx-sign --manifest M --output M.sgx [--key K] [--sigfile S]``:
  writes M.sgx (M plus a ``[stand_in]`` table of SHA-256 hashes of the
  trusted files that exist) and the SIGSTRUCT, laid out as Intel's SDM
  38.13 says (:func:`build_sigstruct`), signed with the RSA-3072, e=3 key
  (default ``$HOME/.config/gramine/enclave-key.pem``, as Gramine's);
  MRENCLAVE is the stand-in's own: SHA-256 of M.sgx (the real one hashes
  the enclave's pages; only hardware computes it);
- ``gramine-sgx APP``: needs APP.manifest.sgx and APP.sig, checks the
  SIGSTRUCT and MRENCLAVE as EINIT would, checks the trusted sgxvtpm files'
  hashes, then runs the enclave the gramine-sim way
  (platform/sim/gramine_sim.py): this process plays the sim CPU for one
  enclave over a sim platform directory shared by all stand-in enclaves,
  and the enclave (bootstrap, /dev/attestation tree, entry) is real.

Run as ``python -m tests.helpers.gramine_standin TOOL [--log F] [--sim-platform D] -- ARGS``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import signal
import socket
import stat
import struct
import sys
import threading
import tomllib
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

STANDIN_GRAMINE = "/standin/gramine"
PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "src" / "sgxvtpm"


# ------------------------------------------------------------ SIGSTRUCT, per the SDM


def build_sigstruct(
    key: rsa.RSAPrivateKey,
    *,
    mrenclave: bytes,
    attributes: bytes,
    isv_prod_id: int,
    isv_svn: int,
    date: datetime.date,
    misc_select: int = 0,
    vendor: int = 0,
) -> bytes:
    """A SIGSTRUCT laid out field by field as Intel SDM Vol. 3D, Table 38-19 gives it."""
    header = bytes([6, 0, 0, 0, 0xE1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    header2 = bytes([1, 1, 0, 0, 0x60, 0, 0, 0, 0x60, 0, 0, 0, 1, 0, 0, 0])
    bcd_date = int(f"{date.year:04d}{date.month:02d}{date.day:02d}", 16)
    part1 = (
        header  # HEADER (0, 16)
        + struct.pack("<I", vendor)  # VENDOR (16, 4)
        + struct.pack("<I", bcd_date)  # DATE (20, 4)
        + header2  # HEADER2 (24, 16)
        + struct.pack("<I", 0)  # SWDEFINED (40, 4)
        + bytes(84)  # RESERVED (44, 84)
    )
    part2 = (
        struct.pack("<I", misc_select)  # MISCSELECT (900, 4)
        + struct.pack("<I", 0xFFFFFFFF)  # MISCMASK (904, 4)
        + bytes(4)  # CET_ATTRIBUTES, its mask, RESERVED (908, 4)
        + bytes(16)  # ISVFAMILYID (912, 16)
        + attributes  # ATTRIBUTES (928, 16)
        + struct.pack("<QQ", 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF)  # ATTRIBUTEMASK (944)
        + mrenclave  # ENCLAVEHASH (960, 32)
        + bytes(16)  # RESERVED (992, 16)
        + bytes(16)  # ISVEXTPRODID (1008, 16)
        + struct.pack("<HH", isv_prod_id, isv_svn)  # ISVPRODID, ISVSVN (1024, 4)
    )
    assert len(part1) == 128 and len(part2) == 128
    signature_be = key.sign(part1 + part2, padding.PKCS1v15(), hashes.SHA256())
    numbers = key.public_key().public_numbers()
    n, s = numbers.n, int.from_bytes(signature_be, "big")
    q1 = s * s // n
    q2 = (s * s % n) * s // n
    blob = (
        part1
        + n.to_bytes(384, "little")  # MODULUS (128, 384)
        + struct.pack("<I", numbers.e)  # EXPONENT (512, 4)
        + s.to_bytes(384, "little")  # SIGNATURE (516, 384)
        + part2
        + bytes(12)  # RESERVED (1028, 12)
        + q1.to_bytes(384, "little")  # Q1 (1040, 384)
        + q2.to_bytes(384, "little")  # Q2 (1424, 384)
    )
    assert len(blob) == 1808
    return blob


def sgx_signing_key() -> rsa.RSAPrivateKey:
    """An RSA-3072 key with e = 3, as gramine-sgx-gen-private-key makes."""
    return rsa.generate_private_key(public_exponent=3, key_size=3072)


# ------------------------------------------------------------ the tools


def _record(log: str, tool: str, argv: list[str]) -> None:
    if not log:
        return
    fds = {}
    for fd in (0, 1):
        try:
            fds[str(fd)] = "socket" if stat.S_ISSOCK(os.fstat(fd).st_mode) else "other"
        except OSError:
            fds[str(fd)] = "closed"
    entry = {"tool": tool, "argv": [tool, *argv], "cwd": os.getcwd(),
             "env": dict(os.environ), "fds": fds}
    with open(log, "a") as f:
        f.write(json.dumps(entry) + "\n")


def gramine_manifest(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gramine-manifest")
    p.add_argument("-D", "--define", action="append", default=[])
    p.add_argument("source")
    p.add_argument("output")
    opts = p.parse_args(argv)
    text = Path(opts.source).read_text()
    text = text.replace("{{ gramine.libos }}", f"{STANDIN_GRAMINE}/libsysdb.so")
    text = text.replace("{{ gramine.runtimedir() }}", f"{STANDIN_GRAMINE}/runtime/glibc")
    if "{{" in text:
        print("gramine-manifest (stand-in): an unknown placeholder is left", file=sys.stderr)
        return 1
    tomllib.loads(text)
    Path(opts.output).write_text(text)
    return 0


def _trusted_hashes(manifest: dict[str, object]) -> dict[str, str]:
    hashes_: dict[str, str] = {}
    sgx = manifest.get("sgx")
    assert isinstance(sgx, dict)
    for uri in sgx.get("trusted_files", []):
        path = Path(str(uri).removeprefix("file:"))
        if path.is_file():
            hashes_[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes_


def gramine_sgx_sign(argv: list[str]) -> int:
    from sgxvtpm.platform.sim.measure import ENCLAVE_ATTRIBUTES

    p = argparse.ArgumentParser(prog="gramine-sgx-sign")
    p.add_argument("--manifest", "-m", required=True)
    p.add_argument("--output", "-o", required=True)
    default_key = Path(os.environ.get("HOME", "/")) / ".config" / "gramine" / "enclave-key.pem"
    p.add_argument("--key", "-k", default=str(default_key))
    p.add_argument("--sigfile", "-s")
    opts = p.parse_args(argv)
    text = Path(opts.manifest).read_text()
    manifest = tomllib.loads(text)
    table = json.dumps(_trusted_hashes(manifest), sort_keys=True)
    # A JSON object of strings is a TOML inline table once ':' become '='.
    inline = "{" + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}"
                             for k, v in json.loads(table).items()) + "}"
    expanded = text + f"\n[stand_in]\ntrusted_sha256 = {inline}\n"
    Path(opts.output).write_text(expanded)
    mrenclave = hashlib.sha256(expanded.encode()).digest()
    key = serialization.load_pem_private_key(Path(opts.key).read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    sig = build_sigstruct(
        key, mrenclave=mrenclave, attributes=ENCLAVE_ATTRIBUTES,
        isv_prod_id=int(manifest["sgx"]["isvprodid"]), isv_svn=int(manifest["sgx"]["isvsvn"]),
        date=datetime.date.today(),
    )  # fmt: skip
    sigfile = opts.sigfile or opts.manifest.removesuffix(".manifest") + ".sig"
    Path(sigfile).write_bytes(sig)
    print(f"Measurement:\n    {mrenclave.hex()}")
    return 0


def gramine_sgx(argv: list[str], sim_platform: str) -> int:
    from sgxvtpm.platform.base import EnclaveIdentity
    from sgxvtpm.platform.gramine import sigstruct
    from sgxvtpm.platform.sim import SimPlatformDir
    from sgxvtpm.platform.sim.cpu import serve_enclu
    from sgxvtpm.platform.sim.gramine_sim import start_stand_in
    from sgxvtpm.platform.sim.measure import read_code

    if not argv:
        print("Usage: gramine-sgx [<application>] <args>...", file=sys.stderr)
        return 2
    app = argv[0]
    for suffix in (".manifest.sgx", ".sig"):
        if not Path(app + suffix).exists():
            print(f"Invalid application path specified ({app}{suffix} does not exist).",
                  file=sys.stderr)
            return 2
    expanded = Path(app + ".manifest.sgx").read_bytes()
    sig = sigstruct.parse(Path(app + ".sig").read_bytes())  # EINIT checks the signature
    if sig.mrenclave != hashlib.sha256(expanded).digest():
        print("gramine-sgx (stand-in): EINIT: MRENCLAVE differs from the SIGSTRUCT's",
              file=sys.stderr)
        return 1
    manifest = tomllib.loads(expanded.decode())
    entry = str(manifest["loader"]["argv"][-1])
    root = str(PACKAGE_ROOT.resolve())
    paths = []
    for path, digest in manifest["stand_in"]["trusted_sha256"].items():
        if (path.startswith(root + "/") and path.endswith(".py")) or "libtpms" in path:
            if hashlib.sha256(Path(path).read_bytes()).hexdigest() != digest:
                print(f"gramine-sgx (stand-in): trusted file {path} changed", file=sys.stderr)
                return 1
            paths.append(Path(path))
    code = read_code(paths)
    identity = EnclaveIdentity(
        sig.mrenclave, sig.mrsigner, sig.isv_prod_id, sig.isv_svn,
        attributes=sig.attributes, misc_select=sig.misc_select,
    )  # fmt: skip
    platform_dir = SimPlatformDir.open_or_create(Path(sim_platform))
    enclave = platform_dir.enclave_platform(identity)
    cpu_end, enclave_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = start_stand_in(0, enclave_end.fileno(), entry, Path(app).name)
    enclave_end.close()
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())  # Gramine's SIGTERM injection
    header = {"config_len": 0, "files": [[f.name, str(f.path), len(f.data)] for f in code]}
    blob = b"".join(f.data for f in code)
    threading.Thread(
        target=serve_enclu, args=(cpu_end, enclave),
        kwargs={"code": (header, blob), "collateral": platform_dir.dcap_collateral()},
        daemon=True,
    ).start()  # fmt: skip
    os.close(0)
    os.close(1)  # the enclave holds the stream now
    return proc.wait()


def main() -> int:
    tool, rest = sys.argv[1], sys.argv[2:]
    p = argparse.ArgumentParser(prog="gramine-standin")
    p.add_argument("--log", default="")
    p.add_argument("--sim-platform", default="")
    split = rest.index("--") if "--" in rest else len(rest)
    opts = p.parse_args(rest[:split])
    argv = rest[split + 1 :]
    _record(opts.log, tool, argv)
    if tool == "gramine-manifest":
        return gramine_manifest(argv)
    if tool == "gramine-sgx-sign":
        return gramine_sgx_sign(argv)
    if tool == "gramine-sgx":
        return gramine_sgx(argv, opts.sim_platform)
    raise SystemExit(f"unknown stand-in {tool}")


# No PYTHONPATH: the stand-in records the environment it was given, unchanged.
_BOOT = (
    "import sys; sys.path.insert(0, {repo!r}); "
    "from tests.helpers.gramine_standin import main; sys.exit(main())"
)


def install(bin_dir: Path, log: Path, sim_platform: Path) -> None:
    """Write the three stand-in executables into ``bin_dir`` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    repo = PACKAGE_ROOT.parents[1]
    for tool in ("gramine-manifest", "gramine-sgx-sign", "gramine-sgx"):
        script = bin_dir / tool
        script.write_text(
            "#!/bin/sh\n"
            f"# STAND-IN for Gramine's {tool} (tests/helpers/gramine_standin.py)\n"
            f"exec {sys.executable} -c {shlex.quote(_BOOT.format(repo=str(repo)))} {tool} "
            f"--log {log} --sim-platform {sim_platform} -- \"$@\"\n"
        )
        script.chmod(0o755)


if __name__ == "__main__":
    sys.exit(main())
