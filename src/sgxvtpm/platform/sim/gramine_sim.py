"""gramine-sim: the Gramine code path on the sim SGX platform (``hostd --platform gramine-sim``).

A simulation, named as one. What is Gramine's here is the enclave side:
each enclave runs :mod:`sgxvtpm.platform.gramine.bootstrap`'s :func:`run`
with a :class:`~sgxvtpm.platform.gramine.attestation.GramineEnclavePlatform`
over a /dev/attestation tree, its host stream on stdin/stdout, one process
per enclave (no zygote), launch arguments as the first stdin frame. What
stands in for Gramine and SGX:

- ``gramine-sgx`` is this module's :func:`main`, started by the sim CPU
  (:mod:`.cpu`, ``--gramine-sim``) after it measured the code and checked
  the SIGSTRUCT, as for a sim enclave: a fresh isolated interpreter with the
  stream as fds 0 and 1 and an ENCLU socket bound to the measured identity.
  It fetches its measured code over that socket and runs only it
  (:mod:`.codeimport`, the analogue of Gramine's trusted-file hashes);
- /dev/attestation is a private directory (0700, in the stand-in's own
  temporary directory) of named pipes laid out as Gramine documents it
  (:class:`AttestationTree`): ``user_report_data`` and ``target_info`` are
  written, ``my_target_info``, ``report``, ``quote``, ``attestation_type``
  and ``keys/_sgx_mrenclave|_sgx_mrsigner`` are read, each read answered
  by a thread of the stand-in from the ENCLU socket (EREPORT, the quoting
  enclave, EGETKEY with Gramine's sealing KEYREQUEST). The platform code
  opens, writes and reads these paths with ordinary syscalls, as it does
  /dev/attestation under Gramine; the tree root is the only difference;
- the EGETKEY helper (:class:`SimEgetkey`) takes the same 512-byte
  KEYREQUEST as ``egetkey.c`` and asks the sim CPU;
- counters: the sim CPU's (Gramine has none; on hardware a counter backend
  takes their place), reached over the same ENCLU socket;
- peers' quotes are checked with DCAP (platform/dcap.py) under the sim
  platform's root and collateral, which the stand-in takes from the CPU; as
  on Gramine, a quote that fails with that copy is tried with the copy in
  the file the launch arguments name (hostd's public ``collateral.json``,
  bootstrap.py, ``collateral_verifier``).

Named pipes, not a FUSE mount: nothing to install, no root needed, and the
files behave as Gramine's do for the one process that uses them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sgxvtpm.platform.base import (
    REPORT_BODY_SIZE,
    REPORT_DATA_SIZE,
    KeyName,
    KeyPolicy,
    KeyRequest,
    PlatformError,
)
from sgxvtpm.platform.gramine import bootstrap
from sgxvtpm.platform.gramine.structs import (
    TARGET_INFO_SIZE,
    pack_target_info,
    parse_key_request,
    parse_target_info,
)
from sgxvtpm.platform.sim.enclu import SimEnclaveClient
from sgxvtpm.platform.sim.measure import SimMeasuredKind
from sgxvtpm.platform.sim.report import parse_report_body
from sgxvtpm.platform.sim.spawn import (
    CLEAN_ENV,
    isolated_command,
    set_dumpable,
    set_process_name,
)

STAND_IN = "sgxvtpm.platform.sim.gramine_sim"


class GramineSimKind(SimMeasuredKind):
    """base.PlatformKind of gramine-sim: sim measurement and quotes, Gramine's enclave side."""

    name = "gramine-sim"
    enclave_bootstrap: tuple[str, ...] = (bootstrap.__name__, STAND_IN)
    connection_handoff = False  # descriptors do not cross the stdio bridge


GRAMINE_SIM = GramineSimKind()


def start_stand_in(stream_fd: int, enclu_fd: int, entry: str, name: str) -> subprocess.Popen[bytes]:
    """Start the stand-in for ``gramine-sgx``: stdin/stdout the stream, and its ENCLU socket."""
    args = ["--entry", entry, "--name", name, "--enclu-fd", str(enclu_fd)]
    return subprocess.Popen(
        isolated_command(sys.executable, STAND_IN, args),
        stdin=stream_fd,
        stdout=stream_fd,
        pass_fds=[enclu_fd],
        env=CLEAN_ENV,
        cwd="/",
        start_new_session=True,
    )


class SimEgetkey:
    """attestation.EgetkeyHelper over the sim CPU: a KEYREQUEST in, the caller's key out."""

    def __init__(self, client: SimEnclaveClient) -> None:
        self._client = client

    def egetkey(self, key_request: bytes) -> bytes:
        try:
            request = parse_key_request(key_request)
        except ValueError as exc:
            raise PlatformError(f"EGETKEY: {exc}") from None
        return self._client.get_key(request)


