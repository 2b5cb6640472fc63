"""What a simulated enclave sees from inside: EGETKEY, EREPORT, quotes, counters."""

from __future__ import annotations

import abc
import hmac
from collections.abc import Callable

from sgxvtpm.platform.base import (
    AttestationError,
    EnclaveIdentity,
    KeyRequest,
    PlatformError,
    QuoteVerifier,
    ReportBody,
    TargetInfo,
    check_report_data,
)
from sgxvtpm.platform.sim import egetkey
from sgxvtpm.platform.sim.counters import CounterStore
from sgxvtpm.platform.sim.quote import QuotingEnclave
from sgxvtpm.platform.sim.report import pack_report_body, parse_report_body, split_report
from sgxvtpm.util import log


def dcap_verifier(
    root_pem: bytes, collateral: str, latest: Callable[[], str] | None = None
) -> QuoteVerifier:
    """What a sim enclave checks its peers with: DCAP (platform/dcap.py), as on SGX.

    Both come from the platform (the sim CPU), never from the host's launch
    arguments; the root is the one the enclave trusts, the collateral is checked
    against it. A platform provisioned before it had collateral cannot attest.
    ``latest`` gives the platform's current collateral (the CPU's copy, which
    ``hostd --pccs`` refreshes): a quote that fails with ``collateral`` is tried
    with it (dcap.RefreshingVerifier).
    """
    from sgxvtpm.platform import dcap

    if not collateral:
        raise PlatformError("this sim platform has no DCAP collateral (provisioned by an older "
                            "sgxvtpm): provision a new platform directory")
    if latest is not None:
        return dcap.RefreshingVerifier(root_pem, collateral, latest)
    return dcap.pinned_verifier(root_pem, collateral)


class SimEnclaveFace(abc.ABC):
    """What both sides of a sim enclave's EnclavePlatform answer alike: its identity,
    and peers' quotes checked under its platform's root and collateral."""

    _identity: EnclaveIdentity
    collateral: str

    @property
    def identity(self) -> EnclaveIdentity:
        return self._identity

    @property
    @abc.abstractmethod
    def attestation_root_pem(self) -> bytes:
        """The root a verifier inside this enclave trusts."""

    def current_collateral(self) -> str:
        """The platform's collateral now (``hostd --pccs`` may have refreshed the
        launch's copy)."""
        return self.collateral

    def quote_verifier(self) -> QuoteVerifier:
        return dcap_verifier(self.attestation_root_pem, self.collateral, self.current_collateral)


class SimEnclavePlatform(SimEnclaveFace):
    """base.EnclavePlatform for one enclave identity on one simulated platform.

    ``report_key_id`` plays CR_REPORT_KEYID, which SGX randomises at boot and
    EREPORT copies into every REPORT's KEYID. ``config`` is the enclave's
    measured configuration (sim-only convenience; not in base.EnclavePlatform).
    ``collateral`` is the platform's DCAP collateral (public, signed under its
    root): peers' quotes are checked with it through platform/dcap.py.
    """

    def __init__(
        self,
        identity: EnclaveIdentity,
        *,
        base_key: bytes,
        quoting_enclave: QuotingEnclave,
        counters: CounterStore,
        report_key_id: bytes,
        cpu_svn: bytes = bytes(16),
        config: bytes = b"",
        collateral: str = "",
        collateral_source: Callable[[], str] | None = None,
    ) -> None:
        self._identity = identity
        self._base_key = base_key
        self._qe = quoting_enclave
        self._counters = counters
        self._report_key_id = report_key_id
        self._cpu_svn = cpu_svn
        self.config = config
        self.collateral = collateral
        self._collateral_source = collateral_source

    @property
    def attestation_root_pem(self) -> bytes:
        """The root a verifier inside this enclave trusts.

        On SGX hardware Intel's root certificate is compiled into the enclave
        code; here it is the simulated platform's root, taken from the platform
        itself and never from the host's launch arguments.
        """
        return self._qe.certification.root_pem

    def current_collateral(self) -> str:
        """The platform's collateral now (the CPU's copy may be newer than the launch's)."""
        if self._collateral_source is None:
            return self.collateral
        return self._collateral_source()

    def get_key(self, request: KeyRequest) -> bytes:
        return egetkey.egetkey(self._base_key, self._identity, request, self._cpu_svn)

    def report(self, target: TargetInfo, report_data: bytes) -> bytes:
        """EREPORT: our REPORT body, MAC'd with the *target's* REPORT key."""
        check_report_data(report_data)
        body = pack_report_body(
            ReportBody(identity=self._identity, report_data=report_data, cpu_svn=self._cpu_svn)
        )
        key = egetkey.report_key(
            self._base_key,
            target.mrenclave,
            target.attributes,
            target.misc_select,
            self._report_key_id,
            self._cpu_svn,
        )
        return body + self._report_key_id + egetkey.aes_cmac(key, body)

    def verify_report(self, report: bytes) -> ReportBody:
        """Local attestation: check a REPORT targeted at us with our REPORT key."""
        try:
            body, key_id, mac = split_report(bytes(report))
            key = egetkey.report_key(
                self._base_key,
                self._identity.mrenclave,
                self._identity.attributes,
                self._identity.misc_select,
                key_id,
                self._cpu_svn,
            )
            if not hmac.compare_digest(egetkey.aes_cmac(key, body), mac):
                raise ValueError("REPORT MAC does not verify")
            return parse_report_body(body)
        except ValueError as exc:
            log.log("platform.report_rejected", reason=str(exc))
            raise AttestationError("report verification failed") from None

    def quote(self, report_data: bytes) -> bytes:
        """EREPORT to the quoting enclave, which checks it and signs a DCAP v3 quote."""
        return self._qe.quote(self.report(self._qe.target_info, report_data))

    def counter_create(self, name: str) -> int:
        return self._counters.create(self._identity.mrsigner, name)

    def counter_increment(self, name: str) -> int:
        return self._counters.increment(self._identity.mrsigner, name)

    def counter_read(self, name: str) -> int:
        return self._counters.read(self._identity.mrsigner, name)
