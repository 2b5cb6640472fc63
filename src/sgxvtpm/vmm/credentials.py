"""The client side's credentials: what the operator and a VM's endpoint hold, not hostd.

hostd is the untrusted relay, so no private key lives in its state directory
(host/statedir.py). A credentials directory belongs to the user who runs the
VMM or a VM endpoint: ``--credentials DIR``, else ``$SGXVTPM_CONFIG_DIR``,
else ``$XDG_CONFIG_HOME/sgxvtpm``, else ``~/.config/sgxvtpm``. It is created
0700; private keys in it are 0600::

    operator.key/.crt        the operator identity (the manager pins its certificate)
    hosts/HOST/              one hostd, keyed by its state directory's path
        state_dir            that path, for people reading the directory
        root_ca.pem          its platform's attestation root, pinned at first contact
        vms/NAME/            one VM's binding: vm.key (0600), vm.crt, ca.crt, instance.json

Hosts are keyed by where hostd lives (its state directory, whose socket the
clients connect to), the way ssh's known_hosts keys on the host's name: a
host that later presents another attestation root is refused with a clear
error instead of being trusted anew. Keying on an identifier the host
published itself would let a replaced platform register as a new host.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.channel import ClientCredential
from sgxvtpm.enclaves.specs import expected_policy
from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.host.statedir import Directory, Entry, StateDir, user_dir
from sgxvtpm.platform import DEFAULT_PLATFORM, PCCS_URL_ENV, platform_kind
from sgxvtpm.platform.base import MeasurementPolicy, PlatformError, PlatformKind, QuoteVerifier
from sgxvtpm.util.durable import atomic_write
from sgxvtpm.util.keyfile import write_private_key
from sgxvtpm.vmm.pins import ENV as PINS_ENV
from sgxvtpm.vmm.pins import INTEL as INTEL_ROOT
from sgxvtpm.vmm.pins import GraminePins, PinsError
from sgxvtpm.vmm.pins import load as load_pins
from sgxvtpm.wire import relay as frames
from sgxvtpm.wire.control import (
    ControlProtocolError,
    GetPlatformRoot,
    Refused,
    reply_from_json,
    request_to_json,
)
from sgxvtpm.wire.k1 import InstanceInfo

# platform.dcap (dcap-qvl) and platform.pccs (an HTTP client) are imported where a
# quote verifier is built: every `sgxvtpm` command imports this module, hostd
# included, and most never verify a quote (~4 MB a process keeps for nothing).

ENV = "SGXVTPM_CONFIG_DIR"
COLLATERAL_ENV = "SGXVTPM_COLLATERAL"
# In hostd's platform directory: the sim platform's, and the one a Gramine host
# hands its enclaves (platform/gramine/launcher.py).
COLLATERAL_FILE = "collateral.json"
GRAMINE_COLLATERAL_FILE = "dcap-collateral.json"
OPERATOR_CN = "sgxvtpm operator"
ROOT_QUERY_TIMEOUT = 10.0
BINDING_FILES = ("vm.key", "vm.crt", "ca.crt", "instance.json")


class CredentialsError(SgxvtpmError):
    """A credential is missing, unreadable, or a pinned trust anchor changed (one line).

    The message names the file: restore it or fix its permissions; remove a
    pin only if its platform was replaced on purpose.
    """


def default_credentials_dir() -> Path:
    return user_dir(ENV, "XDG_CONFIG_HOME", ".config")


def private_directory(path: Path) -> None:
    """``path`` (its missing parents too) as a directory only its owner can enter."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise CredentialsError(
            f"{path} belongs to uid {st.st_uid}, not to this user: write credentials to a "
            "directory of yours, then hand it over (chown -R)"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        path.chmod(0o700)


