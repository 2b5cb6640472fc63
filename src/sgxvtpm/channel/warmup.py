"""One throwaway attested session, run in the sim zygote before it forks.

OpenSSL and cryptography build tables the first time they are used (algorithm
fetch caches, TLS 1.3 cipher and group state, the x509 parser's). Built in
each enclave process, those are ~1.5 MB of private memory per instance;
built once in the zygote, every enclave shares them (copy-on-write, never
written again). The session uses a made-up identity, a fresh key pair and
its own quote; nothing of it is kept (the context cache is emptied).
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.channel import context
from sgxvtpm.channel.evidence import EnclaveCredential
from sgxvtpm.channel.identity import ClientCredential, ClientTrust
from sgxvtpm.channel.session import ClientSession, Message, ServerSession
from sgxvtpm.platform.base import (
    EnclaveIdentity,
    EnclavePlatform,
    MeasurementPolicy,
    QuoteVerifier,
)

_IDENTITY = EnclaveIdentity(
    mrenclave=b"\x00" * 31 + b"\x01", mrsigner=b"\x00" * 32, isv_prod_id=0, isv_svn=0
)


def exercise(
    platform_for: Callable[[EnclaveIdentity], EnclavePlatform], verifier: QuoteVerifier
) -> None:
    """Handshake, one message each way, close; raises if any step fails."""
    server_credential = EnclaveCredential.create(platform_for(_IDENTITY), "warm-up")
    client_credential = ClientCredential.self_signed(
        ec.generate_private_key(ec.SECP256R1()), "warm-up"
    )
    client = ClientSession(
        MeasurementPolicy(mrenclaves=frozenset({_IDENTITY.mrenclave})),
        verifier,
        client_credential,
        "warm-up",
    )
    server = ServerSession(
        server_credential,
        ClientTrust([client_credential.cert_pem], frozenset({client_credential.spki_sha256})),
    )
    client.send_message(b"ping")
    delivered = []
    for _ in range(8):  # a TLS 1.3 handshake and one message need 3 flights
        server.receive_data(client.data_to_send())
        while (event := server.next_event()) is not None:
            if isinstance(event, Message):
                server.send_message(event.data)
        client.receive_data(server.data_to_send())
        while (event := client.next_event()) is not None:
            if isinstance(event, Message):
                delivered.append(event.data)
        if delivered:
            break
    if delivered != [b"ping"]:
        raise RuntimeError("channel warm-up: the throwaway session did not complete")
    client.close()
    server.close()
    context.clear_cache()
