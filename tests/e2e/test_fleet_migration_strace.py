"""No host process writes a VM's TPM secrets in the clear while its TPM moves
between hosts, not even for a moment (SECURITY.md, property 18; README "Many hosts").

tests/e2e/test_fleet_migration.py scans QEMU's migration stream and both
hosts' files at the end; a plaintext that was only in flight (a temporary
file written and deleted, a pipe, a socket to another local process, a log
line that went elsewhere) would escape that. Here both hosts' hostd run under
``strace -f`` (tests/helpers/strace.py), so every process of both trees —
hostd, the sim CPU, the zygote, the manager and instance enclaves, whatever
they fork or exec — has every byte it hands the kernel to write (write,
pwrite64, writev, pwritev, sendto, sendmsg, sendmmsg, vmsplice) dumped. The VM
writes a random marker into an NV index and extends a PCR with the marker's
SHA-256; its TPM then moves from A to B as QEMU moves it (GET_STATEBLOB on A,
``-incoming`` and SET_STATEBLOB on B, as in test_fleet_migration.py, without a
guest), and B reads both back. Neither the marker (whole, as hex or base64, or
any 8 bytes of it), nor the digest, nor the PCR's value is in any byte
stream of either tree. An enclave's writes count: on SGX they leave the
enclave for the untrusted OS.

Where the plaintext legitimately is, and is not traced: the VM's side. The
``vm attach`` endpoints (QEMU's tpm-emulator peer) and this test (the VM,
sending NV_Write through the endpoint's control/data channel as QEMU would)
are processes of their own, outside both hostd trees, and the test checks
that neither was traced. They carry the VM's commands in the clear by design,
as QEMU does: a guest that hides NV contents from its own VMM uses TPM
parameter encryption. What this shows is that the vTPM service's host side
never writes them: from the endpoint on, the bytes are K2 TLS records, sealed
state and fleet-sealed blobs only.

Not seen by a system-call trace: stores to shared memory mappings, and
io_uring; the file scan at the end covers what stays on disk. Calls that copy
between descriptors (sendfile, splice, ...) are traced and refused here.

Slow (``make stress``): strace dumps some 30 MB per host (mostly the measured
code the sim CPU hands each enclave), and the test takes 19-26 s on 2 busy
cores against about 10 s untraced. tests/integration/test_strace_sees_writes.py,
in ``make test``, checks the harness itself.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from pathlib import Path

import pytest
from tests.e2e.test_fleet_migration import assert_no_plaintext
from tests.helpers.fleet import cli, fleet_of, ok, wait_vm_state
from tests.helpers.qemu_ctrl import attached, ctrl, loadvm, new_qemu, savevm, tpm_ok
from tests.helpers.strace import launcher, process_tree, written
from tests.helpers.vmtools import NV_ATTRS

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU
from sgxvtpm.wire.swtpm_ctrl import CtrlCmd

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/install.sh)"),
]

INDEX = 0x01500043
PCR = 9
WINDOW = 8


def needles(marker: bytes) -> dict[str, bytes]:
    """The marker and what follows from it, in the encodings a careless log would use."""
    digest = hashlib.sha256(marker).digest()
    pcr_value = hashlib.sha256(bytes(32) + digest).digest()
    found = {
        "marker": marker,
        "marker as hex": marker.hex().encode(),
        "marker as HEX": marker.hex().upper().encode(),
        "marker as base64": base64.b64encode(marker).rstrip(b"="),
        "its digest": digest,
        "its digest as hex": digest.hex().encode(),
        "the PCR's value": pcr_value,
        "the PCR's value as hex": pcr_value.hex().encode(),
    }
    # A marker split over two descriptors or processes leaves a piece of at least
    # 8 bytes in one of them (up to 4 pieces); random, so no chance match.
    for i in range(len(marker) - WINDOW + 1):
        found[f"marker bytes {i}..{i + WINDOW}"] = marker[i : i + WINDOW]
    return found


def test_no_host_process_writes_the_tpm_in_the_clear(tmp_path: Path) -> None:
    marker = os.urandom(32)
    digest = hashlib.sha256(marker).digest()
    traces = [tmp_path / "trace-a", tmp_path / "trace-b"]
    with fleet_of(tmp_path / "fleet", 2, launcher=lambda i: launcher(traces[i])) as (a, b):
        ok(cli(a, "vm", "create", "secret"))
        ok(cli(b, "vm", "create", "secret", "--incoming"))
        with attached(tmp_path, (a.state, "secret"), (b.state, "secret")) as (ep_a, ep_b):
            q = new_qemu(ep_a.address)
            tpm_ok(q, wire.startup(TPM2_SU.CLEAR))
            tpm_ok(q, wire.nv_define_space(INDEX, len(marker), NV_ATTRS))
            tpm_ok(q, wire.nv_write(INDEX, marker))
            tpm_ok(q, wire.pcr_extend(PCR, digest))
            # Every process and thread of both trees is traced (the sim CPU,
            # the zygote, the enclaves included); the VM's side is not.
            trees = [process_tree(a.pid), process_tree(b.pid)]
            for tree, out in zip(trees, traces, strict=True):
                assert len(tree) >= 5  # hostd, CPU, zygote, manager, instance at least
                assert {tid for tid in tree if not (out / f"trace.{tid}").exists()} == set()
            for ep in (ep_a, ep_b):
                assert ep.proc.pid not in trees[0] | trees[1]
            blobs = savevm(q)
            q.close()

            q = new_qemu(ep_b.address)
            assert loadvm(q, blobs) == [0] * len([d for d in blobs.values() if d])
            assert ctrl(q, CtrlCmd.INIT, flags=1).result == 0
            read = tpm_ok(q, wire.nv_read(INDEX, len(marker)))
            assert wire.parse_nv_read(read) == marker
            pcr = wire.parse_pcr_read(tpm_ok(q, wire.pcr_read([PCR]))).digests[0]
            assert pcr == hashlib.sha256(bytes(32) + digest).digest()
            q.close()
            wait_vm_state(a, "secret", "migrated")
        assert_no_plaintext([a.state.root, b.state.root], blobs)
    # Both hostds stopped: strace has written everything.
    for out, host in zip(traces, "AB", strict=True):
        trace = written(out)
        assert trace.undumped == [], f"host {host}: bytes moved that strace cannot show"
        assert trace.find(needles(marker)) == [], f"host {host}"
        # It saw the tree's writes: hostd's log lines, the instance enclave's too.
        for event in (b'"hostd.starting"', b'"instance.migration"'):
            assert trace.find({"log": event}), f"host {host}: {event!r}, {trace.calls}"
    assert written(traces[0]).find({"A's manager's log": b'"manager.migrated_out"'})
