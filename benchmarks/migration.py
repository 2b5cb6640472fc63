"""Section: moving a VM's TPM state to another host (export, transfer, import).

swtpm: ``CMD_GET_STATEBLOB`` of the three blob types from a running swtpm,
the blobs written to a file and read back (the migration stream), then on a
second swtpm on fresh state ``CMD_STOP``, ``CMD_SET_STATEBLOB`` x3 and
``CMD_INIT``: what QEMU does around a migration (the host reads the state).

sgxvtpm: two hostd processes under one sim root in one fleet
(docs/ARCHITECTURE.md, "Many hosts"); the VM's instance on host A, an
``--incoming`` instance on host B. The same calls over K2: GET_STATEBLOB x3
on A (portable blobs under the VM's fleet key), the same file round trip,
STOP, SET_STATEBLOB x3, INIT on B. Also timed: from the first TPM command on
B until A's manager has marked the VM migrated there (B's manager polls its
incoming instances every 0.5 s, then tells A over a fleet session).

Both TPMs hold the same state: Startup, an NV counter defined and
incremented, a primary ECC key created.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.context import Context
from benchmarks.swtpm import Swtpm
from benchmarks.transports import SocketTransport
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU, TPMA_NV
from sgxvtpm.wire import swtpm_ctrl
from sgxvtpm.wire.swtpm_ctrl import CtrlCmd, CtrlRequest, CtrlResponse

COUNTER = 0x01500050
COUNTER_ATTRS = (
    TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD
    | TPMA_NV.NO_DA | TPMA_NV.TPM_NT_COUNTER
)  # fmt: skip
BLOB_TYPES = (1, 2, 3)
_RETRY = 0x800  # TPM_RETRY


def _fill(transact: Any) -> None:
    """The state both TPMs carry over."""
    for command in (
        wire.nv_define_space(COUNTER, 8, COUNTER_ATTRS),
        wire.nv_increment(COUNTER),
        wire.create_primary(wire.ecc_p256_template()),
    ):
        wire.check_success(transact(command))


def _transfer(workdir: Path, blobs: dict[int, bytes]) -> tuple[dict[int, bytes], float]:
    """The migration stream: the blobs to a file and back; the seconds it took."""
    path = workdir / "stream"
    t0 = time.perf_counter()
    with open(path, "wb") as out:
        for kind in BLOB_TYPES:
            out.write(len(blobs[kind]).to_bytes(4, "big") + blobs[kind])
    data, back, offset = path.read_bytes(), {}, 0
    for kind in BLOB_TYPES:
        size = int.from_bytes(data[offset : offset + 4], "big")
        back[kind] = data[offset + 4 : offset + 4 + size]
        offset += 4 + size
    return back, time.perf_counter() - t0


class _Ctrl:
    """swtpm's control channel, blocking (the codec is sgxvtpm's, sans-IO)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))

    def blob(self, kind: int) -> bytes:
        """GET_STATEBLOB of ``kind``; swtpm answers TPM_RETRY for an absent savestate blob."""
        response = self(CtrlCmd.GET_STATEBLOB, flags=1, blob_type=kind, allow=(_RETRY,))
        return b"" if response.result == _RETRY else response.data

    def __call__(self, code: CtrlCmd, allow: tuple[int, ...] = (), **kw: Any) -> CtrlResponse:
        self.sock.sendall(swtpm_ctrl.encode_request(CtrlRequest(code, **kw)))
        decoder = swtpm_ctrl.CtrlResponseDecoder(code, short_errors=False)
        while (response := decoder.next_response()) is None:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("swtpm closed its control channel")
            decoder.receive_data(chunk)
        if not isinstance(response, CtrlResponse) or response.result not in (0, *allow):
            raise RuntimeError(f"swtpm {code.name}: {response}")
        return response

    def close(self) -> None:
        self.sock.close()


def swtpm_migration(ctx: Context, runs: int) -> dict[str, Any]:
    root = ctx.workdir / "migration-swtpm"
    export_s, transfer_s, import_s, sizes = [], [], [], []
    for i in range(runs):
        src, dst = Swtpm(root / f"src{i}"), Swtpm(root / f"dst{i}")
        try:
            src.wait_answering()
            dst.wait_answering()
            tpm = SocketTransport(src.path)
            _fill(tpm.transact)
            tpm.close()
            ctrl_src, ctrl_dst = _Ctrl(src.ctrl_path), _Ctrl(dst.ctrl_path)
            t0 = time.perf_counter()
            blobs = {k: ctrl_src.blob(k) for k in BLOB_TYPES}
            export_s.append(time.perf_counter() - t0)
            blobs, moved = _transfer(root, blobs)
            transfer_s.append(moved)
            t0 = time.perf_counter()
            ctrl_dst(CtrlCmd.STOP)
            for kind in BLOB_TYPES:
                if blobs[kind]:
                    ctrl_dst(CtrlCmd.SET_STATEBLOB, blob_type=kind, data=blobs[kind])
            ctrl_dst(CtrlCmd.INIT, flags=1)
            import_s.append(time.perf_counter() - t0)
            sizes.append(sum(len(b) for b in blobs.values()))
            ctrl_src.close()
            ctrl_dst.close()
            check = SocketTransport(dst.path)  # the state arrived: the counter is there
            wire.check_success(check.transact(wire.nv_read(COUNTER, 8)))
            check.close()
        finally:
            src.close()
            dst.close()
    return _summary(export_s, transfer_s, import_s, sizes)