@dataclass(frozen=True)
class Credentials(Directory):
    """One user's credentials directory (see the module doc)."""

    default = staticmethod(default_credentials_dir)

    operator_key = Entry("operator.key")

    operator_cert = Entry("operator.crt")

    def operator(self) -> ClientCredential:
        """The operator identity; CredentialsError if this directory has none."""
        try:
            return ClientCredential.load(self.operator_key, self.operator_cert)
        except (OSError, ValueError) as exc:
            raise CredentialsError(
                f"no usable operator identity in {self.root} ({_reason(exc)}); the first "
                "`sgxvtpm hostd` run by this user creates one"
            ) from None

    def operator_certificate(self) -> bytes:
        """The operator's certificate (all the manager needs: it pins it).

        If this directory holds no operator identity yet, one is created (key
        0600). A certificate alone is enough: its key may be kept elsewhere.
        """
        private_directory(self.root)
        # Two first starts at once must not pair one's key with the other's certificate.
        with _exclusive(self.root / ".lock"):
            if self.operator_cert.exists():
                pem = self.operator_cert.read_bytes()
                _certificate_der(pem, str(self.operator_cert))
                return pem
            if self.operator_key.exists():
                raise CredentialsError(f"{self.operator_key} has no certificate "
                                       f"{self.operator_cert.name} next to it")
            key = ec.generate_private_key(ec.SECP256R1())
            credential = ClientCredential.self_signed(key, OPERATOR_CN)
            write_private_key(self.operator_key, key)
            atomic_write(self.operator_cert, credential.cert_pem, 0o644)
            return credential.cert_pem

    def host(self, state: StateDir) -> HostCredentials:
        where = str(state.root.resolve())
        key = hashlib.sha256(where.encode()).hexdigest()[:16]
        return HostCredentials(self.root / "hosts" / key, state)


