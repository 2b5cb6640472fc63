"""A simulated SGX platform, kept in one directory.

Layout (directory mode 0700):

  fuse.key             32-byte root secret, mode 0600 (the only clear secret)
  keys.json            private keys (root CA, PCK, attestation, and the vendor's
                       enclave signer unless provisioned by ``hostd --release DIR``),
                       each AES-256-GCM wrapped under a key derived from fuse.key
  root_ca.pem          provisioning root certificate (give this to verifiers)
  pck.pem              this platform's PCK certificate
  platform.json        platform id and QE certification data (public);
                       written last, so its presence marks a complete platform
  counters/            monotonic counters

Two directories have independent fuse keys, roots and identities.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import stat
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.platform.base import EnclaveIdentity, EnclaveSpec, PlatformError
from sgxvtpm.platform.sim import egetkey, keywrap, provision
from sgxvtpm.platform.sim.authority import SimAuthority
from sgxvtpm.platform.sim.counters import CounterStore, derive_counter_key
from sgxvtpm.platform.sim.enclave import SimEnclavePlatform
from sgxvtpm.platform.sim.quote import QuotingEnclave, SimQuoteVerifier
from sgxvtpm.util.durable import atomic_write

if TYPE_CHECKING:
    from sgxvtpm.platform.sim.loader import SimLoader

FUSE_KEY = "fuse.key"
KEYS = "keys.json"
ROOT_PEM = "root_ca.pem"
PCK_PEM = "pck.pem"
PLATFORM_JSON = "platform.json"
# DCAP collateral (public, dcap-qvl QuoteCollateralV3 JSON), written at provisioning.
COLLATERAL_JSON = "collateral.json"

#: The identity the platform quotes for hostd's collateral checks (probe_quote): not
#: an enclave (no code has it; no SIGSTRUCT key hashes to an MRSIGNER of zeros).
PROBE = EnclaveIdentity(
    mrenclave=hashlib.sha256(b"sgxvtpm platform probe: not an enclave").digest(),
    mrsigner=bytes(32),
    isv_prod_id=0xFFFF,
    isv_svn=0,
)
COUNTERS = "counters"
_FORMAT = 1


class SimPlatformDir:
    """One simulated platform: its fuse key, attestation chain, signer and counters."""

    def __init__(self, path: Path) -> None:
        """Open an existing platform directory (use :meth:`open_or_create`)."""
        self.path = Path(path)
        self._root_secret = _read_fuse_key(self.path / FUSE_KEY)
        try:
            meta = json.loads((self.path / PLATFORM_JSON).read_text())
            if meta.get("format") != _FORMAT:
                raise PlatformError(
                    f"{self.path}: unsupported platform format {meta.get('format')}"
                )
            self.platform_id = bytes.fromhex(meta["platform_id"])
            self._certification = provision.Certification(
                root_pem=(self.path / ROOT_PEM).read_bytes(),
                pck_pem=(self.path / PCK_PEM).read_bytes(),
                qe_report_body=bytes.fromhex(meta["qe_report_body"]),
                qe_report_signature=bytes.fromhex(meta["qe_report_signature"]),
            )
            self._wrapped = {
                k: bytes.fromhex(v) for k, v in json.loads((self.path / KEYS).read_text()).items()
            }
            # b"": no vendor key here (provisioned for a pre-signed release).
            self.signer_public_key = bytes.fromhex(meta.get("signer_public_key", ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PlatformError(f"{self.path} is not a complete sim platform: {exc}") from exc
        # CR_REPORT_KEYID: random per "boot" (per opening of the platform).
        self._report_key_id = os.urandom(32)

    @classmethod
    def open_or_create(
        cls,
        path: Path,
        *,
        root_secret: bytes | None = None,
        keys: provision.PlatformKeys | None = None,
        platform_id: bytes | None = None,
        now: datetime.datetime | None = None,
        authority: SimAuthority | None = None,
        vendor_key: bool = True,
    ) -> SimPlatformDir:
        """Open the platform at ``path``, provisioning a new one if there is none.

        ``authority`` (hostd --sim-root): a new platform's PCK is issued by that
        authority's root and its signer is the authority's vendor key; an
        existing platform must already be under that root (PlatformError else).
        ``vendor_key=False`` (hostd --release DIR): a new platform gets no vendor
        signing key (the vendor signed the release elsewhere: ``sgxvtpm release sign``).
        The other keyword arguments fix the randomness and time of provisioning,
        for known-answer tests; leave them out otherwise.
        """
        path = Path(path)
        # A platform that lost a file is not a new platform: provisioning over
        # it would make every sealed state and counter on it useless.
        damaged = (
            f"the sim platform at {path} is incomplete or damaged ({{}}); restore it from a "
            "backup, or remove the directory to provision a new platform (every VM sealed "
            "to the old one is then lost)"
        )
        if not (path / PLATFORM_JSON).exists():
            if path.exists() and any(path.iterdir()):
                raise PlatformError(damaged.format(f"no {PLATFORM_JSON}"))
            if keys is None:
                keys = (
                    authority.platform_keys()
                    if authority is not None
                    else provision.PlatformKeys.generate(vendor_key=vendor_key)
                )
            if not vendor_key:
                keys = dataclasses.replace(keys, signer=None)
            _provision(
                path,
                root_secret if root_secret is not None else os.urandom(32),
                keys,
                platform_id if platform_id is not None else os.urandom(16),
                now if now is not None else datetime.datetime.now(datetime.UTC),
                root_pem=authority.root_pem if authority is not None else None,
            )
        try:
            platform = cls(path)
        except PlatformError as exc:
            raise PlatformError(damaged.format(exc)) from None
        signers = (platform.signer_public_key, authority.signer_public_der() if authority else b"")
        if authority is not None and (
            platform.root_certificate_pem != authority.root_pem
            # Both known (neither opened for a pre-signed release): the same vendor.
            or (all(signers) and signers[0] != signers[1])
        ):
            raise PlatformError(
                f"the sim platform at {path} was provisioned under another root than the sim "
                f"root {authority.path}: use another state directory for this host"
            )
        return platform

    @property
    def root_certificate_pem(self) -> bytes:
        return self._certification.root_pem

    @cached_property
    def _base_key(self) -> bytes:
        return egetkey.derive_base_key(self._root_secret)

    def _private_key(self, name: str) -> ec.EllipticCurvePrivateKey:
        wrap_key = keywrap.derive_wrap_key(self._root_secret)
        return keywrap.unwrap_private_key(wrap_key, name, self._wrapped[name])

    @cached_property
    def quoting_enclave(self) -> QuotingEnclave:
        return QuotingEnclave(
            base_key=self._base_key,
            attestation_key=self._private_key("attestation"),
            certification=self._certification,
            platform_id=self.platform_id,
        )

    @cached_property
    def counters(self) -> CounterStore:
        return CounterStore(self.path / COUNTERS, derive_counter_key(self._root_secret))

    def verifier(self) -> SimQuoteVerifier:
        return SimQuoteVerifier(self.root_certificate_pem)

    def dcap_collateral(self) -> str:
        """The platform's DCAP collateral (QuoteCollateralV3 JSON) for platform/dcap.py.

        Platforms provisioned before sgxvtpm wrote it have none (and a PCK
        certificate without the SGX extension): PlatformError.
        """
        try:
            return (self.path / COLLATERAL_JSON).read_text()
        except OSError as exc:
            raise PlatformError(f"{self.path} has no DCAP collateral: {exc}") from None

    def probe_quote(self, report_data: bytes) -> bytes:
        """A quote of :data:`PROBE` (no enclave: no policy accepts its MRSIGNER of
        zeros) over ``report_data``: what hostd fetches and checks this platform's
        collateral with (``hostd --pccs``, host/collateral.py)."""
        return self.enclave_platform(PROBE).quote(report_data)

    def replace_collateral(self, collateral: str) -> None:
        """Store ``collateral`` as the collateral every enclave launched from now on
        gets, if it verifies this platform's own quote under its root at the current
        time and expires no earlier than the copy it has, if that one still verifies
        (PlatformError if not): hostd asks it of the platform, which does not take
        the host's word for it, nor an older copy that would hide a newer TCB status."""
        from sgxvtpm.platform import dcap, pccs

        quote = self.probe_quote(bytes(64))
        dcap.pinned_verifier(self.root_certificate_pem, collateral).check(quote)
        try:
            current = self.dcap_collateral()
            dcap.pinned_verifier(self.root_certificate_pem, current).check(quote)
            older = pccs.expiry(collateral) < pccs.expiry(current)
        except (PlatformError, pccs.PccsError):
            older = False  # no copy, or one that no longer verifies: any good one replaces it
        if older:
            raise PlatformError("the collateral expires before the platform's current copy")
        atomic_write(self.path / COLLATERAL_JSON, collateral.encode(), 0o644)

    def enclave_platform(
        self, identity: EnclaveIdentity, *, config: bytes = b""
    ) -> SimEnclavePlatform:
        """The platform face an enclave with ``identity`` gets (the loader uses this)."""
        return SimEnclavePlatform(
            identity,
            base_key=self._base_key,
            quoting_enclave=self.quoting_enclave,
            counters=self.counters,
            report_key_id=self._report_key_id,
            config=config,
            collateral=self._collateral_or_none(),
            collateral_source=self._collateral_or_none,
        )

    def _collateral_or_none(self) -> str:
        try:
            return self.dcap_collateral()
        except PlatformError:
            return ""

    def signer_private_key(self) -> ec.EllipticCurvePrivateKey:
        """The vendor's enclave signing key (unwrapped on demand); PlatformError if
        this platform was provisioned without one (for a pre-signed release)."""
        if "signer" not in self._wrapped:
            raise PlatformError(
                f"the sim platform at {self.path} holds no vendor signing key (it was "
                "provisioned for a pre-signed release): start hostd with --release DIR"
            )
        return self._private_key("signer")

    def sign(self, spec: EnclaveSpec) -> EnclaveSpec:
        """The vendor's step, in process: ``spec`` with a SIGSTRUCT by this platform's key."""
        from sgxvtpm.platform.sim import sigstruct
        from sgxvtpm.platform.sim.measure import attributes_of, mrenclave_of, read_code

        mrenclave = mrenclave_of(spec.entry, read_code(spec.code_files), spec.config)
        sig = sigstruct.sign(
            self.signer_private_key(),
            mrenclave,
            attributes_of(spec.debug),
            spec.isv_prod_id,
            spec.isv_svn,
        )
        return dataclasses.replace(spec, sigstruct=sig.encode())

    def loader(self, preload: Sequence[str] = ()) -> SimLoader:
        """A loader for enclaves on this platform (it starts the platform's CPU process).

        ``preload``: modules the zygote pre-imports.
        """
        from sgxvtpm.platform.sim.loader import SimLoader

        return SimLoader(self.path, preload=preload)


