"""A local vTPM endpoint: libtpms in this process, state in plain files.

    python -m sgxvtpm.endpoint.local --state-dir DIR (--ctrl PATH | --swtpm PATH |
                                      --swtpm-tcp HOST:PORT | --mssim HOST:PORT)

NOT PROTECTED: no enclave, no attestation, no sealing; the TPM state lies in
the clear in DIR. It exists for tests (the same endpoints as ``sgxvtpm vm
attach``/``vm serve``, over a :class:`~sgxvtpm.endpoint.backend.LocalBackend`)
and as a comparison point for benchmarks. Once listening it prints one line
``READY <port or path>`` on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from sgxvtpm.enclaves.vtpm_core import VtpmCore
from sgxvtpm.endpoint.backend import LocalBackend
from sgxvtpm.endpoint.lifecycle import run_until_signal
from sgxvtpm.endpoint.listeners import loopback_host
from sgxvtpm.endpoint.qemu import QemuEndpoint
from sgxvtpm.endpoint.tss import MssimEndpoint, SwtpmTssEndpoint
from sgxvtpm.tpm.engine import LibtpmsEngine
from sgxvtpm.util.durable import atomic_write

_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


class DirStateStore:
    """libtpms blobs as files in a directory (plaintext; NOT protected).

    Writes go through util.durable.atomic_write, so a crash leaves the old or
    the new blob, never a torn one.
    """

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, name: str) -> Path:
        if not name or not set(name) <= _NAME_OK or name.startswith("."):
            raise ValueError(f"bad blob name {name!r}")
        return self.dir / f"tpm2-{name}"

    def load(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None

    def store(self, name: str, data: bytes) -> None:
        atomic_write(self._path(name), data)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()


def local_backend(state_dir: Path | str) -> LocalBackend:
    store = DirStateStore(state_dir)
    return LocalBackend(VtpmCore(lambda: LibtpmsEngine(store)))


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    try:
        return loopback_host(host), int(port)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sgxvtpm.endpoint.local",
        description="local vTPM endpoint over an in-process libtpms (NOT protected; tests)",
    )
    parser.add_argument("--state-dir", type=Path, required=True)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--ctrl", type=Path, help="swtpm control socket for QEMU")
    group.add_argument("--swtpm", type=Path, help="tcti-swtpm unix PATH and PATH.ctrl")
    group.add_argument("--swtpm-tcp", type=_host_port, metavar="HOST:PORT")
    group.add_argument("--mssim", type=_host_port, metavar="HOST:PORT")
    parser.add_argument("--frame-timeout", type=float, default=5.0)
    return parser


def run(args: argparse.Namespace) -> None:
    backend = local_backend(args.state_dir)
    endpoint: QemuEndpoint | SwtpmTssEndpoint | MssimEndpoint
    if args.ctrl is not None:
        endpoint = QemuEndpoint(backend, args.ctrl, frame_timeout=args.frame_timeout)
        where = str(args.ctrl)
    elif args.swtpm is not None:
        endpoint = SwtpmTssEndpoint(backend, path=args.swtpm, frame_timeout=args.frame_timeout)
        where = str(args.swtpm)
    elif args.swtpm_tcp is not None:
        host, port = args.swtpm_tcp
        endpoint = SwtpmTssEndpoint(backend, host=host, port=port,
                                    frame_timeout=args.frame_timeout)
    else:
        host, port = args.mssim
        endpoint = MssimEndpoint(backend, host=host, port=port, frame_timeout=args.frame_timeout)
    try:
        endpoint.start()
        if not isinstance(endpoint, QemuEndpoint) and endpoint.port is not None:
            where = str(endpoint.port)
        print(f"READY {where}", flush=True)
        run_until_signal(endpoint)
    finally:
        endpoint.close()
        endpoint.tpm.close()  # orderly TPM2_Shutdown + stop, state stays in DIR


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print("sgxvtpm.endpoint.local: NOT protected (no enclave, plaintext state)", file=sys.stderr)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
