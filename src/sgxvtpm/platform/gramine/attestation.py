"""What a Gramine enclave sees from inside: /dev/attestation, as an EnclavePlatform.

Gramine (Documentation/attestation.rst, libos/src/fs/dev/attestation.c)
gives an SGX enclave these pseudo-files:

- ``attestation_type``: ``dcap`` with ``sgx.remote_attestation = "dcap"``;
- ``my_target_info``: this enclave's TARGETINFO (512 bytes);
- ``user_report_data`` (write, 64 bytes) and ``target_info`` (write, 512):
  what the next ``report`` is over and for;
- ``report``: the REPORT (432 bytes) EREPORT makes from the two above;
- ``quote``: a DCAP quote whose REPORTDATA is ``user_report_data``;
- ``keys/_sgx_mrenclave``, ``keys/_sgx_mrsigner``: the 16-byte SEAL keys
  EGETKEY gives for the current CPUSVN, ISVSVN and CONFIGSVN, KEYID zero,
  Gramine's attribute masks (pal/src/host/linux-sgx, sgx_get_seal_key).

:class:`GramineEnclavePlatform` builds base.EnclavePlatform on them. Its
identity comes from a REPORT it makes for itself. What the pseudo-files do
not give, EGETKEY of other keys (the REPORT key that local attestation
needs, SEAL keys of an older ISVSVN or CPUSVN), goes to a small trusted
helper (:class:`EgetkeyHelper`: one KEYREQUEST in, one key out). Gramine
has no monotonic counters, so they come from a base.CounterBackend.

Every multi-file exchange (write, then read) holds one lock: the
pseudo-files are per process, and two threads interleaving would get a
quote over the other's data.
"""

from __future__ import annotations

import hmac
import os
import threading
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms

from sgxvtpm.platform import base
from sgxvtpm.platform.dcap import parse_sgx_body
from sgxvtpm.platform.gramine.structs import (
    TARGET_INFO_SIZE,
    pack_key_request,
    pack_target_info,
)
from sgxvtpm.util import log

ATTESTATION_ROOT = Path("/dev/attestation")
KEY_SIZE = 16
_READ_MAX = 64 * 1024  # a DCAP quote with its PCK chain is ~5 KiB
_SEAL_KEY_FILES = {
    base.KeyPolicy.MRENCLAVE: "_sgx_mrenclave",
    base.KeyPolicy.MRSIGNER: "_sgx_mrsigner",
}


class EgetkeyHelper(Protocol):
    """EGETKEY for the calling enclave: a 512-byte KEYREQUEST in, a 16-byte key out.

    On SGX, a measured shared object (``egetkey.c`` here, listed in
    ``sgx.trusted_files``) runs ENCLU[EGETKEY] in the enclave; in gramine-sim
    the sim CPU answers for the enclave's identity. PlatformError where
    EGETKEY fails (an SVN above the enclave's, a key its ATTRIBUTES forbid).
    """

    def egetkey(self, key_request: bytes) -> bytes: ...


class NoCounters:
    """The counter backend of a Gramine enclave with none configured: every call refuses."""

    def _refuse(self, name: str) -> int:
        raise base.PlatformError(
            f"counter {name!r}: Gramine has no monotonic counters and no counter backend "
            "is configured (docs/REAL-SGX.md, 'Rollback counters')"
        )

    counter_create = counter_increment = counter_read = _refuse


