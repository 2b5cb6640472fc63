"""TLS 1.3 contexts for the attested sessions (Python ``ssl``, OpenSSL 3).

Keys are handed to OpenSSL through an anonymous in-memory file
(``memfd_create``): ``SSLContext.load_cert_chain`` only reads paths, and an
enclave must never write its private key to disk (SECURITY.md property 12).
Contexts are cached per (certificate, anchors) because building one costs a
key parse and, on the server, a trust store. The certificate identifies the
key: OpenSSL refuses a key that does not match it.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections import OrderedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .identity import ClientTrust

_CACHE_SIZE = 64
_cache: OrderedDict[tuple[object, ...], ssl.SSLContext] = OrderedDict()
_cache_lock = threading.Lock()
_SHA256 = hashes.SHA256()


def _load_identity(
    ctx: ssl.SSLContext, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> None:
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.memfd_create("sgxvtpm-tls-identity", os.MFD_CLOEXEC)
    try:
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view) :]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _tls13_only(ctx: ssl.SSLContext) -> None:
    # TLS 1.3 only (RFC 8446); no compression, no tickets,
    # so every session is a full, attested handshake.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION


def _cached(key: tuple[object, ...]) -> ssl.SSLContext | None:
    with _cache_lock:
        ctx = _cache.get(key)
        if ctx is not None:
            _cache.move_to_end(key)
        return ctx


def clear_cache() -> None:
    """Forget every cached context (the zygote, before it forks)."""
    with _cache_lock:
        _cache.clear()


def _store(key: tuple[object, ...], ctx: ssl.SSLContext) -> None:
    with _cache_lock:
        _cache[key] = ctx
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


def server_context(
    key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, trust: ClientTrust
) -> ssl.SSLContext:
    """Server side: present the RA-TLS certificate, require a client certificate
    chaining to ``trust``'s anchors (pins are checked after the handshake)."""
    cache_key = ("server", cert.fingerprint(_SHA256), trust.cadata, trust.in_band)
    ctx = _cached(cache_key)
    if ctx is not None:
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _tls13_only(ctx)
    ctx.num_tickets = 0
    if trust.in_band:
        ctx.verify_mode = ssl.CERT_NONE  # the client proves itself inside the session
    else:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=trust.cadata)
    _load_identity(ctx, key, cert)
    _store(cache_key, ctx)
    return ctx


def client_context(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> ssl.SSLContext:
    """Client side: present the client certificate; the server's certificate is
    not checked by OpenSSL (no CA vouches for an enclave) but by its quote,
    see ``verify_enclave_certificate``. OpenSSL still checks that the server
    holds the certificate's key (CertificateVerify, RFC 8446 section 4.4.3)."""
    cache_key = ("client", cert.fingerprint(_SHA256))
    ctx = _cached(cache_key)
    if ctx is not None:
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _tls13_only(ctx)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _load_identity(ctx, key, cert)
    _store(cache_key, ctx)
    return ctx

