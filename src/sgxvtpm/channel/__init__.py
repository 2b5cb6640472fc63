"""sgxvtpm.channel: the attested channels K1 and K2 (RA-TLS over TLS 1.3).

No I/O here: certificates that carry a quote (:mod:`.evidence`), client
identities and pins (:mod:`.identity`), and sans-IO sessions
(:mod:`.session`). Transports live in :mod:`sgxvtpm.mux`.
"""

from __future__ import annotations

from .errors import ChannelError, ChannelUsageError
from .evidence import (
    EVIDENCE_EXTENSION_OID,
    QUOTE_EXTENSION_OID,
    BoundQuote,
    EnclaveCredential,
    EvidenceError,
    bound_quote,
    report_data_for,
    spki_sha256,
    verify_enclave_certificate,
)
from .identity import ClientCredential, ClientTrust
from .session import (
    MAX_MESSAGE,
    ClientSession,
    Closed,
    Event,
    HandshakeComplete,
    Message,
    PeerCertificate,
    ServerSession,
    State,
)

__all__ = [
    "EVIDENCE_EXTENSION_OID",
    "MAX_MESSAGE",
    "QUOTE_EXTENSION_OID",
    "BoundQuote",
    "ChannelError",
    "ChannelUsageError",
    "ClientCredential",
    "ClientSession",
    "ClientTrust",
    "Closed",
    "EnclaveCredential",
    "Event",
    "EvidenceError",
    "HandshakeComplete",
    "Message",
    "PeerCertificate",
    "ServerSession",
    "State",
    "bound_quote",
    "report_data_for",
    "spki_sha256",
    "verify_enclave_certificate",
]