@dataclass(frozen=True)
class HostCredentials:
    """What one credentials directory holds for one hostd (``hosts/HOST``)."""

    root: Path
    state: StateDir

    root_ca = Entry("root_ca.pem")

    def vm(self, name: str) -> Path:
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise CredentialsError(f"{name!r} cannot name a VM: it must be one path component")
        return self.root / "vms" / name

    def existing_vm(self, name: str) -> Path:
        """:meth:`vm`, refused in one line naming the fix when VM ``name`` has no binding here."""
        path = self.vm(name)
        if not path.is_dir():
            raise CredentialsError(
                f"no VM named {name!r} has credentials in {self.root.parent.parent} for the "
                f"hostd of {self.state.root}: create it with `sgxvtpm vm create {name}`, or "
                "pass --credentials DIR where its binding was written"
            )
        return path

    def ensure(self) -> None:
        for directory in (self.root.parent.parent, self.root.parent, self.root):
            private_directory(directory)
        marker = self.root / "state_dir"
        if not marker.exists():
            atomic_write(marker, f"{self.state.root.resolve()}\n".encode(), 0o644)

    def attestation_root(self) -> bytes:
        """The platform root this client trusts for the host, pinned on first contact.

        Quotes are checked against the pinned bytes only; what hostd answers now
        is only compared with them, so that a changed platform is refused with
        a clear error rather than a failed handshake.
        """
        if self.platform.name == "gramine":
            return self._gramine_root()
        presented = presented_root(self.state.socket)
        pinned = _read_pin(self.root_ca)
        if pinned is None and presented is None:
            raise CredentialsError(
                f"cannot reach hostd at {self.state.socket} to learn its platform's "
                f"attestation root (none pinned in {self.root_ca} yet): start it with "
                f"`sgxvtpm hostd --state-dir {self.state.root}`"
            )
        if pinned is None:
            assert presented is not None
            self.pin(presented)
            return presented
        if presented is not None:
            check_pin(self.root_ca, pinned, presented, self.state.socket)
        return pinned

    @property
    def platform(self) -> PlatformKind:
        """The kind of platform this host's enclaves run on: how their quotes are
        checked and which MRENCLAVE to expect (enclaves/specs.py, expected_policy).

        The verifier's own choice, never the host's claim: ``$SGXVTPM_PLATFORM``
        (``sim``, ``gramine-sim``, ``gramine``: the kind hostd runs with ``--platform``;
        ``gramine`` takes its policy and root from the operator's pins, vmm/pins.py),
        else the default, ``sim``.
        """
        return platform_kind(os.environ.get("SGXVTPM_PLATFORM") or DEFAULT_PLATFORM)

    def verifier(self) -> QuoteVerifier:
        return verifier_for(self, self.attestation_root())

    def pins(self) -> GraminePins:
        """The operator's pins for a Gramine host (vmm/pins.py): never read from hostd."""
        try:
            return load_pins(self.root.parent.parent)
        except PinsError as exc:
            raise CredentialsError(str(exc)) from None

    def policy(self, role: str) -> MeasurementPolicy:
        """Which ``role`` ("manager" or "instance") enclaves this client accepts: the
        MRENCLAVE of the code installed here on the sim kinds; on ``gramine``, the
        operator's pins (MRENCLAVE and MRSIGNER of a trusted build, vmm/pins.py). On the
        sim kinds too when ``$SGXVTPM_MEASUREMENTS`` names pins: a pre-signed release's
        ``release.json``, copied from the vendor (platform/release.py)."""
        if self.platform.name == "gramine" or os.environ.get(PINS_ENV):
            return self.pins().policy(role)
        return expected_policy(role, self.platform)

    def _gramine_root(self) -> bytes:
        """A Gramine host's root comes from the operator's pins, never from hostd:
        Intel's SGX Root CA (taken from the collateral, checked against its pinned
        SHA-256) or the PEM certificate the pins name."""
        root = self.pins().root
        if root != INTEL_ROOT:
            return root.encode()
        from sgxvtpm.platform import dcap, pccs  # see the module's imports

        url = self.pccs_url()
        if url:
            try:
                return pccs.intel_root_pem(url)
            except pccs.PccsError as exc:
                raise CredentialsError(str(exc)) from None
        try:
            der = dcap.intel_root(dcap.load_collateral(self.collateral()))
        except PlatformError as exc:
            raise CredentialsError(f"{self.collateral_source()}: {exc}") from None
        return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)

    def collateral_source(self) -> Path:
        env = os.environ.get(COLLATERAL_ENV)
        if env:
            return Path(env)
        # hostd's public copy first (platform/ is root's alone when hostd runs --user)
        for path in (self.state.collateral, self.state.platform / COLLATERAL_FILE):
            if path.exists():
                return path
        return self.state.platform / GRAMINE_COLLATERAL_FILE

    def pccs_url(self) -> str:
        """The PCCS to fetch collateral from when no collateral file is given ("" if none):
        ``$SGXVTPM_PCCS_URL``, else a Gramine host's pins' ``pccs`` (vmm/pins.py)."""
        if os.environ.get(COLLATERAL_ENV) or self.collateral_source().exists():
            return ""
        url = os.environ.get(PCCS_URL_ENV, "")
        if not url and self.platform.name == "gramine":
            url = self.pins().pccs
        return url

    def collateral(self) -> str:
        """The DCAP collateral the host's quotes are checked with (platform/dcap.py).

        ``$SGXVTPM_COLLATERAL`` (a file) if set, else hostd's public copy
        (``collateral.json`` in its state directory), else the file in its
        platform directory (the sim's ``collateral.json``, a Gramine host's
        ``dcap-collateral.json``). Untrusted bytes, from
        the host or anywhere: every part is signed under the pinned root and
        checked against it at each verification (SECURITY.md).
        """
        path = self.collateral_source()
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialsError(
                f"no DCAP collateral for the hostd of {self.state.root}: "
                f"{_reason(exc)} (set ${COLLATERAL_ENV} to a QuoteCollateralV3 JSON file)"
            ) from None

    def pin(self, pem: bytes) -> None:
        """Pin ``pem`` as this host's attestation root; a different existing pin is an error."""
        self.ensure()
        with _exclusive(self.root / ".lock"):
            pinned = _read_pin(self.root_ca)
            if pinned is not None:
                check_pin(self.root_ca, pinned, pem, self.state.socket)
                return
            _certificate_der(pem, "the presented attestation root")
            atomic_write(self.root_ca, pem, 0o644)

    def write_binding(
        self,
        name: str,
        *,
        key: ec.EllipticCurvePrivateKey | None,
        vm_cert_pem: str,
        ca_cert_pem: str,
        instance: InstanceInfo,
    ) -> Path:
        """Store VM ``name``'s binding (the key only when this side generated it)."""
        self.ensure()
        directory = self.vm(name)
        private_directory(directory.parent)
        private_directory(directory)
        # Unlinked first: a key of an earlier VM of that name must not stay next to the
        # new certificate, and the new key file is created 0600, whatever the old one was.
        (directory / "vm.key").unlink(missing_ok=True)
        if key is not None:
            write_private_key(directory / "vm.key", key)
        atomic_write(directory / "vm.crt", vm_cert_pem.encode(), 0o644)
        atomic_write(directory / "ca.crt", ca_cert_pem.encode(), 0o644)
        atomic_write(directory / "instance.json",
                     (json.dumps(instance.to_json(), indent=2) + "\n").encode(), 0o644)
        return directory

    def remove_binding(self, name: str) -> None:
        directory = self.vm(name)
        for child in BINDING_FILES:
            (directory / child).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: leave what we did not write
            directory.rmdir()


