"""The first sgxvtpm code in a Gramine enclave: the manifest's measured argv runs it.

``python3 -I -m sgxvtpm.platform.gramine.bootstrap MODULE:FUNCTION`` is the
manifest's ``loader.argv`` (measured: the role is fixed by MRENCLAVE, the
host cannot pick another entry). It

1. reads the launch arguments (untrusted, from the host) as the first frame
   on stdin: a 4-byte big-endian length, then that much JSON (an object);
2. opens the platform: /dev/attestation (:class:`.attestation.GramineEnclavePlatform`),
   the EGETKEY helper, a counter backend, and the quote verifier its peers
   are checked with;
3. bridges stdin/stdout, the enclave's host stream (Gramine's unix sockets do
   not reach the host), to a socketpair inside the enclave, and runs the
   entry ``main(platform, stream, args)`` on its end.

The bridge copies bytes in both directions with two threads; descriptors
cannot cross it, so a Gramine enclave never takes a handed-off client
connection (hostd keeps relaying, base.PlatformBackend.connection_handoff).

:func:`run` is the part gramine-sim shares: its stand-in opens the platform
over its own attestation tree and calls it with the same bridge and entry.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import struct
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sgxvtpm.platform.base import EnclaveEntry, EnclavePlatform, PlatformError, QuoteVerifier

ARGS_MAX = 1 << 20
#: The launch argument naming hostd's public copy of the collateral, and its name in
#: the state directory (host/statedir.py): public signed data, an allowed file of the
#: manifest, re-read by a running enclave when a quote fails with its launch copy.
COLLATERAL_FILE_ARG = "dcap_collateral_file"
PUBLIC_COLLATERAL = "collateral.json"
_CHUNK = 64 * 1024


def read_launch_args(fd: int) -> dict[str, Any]:
    """The host's launch arguments: one length-prefixed JSON object on ``fd``."""
    head = _read_exactly(fd, 4)
    (length,) = struct.unpack(">I", head)
    if length > ARGS_MAX:
        raise PlatformError(f"launch arguments of {length} bytes exceed {ARGS_MAX}")
    try:
        args = json.loads(_read_exactly(fd, length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlatformError(f"launch arguments are not JSON: {exc}") from None
    if not isinstance(args, dict):
        raise PlatformError("launch arguments are not a JSON object")
    return args


def encode_launch_args(args: Mapping[str, Any]) -> bytes:
    """The frame :func:`read_launch_args` reads (the launcher writes it first on stdin)."""
    body = json.dumps(dict(args), sort_keys=True).encode()
    if len(body) > ARGS_MAX:
        raise PlatformError(f"launch arguments of {len(body)} bytes exceed {ARGS_MAX}")
    return struct.pack(">I", len(body)) + body


def _read_exactly(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise PlatformError("the host stream ended before the launch arguments")
        buf += chunk
    return bytes(buf)


def load_entry(entry: str) -> EnclaveEntry:
    module_name, _, func_name = entry.partition(":")
    func: EnclaveEntry = getattr(importlib.import_module(module_name), func_name)
    return func


class StdioBridge:
    """stdin/stdout (the host stream) <-> one end of an in-enclave socketpair."""

    def __init__(self, in_fd: int = 0, out_fd: int = 1) -> None:
        self._in, self._out = in_fd, out_fd
        self.enclave_end, self._inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._threads = [
            threading.Thread(target=self._host_to_enclave, name="stdin-bridge", daemon=True),
            threading.Thread(target=self._enclave_to_host, name="stdout-bridge", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _host_to_enclave(self) -> None:
        try:
            while chunk := os.read(self._in, _CHUNK):
                self._inner.sendall(chunk)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            self._inner.shutdown(socket.SHUT_WR)  # the host closed: the entry sees EOF

    def _enclave_to_host(self) -> None:
        try:
            while chunk := self._inner.recv(_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self._out, view) :]
        except OSError:
            pass
        with contextlib.suppress(OSError):
            os.close(self._out)  # the entry closed its stream: the host sees EOF

    def close(self) -> None:
        self._inner.close()


def run(
    entry: str,
    platform: EnclavePlatform,
    args: Mapping[str, Any],
    *,
    in_fd: int = 0,
    out_fd: int = 1,
) -> None:
    """Run ``entry`` with ``platform`` on the host stream that stdin/stdout carry."""
    func = load_entry(entry)
    # stdout is the host stream: nothing may print there but the bridge.
    sys.stdout = sys.stderr
    bridge = StdioBridge(in_fd, out_fd)
    try:
        func(platform, bridge.enclave_end, args)
    finally:
        with contextlib.suppress(OSError):
            bridge.enclave_end.close()
        bridge.close()


def collateral_verifier(root_pem: bytes, collateral: str, args: Mapping[str, Any]) -> QuoteVerifier:
    """DCAP under ``root_pem`` (pinned by the caller) with ``collateral``; with a quote that
    fails, the copy in the file ``args`` names is tried (dcap.RefreshingVerifier: only a
    copy under the same root can take the launch copy's place). The file is untrusted:
    it can only make quotes fail, as the host can anyway."""
    from sgxvtpm.platform import dcap

    where = args.get(COLLATERAL_FILE_ARG)
    if not isinstance(where, str) or not where:
        return dcap.pinned_verifier(root_pem, collateral)
    path = Path(where)

    def latest() -> str:
        with open(path, encoding="utf-8") as f:  # an allowed (untrusted) file on Gramine
            return f.read(ARGS_MAX)

    return dcap.RefreshingVerifier(root_pem, collateral, latest)


def hardware_platform(args: Mapping[str, Any]) -> EnclavePlatform:
    """The platform of a real Gramine SGX enclave.

    Peers' quotes are checked with DCAP under Intel's SGX Root CA, pinned
    by hash in platform/dcap.py; the collateral (TCB Info, QE Identity,
    CRLs, all signed under that root) may come from the host: it is checked
    against the pinned root like the quote. A quote that fails with the launch
    copy is tried with the copy in the file the host names
    (:data:`COLLATERAL_FILE_ARG`, kept fresh by ``hostd --pccs``), kept if the
    quote verifies with it under the same pinned root (:func:`collateral_verifier`).
    The EGETKEY helper is the measured ``libsgxvtpm_egetkey.so`` next to this
    module if built.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from sgxvtpm.platform import dcap
    from sgxvtpm.platform.gramine.attestation import AttestationFiles, GramineEnclavePlatform
    from sgxvtpm.platform.gramine.egetkey import NativeEgetkey

    launch_copy = str(args.get("dcap_collateral", ""))
    root_der = dcap.intel_root(dcap.load_collateral(launch_copy))  # Intel's, pinned by hash
    root_pem = x509.load_der_x509_certificate(root_der).public_bytes(serialization.Encoding.PEM)
    verifier = collateral_verifier(root_pem, launch_copy, args)
    return GramineEnclavePlatform(
        AttestationFiles(), verifier=verifier, egetkey=NativeEgetkey.load_if_built()
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or ":" not in argv[0]:
        print("usage: python3 -m sgxvtpm.platform.gramine.bootstrap MODULE:FUNCTION",
              file=sys.stderr)
        return 2
    args = read_launch_args(0)
    run(argv[0], hardware_platform(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
