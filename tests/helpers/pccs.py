"""A local stand-in PCCS: serves QuoteCollateralV3 JSON the way Intel's PCCS v4 API does.

Facts (Intel PCCS / PCS API v4, and what dcap-qvl 0.7's fetcher requests, seen on
the wire): ``GET /sgx/certification/v4/pckcrl?ca=processor|platform&encoding=der``
(DER body, ``SGX-PCK-CRL-Issuer-Chain`` header), ``/tcb?fmspc=`` (``{"tcbInfo":
...,"signature": hex}``, ``TCB-Info-Issuer-Chain``), ``/qe/identity``
(``{"enclaveIdentity": ...,"signature": hex}``, ``SGX-Enclave-Identity-Issuer-Chain``),
``/rootcacrl`` (hex of the DER). Issuer chains are URL-encoded PEM. Every request
is recorded in ``requests``.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PREFIX = "/sgx/certification/v4"


class FakePccs:
    def __init__(self, collateral_json: str) -> None:
        self.collateral: dict[str, Any] = json.loads(collateral_json)
        self.requests: list[str] = []
        pccs = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                pccs.requests.append(self.path)
                answer = pccs.answer(self.path)
                if answer is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                body, headers = answer
                self.send_response(200)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def answer(self, path: str) -> tuple[bytes, dict[str, str]] | None:
        c = self.collateral
        url = urllib.parse.urlsplit(path)
        if not url.path.startswith(PREFIX):
            return None
        what = url.path[len(PREFIX):]

        def chain(pem: str) -> str:
            return urllib.parse.quote(pem, safe="")

        if what == "/pckcrl":
            return bytes.fromhex(c["pck_crl"]), {
                "SGX-PCK-CRL-Issuer-Chain": chain(c["pck_crl_issuer_chain"])}
        if what == "/tcb":
            body = f'{{"tcbInfo":{c["tcb_info"]},"signature":"{c["tcb_info_signature"]}"}}'
            return body.encode(), {"TCB-Info-Issuer-Chain": chain(c["tcb_info_issuer_chain"]),
                                   "Content-Type": "application/json"}
        if what == "/qe/identity":
            body = (f'{{"enclaveIdentity":{c["qe_identity"]},'
                    f'"signature":"{c["qe_identity_signature"]}"}}')
            return body.encode(), {
                "SGX-Enclave-Identity-Issuer-Chain": chain(c["qe_identity_issuer_chain"]),
                "Content-Type": "application/json"}
        if what == "/rootcacrl":
            return c["root_ca_crl"].encode(), {}
        return None

    @contextmanager
    def running(self) -> Iterator[FakePccs]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join()
