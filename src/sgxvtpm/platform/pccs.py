"""DCAP collateral from a PCCS, cached on disk until its nextUpdate.

``fetch_collateral(url, quote)`` asks the PCCS at ``url`` (Intel's PCCS v4 API,
through dcap-qvl's own fetcher, ``dcap_qvl.get_collateral``: ``pckcrl?ca=``,
``tcb?fmspc=``, ``qe/identity``, ``rootcacrl`` under ``/sgx/certification/v4``)
for the collateral of the quote's FMSPC and PCK CA, and answers it as
dcap-qvl QuoteCollateralV3 JSON, the same bytes ``--collateral FILE`` gives.
Clients use it (vmm/credentials.py, ``sgxvtpm attest quote --pccs``), and so
does hostd for its own platform (``hostd --pccs``, host/collateral.py:
``fetch_fresh``, no cache).

The PCCS and the cache are untrusted: the collateral is only ever used by the
pinned-root verifier (platform/dcap.py), which checks every part of it against
the pinned root at each verification. The cache only saves round trips: one
file per (PCCS URL, FMSPC, CA), mode 0600 in ``$XDG_CACHE_HOME/sgxvtpm``
(``~/.cache/sgxvtpm``), served only while the verification time is before the
earliest nextUpdate of its TCB Info, QE Identity and both CRLs; an expired
entry is fetched again, never served.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import hashlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.platform import PCCS_URL_ENV, dcap
from sgxvtpm.platform.base import AttestationError, PlatformError, QuoteVerifier, VerifiedQuote
from sgxvtpm.util.durable import atomic_write

ENV = PCCS_URL_ENV
FETCH_TIMEOUT = 30.0


class PccsError(SgxvtpmError):
    """The PCCS could not be asked, or its answer is not collateral (one line)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sgxvtpm"


def quote_key(quote: bytes) -> tuple[str, str]:
    """The quote's FMSPC (hex) and PCK CA (``processor`` or ``platform``)."""
    try:
        parsed = dcap_qvl.parse_quote(bytes(quote))
        return str(parsed.fmspc()).upper(), str(parsed.ca())
    except (ValueError, TypeError, RuntimeError) as exc:
        raise PccsError(f"the quote names no FMSPC/PCK CA to fetch collateral for: {exc}") \
            from None


def expiry(collateral_json: str) -> datetime.datetime:
    """The earliest nextUpdate of the collateral's TCB Info, QE Identity and CRLs."""
    try:
        data = json.loads(collateral_json)
        times = [
            _iso(json.loads(data["tcb_info"])["nextUpdate"]),
            _iso(json.loads(data["qe_identity"])["nextUpdate"]),
        ]
        for crl in ("pck_crl", "root_ca_crl"):
            update = x509.load_der_x509_crl(bytes.fromhex(data[crl])).next_update_utc
            if update is None:
                raise ValueError(f"{crl} has no nextUpdate")
            times.append(update)
    except (ValueError, KeyError, TypeError) as exc:
        raise PccsError(f"not QuoteCollateralV3 JSON with nextUpdate times: {exc}") from None
    return min(times)


CAS = ("processor", "platform")


def collateral_key(collateral_json: str) -> tuple[str, str]:
    """The FMSPC (hex, upper case) and PCK CA (``processor`` or ``platform``) a copy of
    collateral is for, read from the collateral itself (an expired copy will do): the
    FMSPC from its TCB Info, the CA from its PCK CRL's issuer (Intel's "Intel SGX PCK
    Platform CA" or "... Processor CA"; another issuer, such as the sim root, counts as
    ``processor``, as dcap-qvl names a quote whose PCK issuer is neither). What hostd
    fetches with on a platform that gives it no quote (gramine, host/collateral.py)."""
    try:
        data = json.loads(collateral_json)
        fmspc = str(json.loads(data["tcb_info"])["fmspc"]).upper()
        issuer = x509.load_der_x509_crl(bytes.fromhex(data["pck_crl"])).issuer
    except (ValueError, KeyError, TypeError) as exc:
        raise PccsError(f"the collateral names no FMSPC/PCK CA: {exc}") from None
    if len(fmspc) != 12 or any(c not in "0123456789ABCDEF" for c in fmspc):
        raise PccsError(f"the collateral's FMSPC {fmspc!r} is not 6 bytes of hex")
    names = issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    common = str(names[0].value) if names else ""
    return fmspc, "platform" if "Platform" in common else "processor"


def _iso(text: str) -> datetime.datetime:
    t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def _entry(directory: Path, url: str, fmspc: str, ca: str) -> Path:
    key = hashlib.sha256(f"{url}\n{fmspc}\n{ca}".encode()).hexdigest()[:32]
    return directory / f"collateral-{key}.json"


