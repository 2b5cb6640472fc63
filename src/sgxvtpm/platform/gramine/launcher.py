"""hostd's side of the Gramine backend: build, sign and run one ``gramine-sgx`` per enclave.

``open_platform("gramine", PLATFORM_DIR)`` opens :class:`GramineBackend`:

1. it checks what it needs: the SGX device (``/dev/sgx_enclave``), Gramine's
   tools on PATH (``gramine-manifest``, ``gramine-sgx-sign``, ``gramine-sgx``)
   and the DCAP collateral for the enclaves (``PLATFORM_DIR/dcap-collateral.json``,
   QuoteCollateralV3 JSON as a PCCS serves it; the enclaves check it under
   Intel's pinned root). PlatformError naming the first thing missing;
2. for each enclave role of the release (``manager``, ``instance``) in
   ``PLATFORM_DIR/gramine/``: renders the manifest template and checks it
   (:mod:`.manifest`), then runs the tools as Gramine documents them
   (manpages gramine-manifest, gramine-sgx-sign, gramine)::

       gramine-manifest ROLE.manifest.template ROLE.manifest
       gramine-sgx-sign --manifest ROLE.manifest --output ROLE.manifest.sgx

   ``gramine-sgx-sign`` signs with Gramine's default key
   (``$HOME/.config/gramine/enclave-key.pem`` of hostd's user, made by
   ``gramine-sgx-gen-private-key``) and writes the SIGSTRUCT to ``ROLE.sig``;
3. reads ``ROLE.sig`` (:mod:`.sigstruct`): its MRENCLAVE and MRSIGNER are the
   identity the enclave's quotes will carry (``measure`` answers it; hostd
   logs it; verifiers pin it).

With a pre-signed release (``hostd --release DIR``, made on the vendor's build
host by ``sgxvtpm release sign --platform gramine``, :func:`sign_release`),
steps 2 and 3 are: read ``DIR/ROLE.sig`` and check that ``DIR/ROLE.manifest.sgx``
exists and was rendered for this host's state directory; neither
``gramine-manifest`` nor ``gramine-sgx-sign`` runs, nor is needed on PATH,
and the enclaves run in DIR.

Each launch is ``gramine-sgx ROLE`` in ``PLATFORM_DIR/gramine`` (Gramine
finds ``ROLE.manifest.sgx`` and ``ROLE.sig`` there), in a session of its
own, with one end of a socketpair as its stdin and stdout (the enclave's
host stream, :mod:`.bootstrap`), stderr to hostd's, and an environment of
PATH only (Gramine passes no host environment into the enclave unless its
manifest allows it; ours does not). The launch arguments go first on the
stream, with the collateral added (``dcap_collateral``) and the path of
hostd's public copy (``dcap_collateral_file``, ``STATE/collateral.json``),
which a running enclave re-reads when a quote fails with its launch copy
(bootstrap.py, ``hardware_platform``).

``hostd --pccs`` hands the backend newer collateral (:meth:`GramineBackend.replace_collateral`):
taken only if it chains to the backend's root with valid signatures, nothing
expired, for the same FMSPC and PCK CA, expiring no earlier than the copy it
has (platform/dcap.py, ``check_collateral``; a host process has no quote to
check more); the enclaves launched from then on get it, and it replaces
``PLATFORM_DIR/dcap-collateral.json`` (temporary file + rename) for hostd's
next start where hostd may still write there.

:data:`DEVICE_ENV` is a test-only override of the SGX device's path: the
tests use it to stand for a device, with stand-in executables for Gramine's
tools (tests/integration/test_gramine_launcher.py). Nothing else reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sgxvtpm.platform import dcap, pccs
from sgxvtpm.platform.base import (
    EnclaveIdentity,
    EnclaveSpec,
    LaunchedEnclave,
    PlatformError,
    PlatformKind,
    QuoteVerifier,
)
from sgxvtpm.platform.gramine import sigstruct
from sgxvtpm.platform.gramine.backend import GRAMINE
from sgxvtpm.platform.gramine.bootstrap import (
    COLLATERAL_FILE_ARG,
    PUBLIC_COLLATERAL,
    encode_launch_args,
)
from sgxvtpm.platform.gramine.manifest import check, render
from sgxvtpm.platform.release import (
    MANIFEST,
    ReleaseError,
    read_manifest,
    write_manifest,
    write_new_key,
)
from sgxvtpm.util import log
from sgxvtpm.util.durable import atomic_write

SGX_DEVICE = "/dev/sgx_enclave"
#: Test-only: the path that stands for /dev/sgx_enclave (see the module doc).
DEVICE_ENV = "SGXVTPM_TEST_SGX_DEVICE"
TOOLS = ("gramine-manifest", "gramine-sgx-sign", "gramine-sgx")
COLLATERAL_FILE = "dcap-collateral.json"
BUILD_DIR = "gramine"
TOOL_TIMEOUT = 600.0  # gramine-sgx-sign hashes every trusted file
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
ROLES = ("manager", "instance")


def sgx_device() -> Path:
    return Path(os.environ.get(DEVICE_ENV) or SGX_DEVICE)


def check_host(platform_dir: Path, tools: Sequence[str] = TOOLS) -> None:
    """PlatformError naming the first thing this host lacks for platform 'gramine'."""
    device = sgx_device()
    if not device.exists():
        raise PlatformError(
            f"platform 'gramine' needs SGX hardware, and this machine has none (no {device}): "
            "use 'sim', or 'gramine-sim' for the same enclave code path"
        )
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise PlatformError(
            f"platform 'gramine' needs Gramine's tools: {', '.join(missing)} not found on PATH "
            "(install Gramine v1.9, docs/REAL-SGX.md)"
        )
    if not (platform_dir / COLLATERAL_FILE).is_file():
        raise PlatformError(
            f"platform 'gramine' needs the DCAP collateral for its enclaves in "
            f"{platform_dir / COLLATERAL_FILE} (QuoteCollateralV3 JSON from your PCCS, "
            "docs/REAL-SGX.md)"
        )


def _run(argv: Sequence[str], cwd: Path) -> str:
    try:
        done = subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
            env={"PATH": os.environ.get("PATH", os.defpath), "HOME": str(Path.home())},
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PlatformError(f"{argv[0]} did not run: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise PlatformError(f"{argv[0]} failed: {last}")
    return done.stdout


@dataclasses.dataclass(frozen=True)
class SignedEnclave:
    role: str
    sig: sigstruct.GramineSigStruct

    @property
    def identity(self) -> EnclaveIdentity:
        return EnclaveIdentity(
            self.sig.mrenclave,
            self.sig.mrsigner,
            self.sig.isv_prod_id,
            self.sig.isv_svn,
            attributes=self.sig.attributes,
            misc_select=self.sig.misc_select,
        )


def build(
    spec: EnclaveSpec, build_dir: Path, state_dir: Path, key: Path | None = None
) -> SignedEnclave:
    """Render, check, preprocess and sign ``spec``'s manifest in ``build_dir``; its SIGSTRUCT.

    ``key``: the vendor's key for ``gramine-sgx-sign --key`` (else Gramine's default).
    """
    role = spec.name
    if role not in ROLES:
        raise PlatformError(f"unknown enclave role {role!r}: expected manager or instance")
    rendered = render(spec, role, state_dir=state_dir, package_root=PACKAGE_ROOT)
    check(rendered.text, spec.code_files, PACKAGE_ROOT)
    template = build_dir / f"{role}.manifest.template"
    template.write_text(rendered.text)
    _run(["gramine-manifest", template.name, f"{role}.manifest"], build_dir)
    _run(
        ["gramine-sgx-sign", *(["--key", str(key.resolve())] if key is not None else []),
         "--manifest", f"{role}.manifest", "--output", f"{role}.manifest.sgx"],
        build_dir,
    )  # fmt: skip
    try:
        data = (build_dir / f"{role}.sig").read_bytes()
    except OSError as exc:
        raise PlatformError(f"gramine-sgx-sign wrote no {role}.sig: {exc.strerror}") from None
    return SignedEnclave(role, sigstruct.parse(data))


def sign_release(release: str, key: Path, out: Path, state_dir: Path) -> dict[str, object]:
    """The vendor's build-host step (``sgxvtpm release sign --platform gramine``): render
    and check both manifests for a host whose state directory is ``state_dir``, run
    ``gramine-manifest`` and ``gramine-sgx-sign --key KEY`` in ``out``; the release
    manifest written there (platform/release.py)."""
    missing = [tool for tool in TOOLS[:2] if shutil.which(tool) is None]
    if missing:
        raise PlatformError(
            f"signing a Gramine release needs Gramine's tools: {', '.join(missing)} not found "
            "on PATH (install Gramine v1.9, docs/REAL-SGX.md)"
        )
    if not key.is_file():
        raise PlatformError(f"vendor key {key}: no such file (sgxvtpm release keygen)")
    out.mkdir(parents=True, exist_ok=True)
    signed = {spec.name: build(spec, out, state_dir, key) for spec in _release(release)}
    signers = {s.sig.mrsigner for s in signed.values()}
    if len(signers) != 1:
        raise PlatformError("gramine-sgx-sign signed the two enclaves with different keys")
    return write_manifest(
        out, GRAMINE.name, {role: s.sig.mrenclave for role, s in signed.items()}, signers.pop()
    )


def generate_key(path: Path) -> bytes:
    """A new vendor key for gramine-sgx-sign at ``path`` (RSA-3072, e = 3, as SGX requires
    and gramine-sgx-gen-private-key makes; PEM, 0600); its MRSIGNER."""
    key = rsa.generate_private_key(public_exponent=sigstruct.EXPONENT, key_size=3072)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    write_new_key(path, pem)
    modulus = key.public_key().public_numbers().n.to_bytes(sigstruct.KEY_SIZE, "little")
    return hashlib.sha256(modulus).digest()


def load_release(directory: Path, state_dir: Path) -> dict[str, SignedEnclave]:
    """hostd --release DIR: the shipped SIGSTRUCTs, checked against the release manifest,
    and the shipped ``.manifest.sgx`` files, which must exist and name ``state_dir``."""
    mrenclave, mrsigner = read_manifest(directory, GRAMINE.name)
    signed = {}
    for role in ROLES:
        try:
            sig = sigstruct.parse((directory / f"{role}.sig").read_bytes())
            text = (directory / f"{role}.manifest.sgx").read_text()
        except OSError as exc:
            raise ReleaseError(
                f"the release in {directory} lacks {Path(str(exc.filename)).name}"
            ) from None
        except sigstruct.SigStructError as exc:
            raise ReleaseError(f"{directory / (role + '.sig')}: {exc}") from None
        if sig.mrenclave != mrenclave[role] or sig.mrsigner != mrsigner:
            raise ReleaseError(f"{directory / (role + '.sig')} is not what {MANIFEST} names")
        if f"file:{state_dir}/" not in text:
            raise ReleaseError(
                f"the release in {directory} was not signed for the state directory "
                f"{state_dir}: sign it with `sgxvtpm release sign --state-dir {state_dir}`"
            )
        signed[role] = SignedEnclave(role, sig)
    return signed


class GramineHandle(LaunchedEnclave):
    """base.EnclaveHandle of one ``gramine-sgx`` process."""

    def __init__(
        self, name: str, identity: EnclaveIdentity, proc: subprocess.Popen[bytes],
        stream: socket.socket,
    ) -> None:  # fmt: skip
        super().__init__(name, identity, proc.pid, stream)
        self._proc = proc

    def wait(self, timeout: float) -> bool:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (Gramine injects it once: the enclave saves its state), then SIGKILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)
            if self.wait(timeout):
                break
        self._stream.close()


class GramineLoader:
    """base.Loader: one ``gramine-sgx ROLE`` process per enclave."""

    def __init__(
        self, build_dir: Path, signed: Mapping[str, SignedEnclave], collateral: str,
        collateral_file: Path | None = None,
    ) -> None:  # fmt: skip
        self._build_dir = build_dir
        self._signed = signed
        self.collateral = collateral  # what enclaves launched from now on get
        self._collateral_file = collateral_file
        self.handles: list[GramineHandle] = []

    def launch(self, spec: EnclaveSpec, args: Mapping[str, Any]) -> GramineHandle:
        signed = self._signed.get(spec.name)
        if signed is None:
            raise PlatformError(f"no signed Gramine enclave named {spec.name!r}")
        host_end, enclave_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                ["gramine-sgx", spec.name],
                cwd=self._build_dir,
                stdin=enclave_end.fileno(),
                stdout=enclave_end.fileno(),
                env={"PATH": os.environ.get("PATH", os.defpath)},
                start_new_session=True,
            )
        except OSError as exc:
            host_end.close()
            raise PlatformError(f"gramine-sgx did not start: {exc}") from None
        finally:
            enclave_end.close()
        try:
            extra: dict[str, str] = {"dcap_collateral": self.collateral}
            if self._collateral_file is not None:
                extra[COLLATERAL_FILE_ARG] = str(self._collateral_file)
            host_end.sendall(encode_launch_args({**args, **extra}))
        except OSError as exc:
            proc.kill()
            proc.wait()
            host_end.close()
            raise PlatformError(f"the {spec.name} enclave took no launch arguments: {exc}") from exc
        handle = GramineHandle(spec.name, signed.identity, proc, host_end)
        self.handles = [h for h in self.handles if not h.wait(0)] + [handle]
        return handle

    def close(self) -> None:
        """Stop the enclaves still running (hostd asked each to end first)."""
        for handle in self.handles:
            if not handle.wait(0):
                handle.stop()


class GramineBackend:
    """base.PlatformBackend of platform 'gramine' (see the module doc)."""

    name = "gramine"
    enclave_bootstrap = GRAMINE.enclave_bootstrap
    connection_handoff = False

    def __init__(
        self, loader: GramineLoader, signed: Mapping[str, SignedEnclave], root_pem: bytes,
        collateral: str, platform_dir: Path | None = None,
    ) -> None:  # fmt: skip
        self._loader = loader
        self._signed = dict(signed)
        self._root_pem = root_pem
        self._collateral = collateral
        self._platform_dir = platform_dir

    @classmethod
    def open(
        cls, platform_dir: Path, *, release: str = "", signed_release: Path | None = None
    ) -> GramineBackend:
        # A pre-signed release needs gramine-sgx only: nothing is built or signed here.
        check_host(platform_dir, TOOLS if signed_release is None else TOOLS[2:])
        collateral = (platform_dir / COLLATERAL_FILE).read_text()
        try:
            root_der = dcap.root_from_collateral(dcap.load_collateral(collateral))
        except dcap.CollateralError as exc:
            raise PlatformError(f"{platform_dir / COLLATERAL_FILE}: {exc}") from None
        root_pem = x509.load_der_x509_certificate(root_der).public_bytes(
            serialization.Encoding.PEM
        )
        state_dir = platform_dir.resolve().parent
        if signed_release is not None:
            build_dir = Path(signed_release).resolve()
            signed = load_release(build_dir, state_dir)
        else:
            build_dir = platform_dir / BUILD_DIR
            build_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            signed = {spec.name: build(spec, build_dir, state_dir) for spec in _release(release)}
        loader = GramineLoader(build_dir, signed, collateral, state_dir / PUBLIC_COLLATERAL)
        return cls(loader, signed, root_pem, collateral, platform_dir)

    @property
    def loader(self) -> GramineLoader:
        return self._loader

    @property
    def attestation_root_pem(self) -> bytes:
        """The root the collateral's chain ends in (Intel's on hardware; the enclaves
        check it against Intel's pinned root themselves)."""
        return self._root_pem

    def signed(self, spec: EnclaveSpec) -> EnclaveSpec:
        if spec.name not in self._signed:
            raise PlatformError(f"no signed Gramine enclave named {spec.name!r}")
        return spec

    def measure(self, spec: EnclaveSpec) -> bytes:
        """The MRENCLAVE gramine-sgx-sign put in ``spec``'s SIGSTRUCT."""
        signed = self._signed.get(spec.name)
        if signed is None:
            return GRAMINE.measure(spec)  # raises, saying where the value comes from
        return signed.sig.mrenclave

    def platform_quote(self, report_data: bytes) -> bytes:
        raise PlatformError(
            "platform 'gramine' gives hostd no quote of its own (a host process has no "
            "enclave to quote for it)"
        )

    def replace_collateral(self, collateral: str) -> None:
        """Take ``collateral`` for the enclaves launched from now on (see the module doc);
        PlatformError if it is not good without a quote, or older than the current copy."""
        try:
            dcap.check_collateral(self._root_pem, collateral)
            key = pccs.collateral_key(collateral)
            current_key = pccs.collateral_key(self._collateral)
        except pccs.PccsError as exc:
            raise PlatformError(str(exc)) from None
        if key != current_key:
            raise PlatformError(f"the collateral is for FMSPC {key[0]} ({key[1]} CA), not "
                                f"this platform's {current_key[0]} ({current_key[1]} CA)")
        try:
            dcap.check_collateral(self._root_pem, self._collateral)
            older = pccs.expiry(collateral) < pccs.expiry(self._collateral)
        except (PlatformError, pccs.PccsError):
            older = False  # the current copy no longer checks: any good one replaces it
        if older:
            raise PlatformError("the collateral expires before the platform's current copy")
        self._collateral = self._loader.collateral = collateral
        if self._platform_dir is None:
            return
        try:
            atomic_write(self._platform_dir / COLLATERAL_FILE, collateral.encode(), 0o644)
        except OSError as exc:  # platform/ is root's once hostd runs as --user
            log.log("platform.collateral_not_persisted", level="warning",
                    path=str(self._platform_dir / COLLATERAL_FILE), reason=exc.strerror,
                    effect="hostd's next start uses the copy there, then fetches again")

    def quote_verifier(self, root_pem: bytes, collateral: str | None = None) -> QuoteVerifier:
        return dcap.pinned_verifier(
            root_pem, self._collateral if collateral is None else collateral
        )

    def close(self) -> None:
        self._loader.close()


def _release(release: str) -> list[EnclaveSpec]:
    if not release:
        raise PlatformError("platform 'gramine' needs the release's enclave specs")
    module, _, function = release.partition(":")
    make: Callable[[PlatformKind], list[EnclaveSpec]] = getattr(
        importlib.import_module(module), function
    )
    return make(GRAMINE)