class AttestationFiles:
    """The /dev/attestation pseudo-files under ``root``, read and written as Gramine documents."""

    def __init__(self, root: Path = ATTESTATION_ROOT) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    def _read(self, name: str) -> bytes:
        fd = os.open(self.root / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(fd, _READ_MAX):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _write(self, name: str, data: bytes) -> None:
        fd = os.open(self.root / name, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if os.write(fd, data) != len(data):
                raise base.PlatformError(f"/dev/attestation/{name}: short write")
        finally:
            os.close(fd)

    def attestation_type(self) -> str:
        return self._read("attestation_type").decode("ascii", "replace").strip()

    def my_target_info(self) -> bytes:
        return self._checked("my_target_info", self._read("my_target_info"), TARGET_INFO_SIZE)

    def report(self, target_info: bytes, report_data: bytes) -> bytes:
        with self._lock:
            self._write("user_report_data", report_data)
            self._write("target_info", target_info)
            return self._checked("report", self._read("report"), base.REPORT_SIZE)

    def quote(self, report_data: bytes) -> bytes:
        with self._lock:
            self._write("user_report_data", report_data)
            return self._read("quote")

    def seal_key(self, policy: base.KeyPolicy) -> bytes:
        name = _SEAL_KEY_FILES[policy]
        return self._checked(f"keys/{name}", self._read(f"keys/{name}"), KEY_SIZE)

    @staticmethod
    def _checked(name: str, data: bytes, size: int) -> bytes:
        if len(data) != size:
            raise base.PlatformError(f"/dev/attestation/{name} gave {len(data)} bytes, not {size}")
        return data


class GramineEnclavePlatform(base.CountersFrom):
    """base.EnclavePlatform of a Gramine SGX enclave, over its /dev/attestation files.

    ``verifier``: how this enclave checks its peers' quotes (DCAP under a
    pinned root, built by the bootstrap, never from the host's arguments
    alone). ``egetkey``: the trusted helper for keys the pseudo-files do not
    give (None: those calls raise PlatformError). ``counters``: the counter
    backend (default: none, every counter call refuses).
    """

    def __init__(
        self,
        files: AttestationFiles,
        *,
        verifier: base.QuoteVerifier,
        egetkey: EgetkeyHelper | None = None,
        counters: base.CounterBackend | None = None,
    ) -> None:
        self._files = files
        self._verifier = verifier
        self._egetkey = egetkey
        self._counters: base.CounterBackend = counters if counters is not None else NoCounters()
        kind = files.attestation_type()
        if kind != "dcap":
            raise base.PlatformError(
                f"/dev/attestation/attestation_type is {kind!r}: the manifest needs "
                'sgx.remote_attestation = "dcap"'
            )
        # Our identity, from a REPORT we make for ourselves.
        me = files.my_target_info()
        report = files.report(me, bytes(base.REPORT_DATA_SIZE))
        body = parse_sgx_body(report[:base.REPORT_BODY_SIZE])
        self._identity = body.identity
        self._cpu_svn = body.cpu_svn

    @property
    def identity(self) -> base.EnclaveIdentity:
        return self._identity

    def quote_verifier(self) -> base.QuoteVerifier:
        return self._verifier

    def get_key(self, request: base.KeyRequest) -> bytes:
        """A SEAL key as Gramine derives it comes from keys/; any other from the helper."""
        policy = self._gramine_seal_policy(request)
        if policy is not None:
            return self._files.seal_key(policy)
        if self._egetkey is None:
            raise base.PlatformError(
                f"EGETKEY {request.key_name.name}: /dev/attestation/keys has no such key and "
                "this enclave has no EGETKEY helper"
            )
        key = self._egetkey.egetkey(pack_key_request(request))
        if len(key) != KEY_SIZE:
            raise base.PlatformError("the EGETKEY helper answered a key of the wrong size")
        return key

    def _gramine_seal_policy(self, request: base.KeyRequest) -> base.KeyPolicy | None:
        """The policy, if ``request`` is exactly the KEYREQUEST behind a keys/ file."""
        if (
            request.key_name is base.KeyName.SEAL
            and request.key_policy in _SEAL_KEY_FILES
            and request.isv_svn == self._identity.isv_svn
            and request.cpu_svn == self._cpu_svn
            and request.config_svn == 0
            and request.key_id == bytes(32)
        ):
            return base.KeyPolicy(request.key_policy)
        return None

    def report(self, target: base.TargetInfo, report_data: bytes) -> bytes:
        base.check_report_data(report_data)
        return self._files.report(pack_target_info(target), report_data)

    def verify_report(self, report: bytes) -> base.ReportBody:
        """Local attestation: the REPORT key (EGETKEY via the helper) must verify the MAC."""
        report = bytes(report)
        if len(report) != base.REPORT_SIZE:
            raise base.AttestationError("report verification failed")
        body, key_id, mac = report[:base.REPORT_BODY_SIZE], report[384:416], report[416:]
        key = self.get_key(
            base.KeyRequest(key_name=base.KeyName.REPORT, cpu_svn=self._cpu_svn, key_id=key_id)
        )
        c = cmac.CMAC(algorithms.AES(key))
        c.update(body)
        if not hmac.compare_digest(c.finalize(), mac):
            log.log("platform.report_rejected", reason="REPORT MAC does not verify")
            raise base.AttestationError("report verification failed")
        return parse_sgx_body(body)

    def quote(self, report_data: bytes) -> bytes:
        base.check_report_data(report_data, "quote")
        quote = self._files.quote(report_data)
        if not quote:
            raise base.PlatformError("/dev/attestation/quote gave no quote")
        return quote