def fetch_collateral(
    url: str,
    quote: bytes,
    *,
    now: datetime.datetime | None = None,
    cache: Path | None = None,
    timeout: float = FETCH_TIMEOUT,
) -> str:
    """QuoteCollateralV3 JSON for ``quote`` from the PCCS at ``url`` (or its cache entry,
    if still valid at ``now``, the verification time, default: the clock). PccsError if
    the PCCS cannot be reached or answers something else than collateral."""
    url = url.rstrip("/")
    when = now or datetime.datetime.now(datetime.UTC)
    fmspc, ca = quote_key(quote)
    directory = cache or cache_dir()
    entry = _entry(directory, url, fmspc, ca)
    try:
        cached = entry.read_text()
        if when < expiry(cached):
            return cached
        entry.unlink(missing_ok=True)  # expired: never served
    except (OSError, UnicodeDecodeError, PccsError):
        pass
    collateral = fetch_fresh(url, quote, timeout=timeout)
    if when < expiry(collateral):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(entry, collateral.encode(), 0o600)
    return collateral


def fetch_fresh(url: str, quote: bytes, *, timeout: float = FETCH_TIMEOUT) -> str:
    """QuoteCollateralV3 JSON for ``quote`` from the PCCS at ``url``, never from a cache
    (hostd's refresher, host/collateral.py). PccsError (one line) if the PCCS cannot be
    reached or answers something else than collateral with nextUpdate times."""
    url = url.rstrip("/")
    try:
        collateral = _fetch(url, bytes(quote), timeout)
    except TimeoutError:
        raise PccsError(f"PCCS {url}: no answer within {timeout:g} s") from None
    except (ValueError, RuntimeError, OSError) as exc:
        raise PccsError(f"PCCS {url}: cannot fetch collateral: {_one_line(exc)}") from None
    expiry(collateral)  # PccsError unless every part has its nextUpdate
    return collateral


def fetch_by_key(url: str, fmspc: str, ca: str, *, timeout: float = FETCH_TIMEOUT) -> str:
    """QuoteCollateralV3 JSON for ``fmspc`` and ``ca`` from the PCCS at ``url``, without a
    quote and without a cache: the four PCCS v4 requests dcap-qvl's fetcher makes
    (``pckcrl?ca=CA&encoding=der``, ``tcb?fmspc=FMSPC``, ``qe/identity``, ``rootcacrl``;
    issuer chains in URL-encoded PEM headers). The signed TCB Info and QE Identity are
    kept byte for byte as served (their signatures are over those bytes). PccsError (one
    line) if the PCCS cannot be reached or answers something else."""
    url = url.rstrip("/")
    fmspc = fmspc.upper()
    if ca not in CAS:
        raise PccsError(f"PCK CA {ca!r} is not one of {', '.join(CAS)}")
    if len(fmspc) != 12 or any(c not in "0123456789ABCDEF" for c in fmspc):
        raise PccsError(f"FMSPC {fmspc!r} is not 6 bytes of hex")
    base = f"{url}/sgx/certification/v4"
    try:
        crl, crl_headers = _get(f"{base}/pckcrl?ca={ca}&encoding=der", timeout)
        tcb, tcb_headers = _get(f"{base}/tcb?fmspc={fmspc}", timeout)
        qe, qe_headers = _get(f"{base}/qe/identity", timeout)
        root_crl, _ = _get(f"{base}/rootcacrl", timeout)
    except TimeoutError:
        raise PccsError(f"PCCS {url}: no answer within {timeout:g} s") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PccsError(f"PCCS {url}: cannot fetch collateral: {_one_line(exc)}") from None
    try:
        tcb_info, tcb_signature = _signed_member(tcb, "tcbInfo")
        qe_identity, qe_signature = _signed_member(qe, "enclaveIdentity")
        collateral = json.dumps({
            "pck_crl_issuer_chain": _chain(crl_headers, "SGX-PCK-CRL-Issuer-Chain"),
            "root_ca_crl": _der_hex(root_crl),
            "pck_crl": _der_hex(crl),
            "tcb_info_issuer_chain": _chain(tcb_headers, "TCB-Info-Issuer-Chain",
                                            "SGX-TCB-Info-Issuer-Chain"),
            "tcb_info": tcb_info,
            "tcb_info_signature": tcb_signature,
            "qe_identity_issuer_chain": _chain(qe_headers, "SGX-Enclave-Identity-Issuer-Chain"),
            "qe_identity": qe_identity,
            "qe_identity_signature": qe_signature,
        })  # fmt: skip
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise PccsError(f"PCCS {url}: its answer is not collateral: {_one_line(exc)}") from None
    expiry(collateral)  # PccsError unless every part has its nextUpdate
    return collateral


def _get(where: str, timeout: float) -> tuple[bytes, Mapping[str, str]]:
    with urllib.request.urlopen(where, timeout=timeout) as answer:
        return answer.read(), answer.headers