def _summary(
    export_s: list[float], transfer_s: list[float], import_s: list[float], sizes: list[int]
) -> dict[str, Any]:
    total = [a + b + c for a, b, c in zip(export_s, transfer_s, import_s, strict=True)]
    return {
        "ok": True,
        "runs": len(total),
        "export_ms": statistics.median(export_s) * 1000,
        "transfer_ms": statistics.median(transfer_s) * 1000,
        "import_ms": statistics.median(import_s) * 1000,
        "median_ms": statistics.median(total) * 1000,
        "bytes": statistics.median(sizes),
    }


def sgx_migration(ctx: Context, runs: int) -> dict[str, Any]:
    import json

    from sgxvtpm.endpoint.k2 import K2Client, VmBinding
    from sgxvtpm.host.statedir import StateDir
    from sgxvtpm.platform import init_sim_root
    from sgxvtpm.testing import HostdProcess
    from sgxvtpm.vmm.client import VmmClient
    from sgxvtpm.vmm.credentials import Credentials
    from sgxvtpm.wire import k1
    from sgxvtpm.wire.vtpm import VtpmOp, VtpmRequest, decode_response, encode_request

    if ctx.sgx_reason:
        return {"ok": False, "reason": f"not available: {ctx.sgx_reason}"}
    root = ctx.workdir / "migration-sgx"
    init_sim_root(root / "sim-root")
    credentials = Credentials(root / "credentials")
    hosts: list[HostdProcess] = []
    ports: list[int] = []
    for name in ("a", "b"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        host = HostdProcess(
            StateDir(root / name), credentials=credentials, log_path=root / f"{name}.log",
            args=["--sim-root", str(root / "sim-root"),
                  "--fleet-listen", f"127.0.0.1:{ports[-1]}"],
        )  # fmt: skip
        hosts.append(host)
    export_s, transfer_s, import_s, sizes, report_s = [], [], [], [], []
    try:
        for host in hosts:
            host.start()
        a, b = (VmmClient(h.state, credentials=credentials) for h in hosts)
        invitation = asyncio.run(a.request(k1.FleetInvite(address=f"127.0.0.1:{ports[0]}")))
        asyncio.run(b.request(k1.FleetJoin("127.0.0.1", ports[0], invitation.token,
                                           address=f"127.0.0.1:{ports[1]}")))  # fmt: skip

        def call(client: K2Client, request: VtpmRequest) -> bytes:
            response = decode_response(client.request(encode_request(request)))
            if not response.success:
                raise RuntimeError(f"{VtpmOp(request.op).name}: {response.result}")
            return response.payload

        for i in range(runs):
            name = f"mig{i}"
            asyncio.run(a.create(name))
            asyncio.run(b.create(name, incoming=True))
            src = K2Client(VmBinding.load(hosts[0].state, name, credentials=credentials))
            dst = K2Client(VmBinding.load(hosts[1].state, name, credentials=credentials))
            with src, dst:
                call(src, VtpmRequest.init())
                wire.check_success(call(src, VtpmRequest.tpm_command(wire.startup(TPM2_SU.CLEAR))))
                _fill(lambda c: call(src, VtpmRequest.tpm_command(c)))  # noqa: B023
                t0 = time.perf_counter()
                blobs = {k: call(src, VtpmRequest.get_stateblob(k)) for k in BLOB_TYPES}
                export_s.append(time.perf_counter() - t0)
                blobs, moved = _transfer(root, blobs)
                transfer_s.append(moved)
                call(dst, VtpmRequest.init())  # the new QEMU's machine reset: not timed
                t0 = time.perf_counter()
                call(dst, VtpmRequest(VtpmOp.STOP))
                for kind in BLOB_TYPES:
                    if blobs[kind]:
                        call(dst, VtpmRequest.set_stateblob(kind, blobs[kind]))
                call(dst, VtpmRequest.init(flags=1))
                import_s.append(time.perf_counter() - t0)
                sizes.append(sum(len(b) for b in blobs.values()))
                t0 = time.perf_counter()
                wire.check_success(call(dst, VtpmRequest.tpm_command(wire.nv_read(COUNTER, 8))))
                deadline = t0 + 30
                while asyncio.run(a.show(name)).state != "migrated":
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"{name} was not marked migrated on A in 30 s")
                    time.sleep(0.02)
                report_s.append(time.perf_counter() - t0)
    except Exception as exc:
        return {"ok": False, "reason": f"failed: {type(exc).__name__}: {exc}",
                "log": json.dumps([h.log_tail(20) for h in hosts])}  # fmt: skip
    finally:
        for host in hosts:
            if host.proc is not None and host.running():
                host.stop()
    result = _summary(export_s, transfer_s, import_s, sizes)
    result["report_ms"] = statistics.median(report_s) * 1000
    return result


def run(ctx: Context) -> dict[str, Any]:
    runs = max(3, ctx.config.creation_runs)
    return {"swtpm": swtpm_migration(ctx, runs), "sgxvtpm": sgx_migration(ctx, runs)}
