"""The gramine kind of platform: Gramine on SGX hardware (docs/REAL-SGX.md).

:data:`GRAMINE` is its base.PlatformKind. Its enclaves run the bootstrap
(:mod:`.bootstrap`) first; their MRENCLAVE is what ``gramine-sgx-sign``
computes over the manifest, the trusted files' hashes and Gramine's own
binaries, so ``measure`` cannot compute it here: a verifier pins the value
the signed build prints (``gramine-sgx-sigstruct-view``). Quotes are DCAP,
checked by platform/dcap.py under Intel's root with collateral.
``open_platform("gramine")`` refuses on a machine without SGX.
"""

from __future__ import annotations

from sgxvtpm.platform.base import EnclaveSpec, PlatformError, QuoteVerifier
from sgxvtpm.platform.gramine.manifest import BOOTSTRAP


class GramineKind:
    name = "gramine"
    enclave_bootstrap: tuple[str, ...] = (BOOTSTRAP,)
    connection_handoff = False  # the host stream is stdio: no descriptors cross it

    def measure(self, spec: EnclaveSpec) -> bytes:
        raise PlatformError(
            f"the MRENCLAVE of the Gramine {spec.name} enclave comes from gramine-sgx-sign on "
            "the build host (docs/REAL-SGX.md); pin that value"
        )

    def quote_verifier(self, root_pem: bytes, collateral: str | None = None) -> QuoteVerifier:
        """DCAP under ``root_pem``, which must be Intel's SGX Root CA (pinned by hash)."""
        from sgxvtpm.platform import dcap

        if collateral is None:
            raise PlatformError(
                "Gramine quotes are DCAP quotes: verify them with collateral "
                "(sgxvtpm attest quote FILE --collateral FILE --root intel)"
            )
        verifier = dcap.pinned_verifier(root_pem, collateral)
        dcap.intel_root(dcap.load_collateral(collateral))  # the pinned root is Intel's
        return verifier


GRAMINE = GramineKind()