def _chain(headers: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = headers.get(name)
        if value:
            return urllib.parse.unquote(value)
    raise ValueError(f"no {names[0]} header")


def _der_hex(body: bytes) -> str:
    """A CRL as the PCCS serves it (DER, or the hex of the DER), as hex of the DER."""
    text = body.strip()
    try:
        der = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        der = body
    x509.load_der_x509_crl(der)  # ValueError if it is not a CRL
    return der.hex()


def _signed_member(body: bytes, key: str) -> tuple[str, str]:
    """``{"KEY": {...}, "signature": "hex"}``: the KEY member's text exactly as served,
    and the signature."""
    text = body.decode()
    decoder = json.JSONDecoder()
    members: dict[str, tuple[int, int]] = {}
    values: dict[str, Any] = {}
    i = _skip(text, 0)
    if text[i : i + 1] != "{":
        raise ValueError("not a JSON object")
    i = _skip(text, i + 1)
    while text[i : i + 1] != "}":
        name, i = decoder.raw_decode(text, i)
        i = _skip(text, i)
        if text[i : i + 1] != ":":
            raise ValueError("not a JSON object")
        start = _skip(text, i + 1)
        values[str(name)], end = decoder.raw_decode(text, start)
        members[str(name)] = (start, end)
        i = _skip(text, end)
        if text[i : i + 1] == ",":
            i = _skip(text, i + 1)
        elif text[i : i + 1] != "}":
            raise ValueError("not a JSON object")
    if _skip(text, i + 1) != len(text):
        raise ValueError("text after the JSON object")
    start, end = members[key]
    signature = values["signature"]
    if not isinstance(values[key], dict) or not isinstance(signature, str):
        raise ValueError(f"no {key} object and signature")
    bytes.fromhex(signature)
    return text[start:end], signature


def _skip(text: str, i: int) -> int:
    while text[i : i + 1] in (" ", "\t", "\n", "\r"):
        i += 1
    return i


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _fetch(url: str, quote: bytes, timeout: float) -> str:
    """dcap-qvl's fetch (it must be called inside a running event loop), to completion;
    also when the caller is itself inside an event loop (then on a thread of its own)."""

    async def bounded() -> str:
        collateral = await asyncio.wait_for(dcap_qvl.get_collateral(url, quote), timeout)
        return str(collateral.to_json())

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(bounded())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, bounded()).result()


INTEL_ROOT_FILE = "intel-sgx-root-ca.pem"


def intel_root_pem(url: str, *, cache: Path | None = None, timeout: float = FETCH_TIMEOUT) -> bytes:
    """Intel's SGX Root CA (PEM), from the cache or the PCCS, accepted only if its SHA-256 is
    the pinned one (platform/dcap.py). Needs no quote: the last certificate of the issuer
    chain of ``/sgx/certification/v4/qe/identity`` (``SGX-Enclave-Identity-Issuer-Chain``)."""
    directory = cache or cache_dir()
    entry = directory / INTEL_ROOT_FILE
    try:
        return _pinned_intel(entry.read_bytes())
    except (OSError, ValueError, PccsError):
        pass
    where = url.rstrip("/") + "/sgx/certification/v4/qe/identity"
    try:
        with urllib.request.urlopen(where, timeout=timeout) as answer:
            chain = answer.headers.get("SGX-Enclave-Identity-Issuer-Chain", "")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PccsError(f"PCCS {url}: cannot fetch the root certificate: {_one_line(exc)}") \
            from None
    try:
        certs = x509.load_pem_x509_certificates(urllib.parse.unquote(chain).encode())
        pem = _pinned_intel(certs[-1].public_bytes(serialization.Encoding.PEM))
    except (ValueError, IndexError):
        raise PccsError(f"PCCS {url}: no issuer chain in its QE Identity answer") from None
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(entry, pem, 0o600)
    return pem


def _pinned_intel(pem: bytes) -> bytes:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    if hashlib.sha256(der).hexdigest() != dcap.INTEL_SGX_ROOT_CA_SHA256:
        raise PccsError("the PCCS's root is not Intel's SGX Root CA (pinned SHA-256)")
    return pem


class PccsVerifier:
    """A QuoteVerifier that fetches each quote's collateral from a PCCS (cached) and checks
    the quote with the verifier ``build(collateral)`` makes: the same pinned-root DCAP
    verifier a collateral file gets."""

    def __init__(self, url: str, build: Callable[[str], QuoteVerifier]) -> None:
        self._url = url
        self._build = build
        self._verifiers: dict[str, QuoteVerifier] = {}

    def verify(self, quote: bytes) -> VerifiedQuote:
        try:
            collateral = fetch_collateral(self._url, quote)
        except PccsError as exc:
            raise AttestationError(str(exc)) from None
        verifier = self._verifiers.get(collateral)
        if verifier is None:
            try:
                verifier = self._build(collateral)
            except PlatformError as exc:  # the collateral does not parse, another root
                raise AttestationError(f"PCCS {self._url}: {exc}") from None
            self._verifiers[collateral] = verifier
        return verifier.verify(quote)
