"""The strace harness of tests/e2e/test_fleet_migration_strace.py sees every way a
process tree can hand bytes to the kernel: so a clean result there means something."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.helpers.strace import launcher, written

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace"),
]

# Each way a transient plaintext escapes a scan of files at the end: a file
# written then deleted, pwrite, writev, a pipe to a forked child that writes it
# to a unix socket, sendmsg, sendto over loopback UDP, a marker split over two
# writes, a forked-and-exec'd grandchild, a thread.
WRITER = textwrap.dedent("""
    import os, socket, subprocess, sys, tempfile, threading
    m = {k: bytes.fromhex(v) for k, v in (a.split("=") for a in sys.argv[1:])}
    fd, name = tempfile.mkstemp(); os.write(fd, m["tempfile"]); os.close(fd); os.unlink(name)
    fd, name = tempfile.mkstemp(); os.pwrite(fd, m["pwrite"], 100); os.close(fd); os.unlink(name)
    r, w = os.pipe()
    os.writev(w, [m["writev"][:5], m["writev"][5:]]); os.read(r, 64)
    a, b = socket.socketpair()
    if os.fork() == 0:
        os.write(w, m["pipe"]); a.sendmsg([m["sendmsg"]]); os._exit(0)
    os.wait(); os.read(r, 64); b.recv(64)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
    u.sendto(m["sendto"], u.getsockname()); u.recv(64)
    os.write(w, m["split"][:10]); os.write(w, m["split"][10:]); os.read(r, 64)
    threading.Thread(target=lambda: os.write(w, m["thread"])).start()
    subprocess.run(["sh", "-c", "printf %s " + m["exec"].hex()], stdout=subprocess.DEVNULL)
""")
WAYS = ("tempfile", "pwrite", "writev", "pipe", "sendmsg", "sendto", "split", "thread")


def test_every_write_of_the_tree_is_seen_and_nothing_else(tmp_path: Path) -> None:
    markers = {way: os.urandom(24) for way in (*WAYS, "exec", "never")}
    out = tmp_path / "trace"
    done = subprocess.run(
        [*launcher(out), sys.executable, "-c", WRITER,
         *(f"{k}={v.hex()}" for k, v in markers.items() if k != "never")],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    trace = written(out)
    for way in WAYS:
        assert trace.find({way: markers[way]}), way
    assert trace.find({"exec": markers["exec"].hex().encode()})
    assert not trace.find({"never": markers["never"]})
    # Forked child, thread and exec'd grandchild each have their own trace.
    assert len(trace.threads) >= 4
    assert any("/sh" in p for programs in trace.programs.values() for p in programs)