def verifier_for(host: HostCredentials, pem: bytes) -> QuoteVerifier:
    """The DCAP verifier of ``host``'s quotes under ``pem`` (its pinned root), with the
    host's collateral, both held in memory: never re-read."""
    url = host.pccs_url()
    if url:  # no collateral file: each quote's from the PCCS, fetched then cached
        from sgxvtpm.platform import pccs  # see the module's imports

        return pccs.PccsVerifier(url, lambda collateral: _dcap_verifier(host, pem, collateral))
    try:
        return _dcap_verifier(host, pem, host.collateral())
    except PlatformError as exc:  # AttestationError (the collateral) is one
        raise CredentialsError(f"{host.root_ca}: {exc}") from None


def _dcap_verifier(host: HostCredentials, pem: bytes, collateral: str) -> QuoteVerifier:
    if host.platform.name == "gramine" and host.pins().root != INTEL_ROOT:
        # The operator pinned another DCAP root than Intel's (vmm/pins.py).
        from sgxvtpm.platform import dcap  # see the module's imports

        return dcap.pinned_verifier(pem, collateral)
    return host.platform.quote_verifier(pem, collateral)


def hostd_operator_certificate(state: StateDir, cert_file: Path | None) -> bytes:
    """The operator's certificate ``sgxvtpm hostd`` gives its manager to pin (never the key).

    From ``cert_file`` (``--operator-cert``), else from the invoking user's
    credentials directory, where an operator identity is created if there is
    none yet (hostd calls this before any privilege drop, as that user).
    Refused while ``state`` still holds client private keys, as older
    versions kept them there.
    """
    refuse_legacy_keys(state)
    if cert_file is None:
        try:
            return Credentials.at(None).operator_certificate()
        except (CredentialsError, OSError) as exc:
            raise CredentialsError(f"operator identity: {exc}") from None
    try:
        pem = cert_file.read_bytes()
        x509.load_pem_x509_certificate(pem)
    except OSError as exc:
        raise CredentialsError(f"--operator-cert {cert_file}: {exc.strerror}") from None
    except ValueError:
        raise CredentialsError(f"--operator-cert {cert_file}: not a PEM certificate") from None
    return pem


def refuse_legacy_keys(state: StateDir) -> None:
    """Older versions kept the operator's and the VMs' private keys in hostd's state
    directory; refuse to start hostd on them."""
    found = state.legacy_client_keys()
    if not found:
        return
    creds = Credentials.at(None)
    names = ", ".join(str(p.relative_to(state.root)) for p in found)
    raise CredentialsError(
        f"{state.root} holds client private keys in the clear ({names}), which hostd no longer "
        f"keeps: as the operator, move operator.key and operator.crt to {creds.root}/ and each "
        f"vms/NAME/ to {creds.host(state).root}/vms/NAME/ ({ENV} chooses another "
        "credentials directory), then start hostd again"
    )


def check_pin(pin: Path, pinned: bytes, presented: bytes, where: Path) -> None:
    """CredentialsError unless ``presented`` is the very certificate pinned in ``pin``."""
    old = _certificate_der(pinned, str(pin))
    new = _certificate_der(presented, f"the attestation root of hostd at {where}")
    if old != new:
        raise CredentialsError(
            f"hostd at {where} presents another platform attestation root "
            f"(sha256 {hashlib.sha256(new).hexdigest()[:16]}) than the one pinned in {pin} "
            f"on first contact (sha256 {hashlib.sha256(old).hexdigest()[:16]}); if that "
            f"platform was replaced on purpose, remove {pin} to trust the new one"
        )


def presented_root(sock: Path, timeout: float = ROOT_QUERY_TIMEOUT) -> bytes | None:
    """The attestation root hostd at ``sock`` says its platform has; None if unreachable."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(sock))
            conn.sendall(frames.encode(frames.Frame.control(request_to_json(GetPlatformRoot()))))
            decoder = frames.RelayDecoder()
            while (frame := decoder.next_frame()) is None:
                data = conn.recv(65536)
                if not data:
                    return None
                decoder.receive_data(data)
        reply = reply_from_json(GetPlatformRoot(), frame.control_object())
    except (OSError, frames.RelayProtocolError, ControlProtocolError):
        return None
    return None if isinstance(reply, Refused) else reply.root_ca_pem.encode()


def _read_pin(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialsError(f"cannot read the pinned attestation root {path}: "
                               f"{exc.strerror}") from None


def _certificate_der(pem: bytes, where: str) -> bytes:
    try:
        return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise CredentialsError(f"{where} is not a PEM certificate") from None


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__