def _read_fuse_key(path: Path) -> bytes:
    try:
        st = path.stat()
        secret = path.read_bytes()
    except OSError as exc:
        raise PlatformError(f"cannot read the platform fuse key {path}: {exc}") from exc
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise PlatformError(f"{path} is readable by group or others; chmod 0600 it")
    if len(secret) != 32:
        raise PlatformError(f"{path} is damaged: {len(secret)} bytes, expected 32")
    return secret


def _provision(
    path: Path,
    root_secret: bytes,
    keys: provision.PlatformKeys,
    platform_id: bytes,
    now: datetime.datetime,
    root_pem: bytes | None = None,
) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    atomic_write(path / FUSE_KEY, root_secret, 0o600)
    wrap_key = keywrap.derive_wrap_key(root_secret)
    wrapped = {n: keywrap.wrap_private_key(wrap_key, n, k).hex() for n, k in keys.by_name().items()}
    atomic_write(path / KEYS, json.dumps(wrapped, indent=1).encode(), 0o600)
    cert = provision.certify(keys, platform_id, now, root_pem)
    atomic_write(path / ROOT_PEM, cert.root_pem, 0o644)
    atomic_write(path / PCK_PEM, cert.pck_pem, 0o644)
    collateral = provision.collateral(keys.root_ca, cert.root_pem, now)
    atomic_write(path / COLLATERAL_JSON, collateral.encode(), 0o644)
    meta = {
        "format": _FORMAT,
        "platform_id": platform_id.hex(),
        "qe_report_body": cert.qe_report_body.hex(),
        "qe_report_signature": cert.qe_report_signature.hex(),
    }
    if keys.signer is not None:
        meta["signer_public_key"] = provision.spki_der(keys.signer.public_key()).hex()
    atomic_write(path / PLATFORM_JSON, json.dumps(meta, indent=1).encode(), 0o644)
