"""The ENCLU leaves from inside a simulated enclave: requests to the sim CPU.

On SGX an enclave never holds the CPU's fuse key or the quoting enclave's
attestation key: EGETKEY and EREPORT answer only for the calling enclave's
own identity, and the quoting enclave signs only REPORTs MAC'd for it. The
simulation keeps that boundary with processes: the platform's secrets stay in
the CPU process (:mod:`.cpu`), which launched this enclave and bound its
measured identity to this socket; the enclave asks, the CPU answers for that
identity only. Nothing the enclave sends can name another identity.

Messages use :mod:`.zygote_proto` framing: a JSON header and a blob.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from sgxvtpm.platform.base import (
    AttestationError,
    KeyRequest,
    PlatformError,
    ReportBody,
    TargetInfo,
    check_report_data,
)
from sgxvtpm.platform.sim.enclave import SimEnclaveFace
from sgxvtpm.platform.sim.report import parse_report_body
from sgxvtpm.platform.sim.zygote_proto import ZygoteGone, recv_message, send_message


class SimEnclaveClient(SimEnclaveFace):
    """base.EnclavePlatform for the enclave that owns ``sock``'s other end in the CPU."""

    def __init__(self, sock: socket.socket, *, config: bytes = b"") -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self.config = config
        hello, body = self._call({"op": "hello"})
        self._identity = parse_report_body(bytes(body)).identity
        self._root_pem = bytes.fromhex(hello["root_pem"])
        self.collateral = str(hello.get("collateral", ""))

    @property
    def attestation_root_pem(self) -> bytes:
        """The root a verifier inside this enclave trusts (from the CPU, not the host)."""
        return self._root_pem

    def current_collateral(self) -> str:
        """The CPU's collateral now (``hostd --pccs`` refreshes it while we run)."""
        return str(self._call({"op": "collateral"})[0].get("collateral", ""))

    def get_key(self, request: KeyRequest) -> bytes:
        _, key = self._call(
            {
                "op": "get_key",
                "key_name": int(request.key_name),
                "key_policy": int(request.key_policy),
                "isv_svn": request.isv_svn,
                "cpu_svn": request.cpu_svn.hex(),
                "key_id": request.key_id.hex(),
                "config_svn": request.config_svn,
            }
        )
        return bytes(key)

    def report(self, target: TargetInfo, report_data: bytes) -> bytes:
        check_report_data(report_data)
        _, report = self._call(
            {
                "op": "report",
                "mrenclave": target.mrenclave.hex(),
                "attributes": target.attributes.hex(),
                "misc_select": target.misc_select,
            },
            report_data,
        )
        return bytes(report)

    def verify_report(self, report: bytes) -> ReportBody:
        _, body = self._call({"op": "verify_report"}, bytes(report))
        return parse_report_body(bytes(body))

    def quote(self, report_data: bytes) -> bytes:
        check_report_data(report_data)
        _, quote = self._call({"op": "quote"}, report_data)
        return bytes(quote)

    def counter_create(self, name: str) -> int:
        return int(self._call({"op": "counter_create", "name": name})[0]["value"])

    def counter_increment(self, name: str) -> int:
        return int(self._call({"op": "counter_increment", "name": name})[0]["value"])

    def counter_read(self, name: str) -> int:
        return int(self._call({"op": "counter_read", "name": name})[0]["value"])

    def _call(self, header: dict[str, Any], blob: bytes = b"") -> tuple[dict[str, Any], bytearray]:
        with self._lock:
            try:
                send_message(self._sock, header, blob)
                reply, data, fds = recv_message(self._sock)
            except (ZygoteGone, OSError) as exc:
                raise PlatformError(f"the platform is gone: {exc}") from None
        for fd in fds:  # the CPU never sends descriptors; do not leak any
            socket.close(fd)
        if not reply.get("ok"):
            error = str(reply.get("error", "refused"))
            if reply.get("kind") == "attestation":
                raise AttestationError(error)
            raise PlatformError(error)
        return reply, data
