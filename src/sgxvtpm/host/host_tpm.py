"""hostd's side of the host-TPM counters: the host's TPM, reached by device or TCTI.

``hostd --counters tpm:SPEC`` relays the enclaves' TPM commands (TPM frames,
wire/relay.py) to the host's TPM and its responses back, unread: the
enclaves' HMAC sessions make them trustworthy (platform/tpm_counters.py),
not hostd. SPEC is one of

- a character device, ``/dev/tpmrm0`` (the kernel's resource manager; one
  descriptor kept open, so the enclaves' sessions live as long as hostd);
- ``device:PATH``, the same spelled as tpm2-tss's TCTI;
- ``swtpm:path=SOCKET`` or ``swtpm:host=HOST,port=PORT``, swtpm's data
  channel as tpm2-tss's tcti-swtpm reaches it (one connection per command).
"""

from __future__ import annotations

import os
import socket
import struct
import threading

from sgxvtpm.errors import SgxvtpmError

_HEADER = struct.Struct(">HII")
_MAX_RESPONSE = 64 * 1024


class HostTpmError(SgxvtpmError):
    """The host TPM named by --counters cannot be used; the message says why."""


class HostTpm:
    """One host TPM: :meth:`transact` sends a command, returns its response."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._unix: str | None = None
        self._tcp: tuple[str, int] | None = None
        kind, _, conf = spec.partition(":")
        if spec.startswith("/"):
            kind, conf = "device", spec
        if kind == "device":
            try:
                self._fd = os.open(conf or "/dev/tpmrm0", os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise HostTpmError(f"cannot open the host TPM {conf}: {exc.strerror}") from None
        elif kind == "swtpm":
            options = dict(item.partition("=")[::2] for item in conf.split(",") if item)
            if "path" in options:
                self._unix = options["path"]
            else:
                try:
                    self._tcp = (options.get("host", "localhost"), int(options.get("port", 2321)))
                except ValueError:
                    raise HostTpmError(f"bad swtpm port in {spec!r}") from None
        else:
            raise HostTpmError(
                f"unknown host TPM {spec!r}: give /dev/tpmrm0, device:PATH, "
                "swtpm:path=SOCKET or swtpm:host=HOST,port=PORT"
            )

    def transact(self, command: bytes) -> bytes:
        with self._lock:
            if self._fd is not None:
                os.write(self._fd, command)
                return os.read(self._fd, _MAX_RESPONSE)
            return self._socket_transact(command)

    def _socket_transact(self, command: bytes) -> bytes:
        if self._unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = self._unix
        else:
            assert self._tcp is not None
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = self._tcp
        with sock:
            sock.settimeout(60)
            sock.connect(address)
            sock.sendall(command)
            response = bytearray()
            size = _HEADER.size
            while len(response) < size:
                chunk = sock.recv(size - len(response))
                if not chunk:
                    raise HostTpmError("the host TPM closed the connection mid-response")
                response += chunk
                if len(response) >= _HEADER.size:
                    size = min(_HEADER.unpack_from(response)[1], _MAX_RESPONSE)
                    size = max(size, _HEADER.size)
            return bytes(response)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
