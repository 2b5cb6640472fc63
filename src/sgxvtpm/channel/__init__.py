"""sgxvtpm.channel: the attested channels K1 and K2 (RA-TLS over TLS 1.3).

No I/O here: certificates that carry a quote (:mod:`.evidence`), client
identities and pins (:mod:`.identity`), and sans-IO sessions
(:mod:`.session`). Transports live in :mod:`sgxvtpm.mux`.
"""

from __future__ import annotations

from .errors import ChannelError, ChannelUsageError
from .evidence import (
    QUOTE_EXTENSION_OID,
    EnclaveCredential,
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
    "MAX_MESSAGE",
    "QUOTE_EXTENSION_OID",
    "ChannelError",
    "ChannelUsageError",
    "ClientCredential",
    "ClientSession",
    "ClientTrust",
    "Closed",
    "EnclaveCredential",
    "Event",
    "HandshakeComplete",
    "Message",
    "PeerCertificate",
    "ServerSession",
    "State",
    "report_data_for",
    "spki_sha256",
    "verify_enclave_certificate",
]