class AttestationTree:
    """A /dev/attestation directory of named pipes, answered from ``client`` (see module doc)."""

    READABLE = ("attestation_type", "my_target_info", "report", "quote",
                "keys/_sgx_mrenclave", "keys/_sgx_mrsigner")
    WRITABLE = ("user_report_data", "target_info")

    def __init__(self, client: SimEnclaveClient, parent: Path | None = None) -> None:
        self._client = client
        own = client.report(client.identity.target_info, bytes(REPORT_DATA_SIZE))
        self._cpu_svn = parse_report_body(own[:REPORT_BODY_SIZE]).cpu_svn
        self._base = Path(tempfile.mkdtemp(prefix="gramine-sim-", dir=parent))
        self.root = self._base / "attestation"
        (self.root / "keys").mkdir(parents=True, mode=0o700)
        self._lock = threading.Lock()
        self._inputs: dict[str, int] = {}
        self._values = {"user_report_data": bytes(REPORT_DATA_SIZE),
                        "target_info": bytes(TARGET_INFO_SIZE)}
        for name in self.WRITABLE:
            os.mkfifo(self.root / name, 0o600)
            # Held open read-write by us: a write by the enclave never blocks and
            # lands here before its next open of a readable file returns.
            self._inputs[name] = os.open(self.root / name, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        answers: dict[str, Callable[[], bytes]] = {
            "attestation_type": lambda: b"dcap",
            "my_target_info": self._my_target_info,
            "report": self._report,
            "quote": self._quote,
            "keys/_sgx_mrenclave": lambda: self._seal_key(KeyPolicy.MRENCLAVE),
            "keys/_sgx_mrsigner": lambda: self._seal_key(KeyPolicy.MRSIGNER),
        }
        for name, answer in answers.items():
            os.mkfifo(self.root / name, 0o600)
            threading.Thread(target=self._serve, args=(name, answer), daemon=True,
                             name=f"attestation-{name}").start()

    def _drain(self) -> None:
        """Take what the enclave wrote to the writable files (the last whole write wins)."""
        sizes = {"user_report_data": REPORT_DATA_SIZE, "target_info": TARGET_INFO_SIZE}
        for name, fd in self._inputs.items():
            data = b""
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(fd, 65536):
                    data += chunk
            if data:
                size = sizes[name]
                # Gramine refuses a write of the wrong size; here it leaves the value as it was.
                if len(data) % size == 0:
                    self._values[name] = data[-size:]

    def _serve(self, name: str, answer: Callable[[], bytes]) -> None:
        path = self.root / name
        inode = path.stat().st_ino
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)  # waits for a reader
            except OSError:
                return  # the tree is gone
            try:
                # The reader's open may still be completing: wait for its descriptor,
                # or the wait below could pass before it exists.
                _wait_opened(inode, besides=fd)
                with self._lock:
                    self._drain()
                    try:
                        data = answer()
                    except PlatformError as exc:
                        sys.stderr.write(f"gramine-sim: /dev/attestation/{name}: {exc}\n")
                        data = b""  # the reader gets an empty file, as a failed read
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    raise
            finally:
                os.close(fd)
            # The reader sees EOF only while no writer is open: reopening before it
            # closed would hand it a second copy. Only this process opens the tree.
            _wait_unopened(inode)

    def _my_target_info(self) -> bytes:
        return pack_target_info(self._client.identity.target_info)

    def _report(self) -> bytes:
        target = parse_target_info(self._values["target_info"])
        return self._client.report(target, self._values["user_report_data"])

    def _quote(self) -> bytes:
        return self._client.quote(self._values["user_report_data"])

    def _seal_key(self, policy: KeyPolicy) -> bytes:
        # Gramine's KEYREQUEST for keys/_sgx_*: SEAL, the policy, the current
        # CPUSVN and ISVSVN, CONFIGSVN, KEYID zero (pal/src/host/linux-sgx).
        ident = self._client.identity
        return self._client.get_key(
            KeyRequest(key_name=KeyName.SEAL, key_policy=policy, isv_svn=ident.isv_svn,
                       cpu_svn=self._cpu_svn)
        )

    def close(self) -> None:
        for fd in self._inputs.values():
            os.close(fd)
        self._inputs = {}
        shutil.rmtree(self._base, ignore_errors=True)


def _opened(inode: int, besides: int = -1) -> bool:
    """Whether a descriptor of this process other than ``besides`` refers to ``inode``."""
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) == besides:
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/self/fd/{fd}").st_ino == inode:
                return True
    return False


def _wait_opened(inode: int, besides: int) -> None:
    while not _opened(inode, besides):
        time.sleep(0.0002)


def _wait_unopened(inode: int) -> None:
    """Until no descriptor of this process refers to the file ``inode``."""
    while _opened(inode):
        time.sleep(0.0002)


def _harden(name: str) -> None:
    set_dumpable(False)  # as a sim enclave
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    set_process_name(f"gramine:{name}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gramine-sim-stand-in")
    p.add_argument("--entry", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--enclu-fd", type=int, required=True)
    opts = p.parse_args(argv)
    _harden(opts.name)
    from sgxvtpm.platform.gramine.attestation import AttestationFiles, GramineEnclavePlatform
    from sgxvtpm.platform.sim import codeimport
    from sgxvtpm.platform.sim.zygote_proto import recv_message, send_message, unpack_code

    enclu = socket.socket(fileno=opts.enclu_fd)
    os.set_inheritable(opts.enclu_fd, False)
    client = SimEnclaveClient(enclu)
    with client._lock:  # the one request outside base.EnclavePlatform: our measured code
        send_message(enclu, {"op": "code"})
        header, blob, _ = recv_message(enclu)
    code, _config = unpack_code(header, blob)
    stale = codeimport.stale_preloads(code, codeimport.source_digests())
    if stale:
        sys.stderr.write(f"gramine-sim: unmeasured code already loaded: {stale}\n")
        return 1
    codeimport.install(code)
    del code, blob
    args = bootstrap.read_launch_args(0)
    # As on Gramine: the launch copy (here the CPU's), then the file the host names.
    verifier = bootstrap.collateral_verifier(
        client.attestation_root_pem, str(header["collateral"]), args
    )
    tree = AttestationTree(client)
    try:
        platform = GramineEnclavePlatform(
            AttestationFiles(tree.root), verifier=verifier, egetkey=SimEgetkey(client),
            counters=client,
        )
        bootstrap.run(opts.entry, platform, args)
    finally:
        tree.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
