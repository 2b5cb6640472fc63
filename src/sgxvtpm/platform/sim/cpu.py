"""The sim CPU: the one process that holds a simulated platform's secrets.

On SGX the fuse key lives in the CPU and the attestation key in the quoting
enclave; the loader (hostd) and every enclave only ever see what EINIT,
EGETKEY, EREPORT and the QE give *one* enclave for *its own* identity. This
process plays both parts for a platform directory:

- it opens (or, on first start, provisions) the platform: fuse key, quoting
  key, counters, the vendor's enclave-signing key;
- EINIT: for each launch it measures the code bytes it is given, verifies the
  SIGSTRUCT (:mod:`.sigstruct`) against that measurement, and derives MRSIGNER
  from the key that verified it; a bad or missing signature is refused;
- it asks its zygote (:mod:`.zygote`, holding no secret: forked by
  :mod:`.cpu_boot` before this process read the platform, or restarted here
  as a new interpreter) to fork the enclave, and binds the measured identity
  to a socket the enclave gets (:mod:`.enclu`): every EGETKEY, EREPORT, quote
  and counter request on that socket is answered for that identity only;
- the vendor's signing step, in development mode only: at start it signs the
  enclaves of the release named by ``--release module:function`` (a function
  of the platform's kind, :data:`.backend.SIM`, returning unsigned
  EnclaveSpecs), built from the sgxvtpm installed for this interpreter, and
  nothing else, ever. A loader that sends other code gets no signature for
  it: EINIT refuses the launch. With ``--presigned`` (``hostd --release
  DIR``: the vendor signed on its build host, :mod:`.release`) it signs
  nothing and a platform it provisions holds no vendor key: the loader sends
  the shipped SIGSTRUCTs and EINIT checks them, as on hardware.

Run by :class:`~sgxvtpm.platform.sim.loader.SimLoader` (through :mod:`.cpu_boot`) as an
isolated interpreter (no PYTHONPATH, no cwd on sys.path, a clean environment). When
hostd starts as root and drops to an unprivileged user (``--user``), this
process, its zygote and the enclaves stay root: the platform directory is
root's (0700), and hostd's user can neither read their memory nor signal
them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sgxvtpm.platform.base import (
    AttestationError,
    EnclaveIdentity,
    KeyName,
    KeyPolicy,
    KeyRequest,
    PlatformError,
    PlatformKind,
    ReportBody,
    TargetInfo,
)
from sgxvtpm.platform.sim import sigstruct
from sgxvtpm.platform.sim.authority import SimAuthority
from sgxvtpm.platform.sim.backend import SIM
from sgxvtpm.platform.sim.enclave import SimEnclavePlatform
from sgxvtpm.platform.sim.gramine_sim import GRAMINE_SIM, start_stand_in
from sgxvtpm.platform.sim.measure import attributes_of, identity_of, mrenclave_of, read_code
from sgxvtpm.platform.sim.platform_dir import SimPlatformDir
from sgxvtpm.platform.sim.report import pack_report_body
from sgxvtpm.platform.sim.spawn import (
    CLEAN_ENV,
    Child,
    ForkedChild,
    end_child,
    isolated_command,
    launch_over_pair,
)
from sgxvtpm.platform.sim.zygote_proto import (
    ENCLU_MAX,
    ZygoteGone,
    first_message,
    recv_message,
    send_message,
    unpack_code,
)
from sgxvtpm.util import heap, log


def main(
    argv: list[str] | None = None, zygote: tuple[ForkedChild, socket.socket] | None = None
) -> int:
    """``zygote``: one :mod:`.cpu_boot` forked before this process read anything of
    the platform (else the CPU starts its own)."""
    p = argparse.ArgumentParser(prog="sgxvtpm-sim-cpu")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--platform-dir", required=True)
    p.add_argument("--preload", default="")
    p.add_argument("--release", default="", help="module:function giving the specs to sign")
    p.add_argument("--gramine-sim", action="store_true",
                   help="one stand-in process per enclave over /dev/attestation (gramine_sim.py)")
    p.add_argument("--sim-root", default="", help="the sim provisioning authority (sim-root)")
    p.add_argument("--presigned", action="store_true",
                   help="sign nothing; provision a new platform without a vendor key")
    opts = p.parse_args(argv)
    log.configure("sim-cpu")
    heap.keep_large_blocks_mapped()  # launch messages, ~1.5 MB each (util/heap.py)
    ctl = socket.socket(fileno=opts.control_fd)
    os.set_inheritable(ctl.fileno(), False)
    try:
        authority = (
            SimAuthority.open(Path(opts.sim_root), with_signer=not opts.presigned)
            if opts.sim_root
            else None
        )
        platform = SimPlatformDir.open_or_create(
            Path(opts.platform_dir), authority=authority, vendor_key=not opts.presigned
        )
    except PlatformError as exc:
        return _not_ready(ctl, exc, zygote)
    cpu = Cpu(platform, opts.preload, gramine_sim=opts.gramine_sim)
    try:
        kind = GRAMINE_SIM if opts.gramine_sim else SIM
        signing = opts.release and not opts.presigned
        sigstructs = sign_release(platform, opts.release, kind) if signing else {}
        if zygote is not None:
            cpu.adopt_zygote(*zygote)
        elif not opts.gramine_sim:
            cpu.start_zygote()
    except (PlatformError, ImportError, AttributeError, OSError) as exc:
        return _not_ready(ctl, exc, zygote)
    send_message(
        ctl,
        {
            "ready": True,
            "pid": os.getpid(),
            "zygote_pid": cpu.zygote_pid,
            "signer_public_key": platform.signer_public_key.hex(),
            "root_pem": platform.root_certificate_pem.hex(),
            "platform_id": platform.platform_id.hex(),
            "sigstructs": {name: sig.hex() for name, sig in sigstructs.items()},
        },
    )
    while True:
        try:
            header, blob, fds = recv_message(ctl)
        except ZygoteGone:
            # hostd went away. Like the CPU under a crashed host process, keep
            # serving the enclaves still running until each one has ended (an
            # instance finishing a state commit needs its counter).
            cpu.stop_zygote()
            cpu.wait_enclaves()
            return 0
        try:
            reply, out_fds = cpu.handle(header, blob, fds)
        except (PlatformError, ValueError, KeyError, TypeError, OSError) as exc:
            reply, out_fds = {"ok": False, "error": str(exc)}, []
        finally:
            for fd in fds:
                os.close(fd)
        try:
            send_message(ctl, reply, fds=out_fds)
        finally:
            for fd in out_fds:
                os.close(fd)
        # The request's bytes (a launch carries the measured code, ~1.5 MB) go
        # now, not when the next request replaces them, and the heap they leave
        # free goes back to the host.
        del header, blob
        heap.release_free_memory()


def _not_ready(
    ctl: socket.socket, exc: Exception, zygote: tuple[ForkedChild, socket.socket] | None
) -> int:
    """Tell the loader why the platform cannot start; end the forked zygote, if any
    (not adopted, or adopted and gone: end_child is idempotent)."""
    if zygote is not None:
        end_child(zygote[1], zygote[0], timeout=5)
    send_message(ctl, {"ready": False, "error": str(exc)})
    return 2


class Cpu:
    def __init__(
        self, platform: SimPlatformDir, preload: str, *, gramine_sim: bool = False
    ) -> None:
        self.platform = platform
        self.gramine_sim = gramine_sim
        self._preload = preload
        self._zygote: Child | None = None
        self._zctl: socket.socket | None = None
        self._enclu_threads: list[threading.Thread] = []
        self.zygote_pid = 0

    # -- the loader's requests -------------------------------------------------
    def handle(
        self, header: Mapping[str, Any], blob: bytearray, fds: list[int]
    ) -> tuple[dict[str, Any], list[int]]:
        op = header.get("op")
        if op == "launch":
            if len(fds) != 1:
                return {"ok": False, "error": "launch needs the enclave's stream"}, []
            return self._launch(header, blob, fds[0])
        if op == "probe_quote":  # hostd --pccs (host/collateral.py)
            return {"ok": True, "quote": self.platform.probe_quote(bytes(blob)).hex()}, []
        if op == "replace_collateral":
            self.platform.replace_collateral(bytes(blob).decode())
            return {"ok": True}, []
        return {"ok": False, "error": f"unknown op {op!r}"}, []

    def _launch(
        self, header: Mapping[str, Any], blob: bytearray, stream_fd: int
    ) -> tuple[dict[str, Any], list[int]]:
        code, config = unpack_code(header, blob)
        sig = sigstruct.SigStruct.decode(bytes.fromhex(str(header.get("sigstruct", ""))))
        # MRSIGNER comes from the key that verifies the SIGSTRUCT, nothing else.
        identity = identity_of(
            str(header["entry"]),
            code,
            config,
            sig.signer_public_key,
            int(header["isv_prod_id"]),
            int(header["isv_svn"]),
            bool(header.get("debug", False)),
        )
        sigstruct.einit_check(sig, identity)
        if self.gramine_sim:
            return self._launch_stand_in(header, blob, stream_fd, identity, config)
        request = {k: header[k] for k in ("name", "entry", "config_len", "files", "args")}
        request["op"] = "launch"
        reply, launched = launch_over_pair(
            lambda enclave_end: self._to_zygote(request, blob, [stream_fd, enclave_end])
        )
        if launched is None:
            return {"ok": False, "error": reply.get("error", "launch failed")}, []
        cpu_end, pidfd = launched
        enclave = self.platform.enclave_platform(identity, config=config)
        thread = threading.Thread(
            target=serve_enclu,
            args=(cpu_end, enclave),
            name=f"enclu-{reply['pid']}",
            daemon=True,
        )
        thread.start()
        self._enclu_threads = [t for t in self._enclu_threads if t.is_alive()] + [thread]
        log.log("platform.enclave_launched", enclave=header["name"], pid=reply["pid"],
                mrenclave=identity.mrenclave.hex())
        body = pack_report_body(ReportBody(identity=identity, report_data=bytes(64)))
        return {
            "ok": True,
            "pid": reply["pid"],
            "zygote_pid": self.zygote_pid,
            "identity": body.hex(),
        }, [pidfd]

    def _launch_stand_in(
        self,
        header: Mapping[str, Any],
        blob: bytearray,
        stream_fd: int,
        identity: EnclaveIdentity,
        config: bytes,
    ) -> tuple[dict[str, Any], list[int]]:
        """gramine-sim: a new process per enclave (as gramine-sgx), no zygote.

        The stand-in (:mod:`.gramine_sim`) gets the host stream as stdin and
        stdout and its ENCLU socket; it fetches its measured code over that
        socket (op ``code``), once.
        """
        cpu_end, enclave_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = start_stand_in(
                stream_fd, enclave_end.fileno(), str(header["entry"]), str(header["name"])
            )
        except BaseException:
            cpu_end.close()
            raise
        finally:
            enclave_end.close()
        enclave = self.platform.enclave_platform(identity, config=config)
        code = ({k: header[k] for k in ("config_len", "files")}, bytes(blob))
        collateral = self.platform.dcap_collateral()
        thread = threading.Thread(
            target=_serve_stand_in,
            args=(cpu_end, enclave, code, collateral, proc),
            name=f"enclu-{proc.pid}",
            daemon=True,
        )
        thread.start()
        self._enclu_threads = [t for t in self._enclu_threads if t.is_alive()] + [thread]
        log.log("platform.enclave_launched", enclave=header["name"], pid=proc.pid,
                mrenclave=identity.mrenclave.hex(), kind="gramine-sim")
        body = pack_report_body(ReportBody(identity=identity, report_data=bytes(64)))
        pidfd = os.pidfd_open(proc.pid)
        return {"ok": True, "pid": proc.pid, "zygote_pid": 0, "identity": body.hex()}, [pidfd]

    # -- the zygote --------------------------------------------------------------
    def _to_zygote(
        self, request: dict[str, Any], blob: bytes | bytearray, fds: list[int]
    ) -> tuple[dict[str, Any], list[int]]:
        for attempt in (1, 2):
            if self._zctl is None or self._zygote is None or self._zygote.poll() is not None:
                self.restart_zygote()
            assert self._zctl is not None
            try:
                send_message(self._zctl, request, blob, fds)
                reply, _, out = recv_message(self._zctl)
            except ZygoteGone:
                log.log("platform.zygote_died", action="restarting it")
                self.restart_zygote()
                continue
            if reply.get("stale") and attempt == 1:
                for fd in out:
                    os.close(fd)
                log.log("platform.zygote_stale", modules=reply["stale"], action="restarting it")
                self.restart_zygote()
                continue
            return reply, list(out)
        raise PlatformError("enclave launch failed: the zygote keeps dying")

    def start_zygote(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = isolated_command(
            sys.executable,
            "sgxvtpm.platform.sim.zygote",
            ["--control-fd", str(child.fileno()), "--preload", self._preload],
        )
        try:
            self._zygote = subprocess.Popen(
                cmd,
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                env=CLEAN_ENV,
                cwd="/",
            )
        finally:
            child.close()
        self._zctl = parent
        reply = first_message(parent, "the enclave zygote", self.stop_zygote)
        self.zygote_pid = int(reply["pid"])

    def adopt_zygote(self, proc: ForkedChild, ctl: socket.socket) -> None:
        """Take on a zygote forked before this process read the platform (cpu_boot.py)."""
        self._zygote, self._zctl = proc, ctl
        reply = first_message(ctl, "the enclave zygote", self.stop_zygote)
        self.zygote_pid = int(reply["pid"])

    def wait_enclaves(self) -> None:
        """Until every enclave this CPU launched has closed its ENCLU socket."""
        for thread in self._enclu_threads:
            thread.join()

    def restart_zygote(self) -> None:
        self.stop_zygote()
        self.start_zygote()

    def stop_zygote(self) -> None:
        end_child(self._zctl, self._zygote, timeout=5)
        self._zctl, self._zygote = None, None


def sign_release(
    platform: SimPlatformDir, release: str, kind: PlatformKind = SIM
) -> dict[str, bytes]:
    """SIGSTRUCTs, by enclave name, for the specs ``release`` ("module:function") builds."""
    module_name, _, func_name = release.partition(":")
    specs = getattr(importlib.import_module(module_name), func_name)(kind)
    key = platform.signer_private_key()
    signed = {}
    for spec in specs:
        mrenclave = mrenclave_of(spec.entry, read_code(spec.code_files), spec.config)
        sig = sigstruct.sign(
            key, mrenclave, attributes_of(spec.debug), spec.isv_prod_id, spec.isv_svn
        )
        signed[spec.name] = sig.encode()
        log.log("platform.release_signed", enclave=spec.name, mrenclave=mrenclave.hex())
    return signed


# -- ENCLU, answered for one identity ------------------------------------------


def _serve_stand_in(
    sock: socket.socket,
    enclave: SimEnclavePlatform,
    code: tuple[dict[str, Any], bytes],
    collateral: str,
    proc: subprocess.Popen[bytes],
) -> None:
    try:
        serve_enclu(sock, enclave, code=code, collateral=collateral)
    finally:
        proc.wait()  # reap it: the stand-in closes its ENCLU socket only by exiting


def serve_enclu(
    sock: socket.socket,
    enclave: SimEnclavePlatform,
    *,
    code: tuple[dict[str, Any], bytes] | None = None,
    collateral: str = "",
) -> None:
    """Answer one enclave's requests until it goes away.

    One thread per enclave; counters need no lock here (CounterStore locks
    each counter file with flock, per open file description).
    """
    with sock:
        while True:
            try:
                header, blob, fds = recv_message(sock, ENCLU_MAX)
            except (ZygoteGone, OSError):
                return  # gone, or sent what no ENCLU request is: the enclave loses its CPU
            for fd in fds:
                os.close(fd)
            if header.get("op") == "code" and code is not None:
                # gramine-sim: the stand-in's measured code, given once (as Gramine
                # checks trusted files against the measured hashes).
                (files, data), code = code, None
                send_message(sock, {"ok": True, **files, "collateral": collateral}, data)
                continue
            try:
                reply, out = _enclu(enclave, header, bytes(blob))
            except AttestationError as exc:
                reply, out = {"ok": False, "kind": "attestation", "error": str(exc)}, b""
            except Exception as exc:  # e.g. ENOSPC on a counter: the enclave decides what next
                reply, out = {"ok": False, "kind": "platform", "error": str(exc)}, b""
            try:
                send_message(sock, reply, out)
            except (ZygoteGone, OSError):
                return


def _enclu(
    enclave: SimEnclavePlatform, header: Mapping[str, Any], blob: bytes
) -> tuple[dict[str, Any], bytes]:
    op = header.get("op")
    ok: dict[str, Any] = {"ok": True}
    if op == "hello":
        body = pack_report_body(ReportBody(identity=enclave.identity, report_data=bytes(64)))
        return {**ok, "root_pem": enclave.attestation_root_pem.hex(),
                "collateral": enclave.collateral}, body
    if op == "get_key":
        request = KeyRequest(
            key_name=KeyName(int(header["key_name"])),
            key_policy=KeyPolicy(int(header["key_policy"])),
            isv_svn=int(header["isv_svn"]),
            cpu_svn=bytes.fromhex(header["cpu_svn"]),
            key_id=bytes.fromhex(header["key_id"]),
            config_svn=int(header["config_svn"]),
        )
        return ok, enclave.get_key(request)
    if op == "report":
        target = TargetInfo(
            mrenclave=bytes.fromhex(header["mrenclave"]),
            attributes=bytes.fromhex(header["attributes"]),
            misc_select=int(header["misc_select"]),
        )
        return ok, enclave.report(target, blob)
    if op == "verify_report":
        return ok, pack_report_body(enclave.verify_report(blob))
    if op == "quote":
        return ok, enclave.quote(blob)
    if op == "collateral":  # the platform's current copy (hostd --pccs refreshes it)
        return {**ok, "collateral": enclave.current_collateral()}, b""
    counters: dict[str, Callable[[str], int]] = {
        "counter_create": enclave.counter_create,
        "counter_increment": enclave.counter_increment,
        "counter_read": enclave.counter_read,
    }
    if op in counters:
        return {**ok, "value": counters[op](str(header["name"]))}, b""
    raise ValueError(f"unknown ENCLU request {op!r}")


if __name__ == "__main__":
    sys.exit(main())
