"""sgxvtpm's swtpm control channels against swtpm 0.7.1, side by side, as swtpm's own tools
see them.

Each test runs twice (the ``peers`` fixture), once for each of sgxvtpm's
control channels, each beside a real ``swtpm socket --tpm2`` (the golden peer)
started the same way:

- ``attach``: ``sgxvtpm vm attach --ctrl`` (K2 to an instance enclave of a
  real hostd), beside ``swtpm socket --tpm2 --ctrl type=unixio,path=S``;
- ``libvirt``: the ``swtpm`` of ``sgxvtpm libvirt path`` on a TPM state
  directory our ``swtpm_setup`` bound (as libvirt runs both), and swtpm,
  both started with libvirt's arguments: ``socket --ctrl
  type=unixio,path=S,mode=0600 --tpmstate dir=D,mode=0600 --log file=L
  --terminate --tpm2``.

Both get the same thing:

- every ``swtpm_ioctl`` 0.7.1 option (``swtpm_ioctl --help``), compared on
  exit status, stdout and stderr. The only normalisation is the socket path
  (each peer has its own), replaced by ``CTRL`` in both outputs;
- raw control commands swtpm_ioctl does not send or does not show the bytes
  of (GET_CAPABILITY, GET_CONFIG, LOCK_STORAGE, SET_BUFFERSIZE while running,
  the HASH_* sequence at locality 4 then TPM2_PCR_Read of PCR 17), compared
  byte for byte;
- the data channel: SEND_COMMAND_HEADER framing, and its life after the
  control connection that set it (SET_DATAFD) closed.

What differs by design (README, "Differences from swtpm") is asserted as
such: state blobs are sealed (``--save`` files differ; each peer loads its
own), ``vm attach`` keeps serving after CMD_SHUTDOWN (libvirt's swtpm ends,
as swtpm does). With ``--terminate`` both end when the data channel's peer
goes, not when a control connection ends (swtpm_ioctl's come and go).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import pytest
from tests.helpers.endpoint import (
    EndpointProcess,
    start_libvirt_swtpm,
    start_swtpm_ctrl,
    start_vm_endpoint,
)
from tests.helpers.hostd import Hostd
from tests.helpers.sockets import recv_exact, recv_tpm_response
from tests.helpers.swtpm import swtpm_available
from tests.helpers.vmtools import create_vm

from sgxvtpm.endpoint.libvirt import bindir
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_SU

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not swtpm_available(), reason="needs Debian's swtpm and swtpm_ioctl"),
]
_names = count(1)
#: How long a raw exchange waits for bytes after the last ones (swtpm answers at once).
QUIET = 0.15


@dataclass
class Peer:
    name: str
    proc: EndpointProcess
    #: Started with ``--terminate``: ends when its data channel's peer goes.
    terminate: bool = False

    @property
    def ctrl(self) -> str:
        return self.proc.address

    def ioctl(self, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
        """``swtpm_ioctl ARGS --unix CTRL``: (exit status, stdout, stderr), the path
        normalised to CTRL (the one legitimate difference in the text)."""
        p = subprocess.run(["swtpm_ioctl", *args, "--unix", self.ctrl], input=stdin,
                           capture_output=True, timeout=30)
        norm = (p.stdout.decode(), p.stderr.decode())
        return (p.returncode, *(t.replace(self.ctrl, "CTRL") for t in norm))

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.ctrl)
        return s


def raw(sock: socket.socket, message: bytes, fds: list[int] | None = None) -> bytes:
    """Send one control message and return every byte that comes back until the
    peer is quiet for QUIET seconds (a byte-for-byte view, no codec)."""
    if fds:
        socket.send_fds(sock, [message], fds)
    else:
        sock.sendall(message)
    out = b""
    sock.settimeout(10)
    chunk = sock.recv(65536)
    while chunk:
        out += chunk
        sock.settimeout(QUIET)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
    sock.settimeout(10)
    return out


def cmd(code: int, body: bytes = b"") -> bytes:
    return struct.pack(">I", code) + body


def attach_data(ctrl: socket.socket) -> socket.socket:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert raw(ctrl, cmd(16), [theirs.fileno()]) == b"\0\0\0\0"
    finally:
        theirs.close()
    mine.settimeout(10)
    return mine


def transact(data: socket.socket, command: bytes) -> bytes:
    data.sendall(command)
    return recv_tpm_response(data)


@pytest.fixture(scope="module")
def libvirt_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sgxvtpm libvirt path``'s directory: swtpm, swtpm_setup, the system's swtpm_ioctl."""
    return bindir.ensure(tmp_path_factory.mktemp("libvirt-bin") / "libvirt")


def _libvirt_setup(libvirt_bin: Path, hostd: Hostd, tpm_state: Path, log: Path) -> dict[str, str]:
    """Our ``swtpm_setup`` with libvirt 9.0's arguments for a new domain; the
    environment libvirtd would give swtpm (hostd and the operator)."""
    env = {**os.environ, "SGXVTPM_STATE_DIR": str(hostd.state.root),
           "SGXVTPM_CONFIG_DIR": str(hostd.credentials.root), "SGXVTPM_CONF": os.devnull}
    tpm_state.mkdir(mode=0o700)
    done = subprocess.run(
        [str(libvirt_bin / "swtpm_setup"), "--tpm2", "--tpm-state", str(tpm_state),
         "--vmid", f"ioctl{next(_names)}:{uuid.uuid4()}", "--logfile", str(log),
         "--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram",
         "--not-overwrite"],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, log.read_text() if log.exists() else done.stderr
    return env


@pytest.fixture(params=["attach", "libvirt"])
def peers(request: pytest.FixtureRequest, sgx_hostd: Hostd,
          tmp_path: Path) -> Iterator[tuple[Peer, Peer]]:
    """A fresh swtpm and a fresh sgxvtpm VM behind one of our control channels, both
    started the same way, with the TPM not started."""
    if request.param == "attach":
        name = f"ioctl-vm{next(_names)}"
        create_vm(sgx_hostd, name)
        swtpm = Peer("swtpm", start_swtpm_ctrl(tmp_path / "swtpm", tmp_path / "swtpm.ctrl"))
        ours = Peer("attach", start_vm_endpoint(sgx_hostd.state, name, "--ctrl",
                                                 str(tmp_path / "attach.ctrl"),
                                                 log_dir=tmp_path))
    else:
        libvirt_bin = request.getfixturevalue("libvirt_bin")
        env = _libvirt_setup(libvirt_bin, sgx_hostd, tmp_path / "tpm2", tmp_path / "setup.log")
        (tmp_path / "swtpm").mkdir()
        swtpm = Peer("swtpm", start_libvirt_swtpm(
            "swtpm", tmp_path / "swtpm", tmp_path / "swtpm.ctrl", tmp_path / "swtpm.log"),
            terminate=True)
        ours = Peer("libvirt", start_libvirt_swtpm(
            str(libvirt_bin / "swtpm"), tmp_path / "tpm2", tmp_path / "libvirt.ctrl",
            tmp_path / "libvirt.log", env=env), terminate=True)
    yield swtpm, ours
    for p in (swtpm, ours):
        p.proc.stop()


def same(pair: tuple[Peer, Peer], *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    swtpm, ours = (p.ioctl(*args, stdin=stdin) for p in pair)
    assert ours == swtpm, f"swtpm_ioctl {' '.join(args)}: swtpm {swtpm} {pair[1].name} {ours}"
    return swtpm


#: swtpm_ioctl invocations in order, from a TPM that is not running yet. Each answer
#: is the same from both; the comment says what swtpm answers where it matters.
SEQUENCE: list[tuple[str, ...]] = [
    ("-c",),                   # ptm capability is 0xffff
    ("-e",),                   # not running: TPM result 0xa
    ("-v",), ("-C",),          # not running: 0xa
    ("-h", "early"),           # not running: 0xa
    ("-g",), ("-b", "0"), ("-b", "3000"), ("-b", "4096"),
    ("--info", "0"), ("--info", "1"), ("--info", "2"), ("--info", "3"), ("--info", "4"),
    ("-i",),
    ("-e",),                   # tpmEstablished is 0
    ("-b", "4096"),            # running: 0xa
    ("-b", "0"),
    ("-l", "0"), ("-l", "1"), ("-l", "2"), ("-l", "3"), ("-l", "4"),
    ("-l", "5"),               # rejected by swtpm_ioctl itself
    ("-r", "0"), ("-r", "1"), ("-r", "2"),  # TPM_BAD_LOCALITY 0x3d
    ("-r", "3"), ("-r", "4"),
    ("-l", "4"),
    ("-h", "measured launch"), # the DRTM sequence at locality 4
    ("-e",),                   # tpmEstablished is 1
    ("-r", "4"),
    ("-e",),                   # tpmEstablished is 0
    ("-l", "0"),
    ("-h", "at locality 0"),
    ("-e",),
    ("-C",), ("-v",), ("-g",),
    ("-i",),
    ("-e",),
    ("--stop",),
    ("-e",), ("-v",),          # stopped: 0xa
    ("-i",),
    ("--bogus",), (),          # usage errors
]


def test_swtpm_ioctl_options_match_swtpm(peers: tuple[Peer, Peer]) -> None:
    """Every difference in the sequence is reported at once, not only the first."""
    differences = []
    for args, stdin in [*((a, None) for a in SEQUENCE),
                        (("-l", "4"), None),
                        # 256 HASH_DATA chunks from stdin, as swtpm's _test_tpm2_hashing
                        (("-h", "-"), bytes(1024 * 1024)),
                        (("-e",), None)]:
        swtpm, ours = (p.ioctl(*args, stdin=stdin) for p in peers)
        if ours != swtpm:
            differences.append(
                f"swtpm_ioctl {' '.join(args)}: swtpm {swtpm} {peers[1].name} {ours}")
    assert not differences, "\n".join(differences)
    assert peers[1].ioctl("-e") == (0, "tpmEstablished is 1\n", "")
    # What the hash sequences measured (before TPM2_Startup: the H-CRTM), as the TPM
    # reports it; pcrUpdateCounter (bytes 10-13) depends on the allocated banks.
    reads = []
    for peer in peers:
        with peer.connect() as ctrl:  # swtpm serves one control connection at a time
            data = attach_data(ctrl)
        with data:
            # At locality 4 (the last -l) TPM2_Startup is refused: TPM_RC_LOCALITY.
            assert transact(data, wire.startup(TPM2_SU.CLEAR))[6:] == b"\0\0\x09\x07"
            assert peer.ioctl("-l", "0") == (0, "", "")
            assert wire.response_code(transact(data, wire.startup(TPM2_SU.CLEAR))) == 0
            reads.append(transact(data, wire.pcr_read([0, 17])))
    assert reads[0][:10] + reads[0][14:] == reads[1][:10] + reads[1][14:], reads
    assert wire.response_code(reads[1]) == 0


def test_save_and_load_state_blobs(peers: tuple[Peer, Peer], tmp_path: Path) -> None:
    """``--save``/``--load``: the same answers; the blobs differ by design (ours are
    sealed to the instance enclave), each peer takes back its own."""
    same(peers, "-i")
    sizes: dict[str, dict[str, int]] = {}
    for peer in peers:
        sizes[peer.name] = {}
        for kind in ("permanent", "volatile", "savestate"):
            path = tmp_path / f"{peer.name}.{kind}"
            assert peer.ioctl("--save", kind, str(path)) == (0, "", "")
            sizes[peer.name][kind] = path.stat().st_size
    for kind in ("permanent", "volatile"):  # present in both; savestate only after a suspend
        assert sizes["swtpm"][kind] > 0 and sizes[peers[1].name][kind] > 0, sizes
    assert sizes["swtpm"]["savestate"] == sizes[peers[1].name]["savestate"] == 0
    same(peers, "--save", "bogus", str(tmp_path / "x"))  # Unknown TPM state type
    same(peers, "--load", "permanent", str(tmp_path / "absent"))  # Could not open file
    same(peers, "--stop")
    for peer in peers:
        for kind in ("permanent", "volatile"):
            assert peer.ioctl("--load", kind, str(tmp_path / f"{peer.name}.{kind}")) == (0, "", "")
    same(peers, "-i")
    same(peers, "-e")


def test_shutdown_swtpm_exits_attach_serves_on(peers: tuple[Peer, Peer]) -> None:
    """CMD_SHUTDOWN: the same answer; swtpm exits, and so does libvirt's swtpm (libvirt
    stops it so); ``vm attach`` (without ``--terminate``) keeps serving the VM's next
    QEMU (README: deliberate)."""
    swtpm, ours = peers
    same(peers, "-i")
    same(peers, "-s")
    assert swtpm.proc.proc.wait(timeout=10) == 0
    if ours.name == "libvirt":
        assert ours.proc.proc.wait(timeout=15) == 0
        return
    assert ours.ioctl("-c") == (0, "ptm capability is 0xffff\n", "")
    assert ours.proc.alive()


def test_attach_terminate_exits_on_shutdown(sgx_hostd: Hostd, tmp_path: Path) -> None:
    name = f"ioctl-vm{next(_names)}"
    create_vm(sgx_hostd, name)
    ours = Peer("attach", start_vm_endpoint(sgx_hostd.state, name, "--ctrl",
                                             str(tmp_path / "attach.ctrl"), "--terminate",
                                             log_dir=tmp_path))
    try:
        assert ours.ioctl("-i") == (0, "", "")
        assert ours.ioctl("-s") == (0, "", "")
        assert ours.proc.proc.wait(timeout=15) == 0
    finally:
        ours.proc.stop()


def test_raw_control_commands_match_swtpm_bytes(peers: tuple[Peer, Peer]) -> None:
    socks = [p.connect() for p in peers]
    datas = [attach_data(s) for s in socks]

    def both(message: bytes) -> bytes:
        a, b = (raw(s, message) for s in socks)
        assert a == b, f"{message.hex()}: swtpm {a.hex()} {peers[1].name} {b.hex()}"
        return a

    def tpm(command: bytes) -> bytes:
        a, b = (transact(d, command) for d in datas)
        assert a == b, f"swtpm {a.hex()} {peers[1].name} {b.hex()}"
        return a

    try:
        assert both(cmd(1)) == struct.pack(">Q", 0xFFFF)  # GET_CAPABILITY
        assert both(cmd(15)) == bytes(8)  # GET_CONFIG: no file key, no migration key
        assert both(cmd(19, bytes(4))) == struct.pack(">I", 0x0A)  # LOCK_STORAGE: 0.8+
        assert both(cmd(2, bytes(4))) == bytes(4)  # INIT
        tpm(wire.startup(TPM2_SU.CLEAR))
        # SET_BUFFERSIZE while running: a query answers, a change is refused.
        assert both(cmd(17, bytes(4))) == struct.pack(">IIII", 0, 4096, 2808, 4096)
        # The DRTM sequence (TPM2 Part 1, 34.3): _TPM_Hash_Start/Data/End at locality 4.
        assert both(cmd(5, b"\x04")) == bytes(4)  # one byte, as swtpm_ioctl sends it
        assert both(cmd(6)) == bytes(4)
        for chunk in (b"first chunk of the MLE", b"x" * 3000):
            assert both(cmd(7, struct.pack(">I", len(chunk)) + chunk)) == bytes(4)
        assert both(cmd(8)) == bytes(4)
        assert both(cmd(5, b"\x00\x00\x00\x00")) == bytes(4)  # four bytes, as QEMU sends it
        # Equal but for pcrUpdateCounter (bytes 10-13), which counts PCR changes in
        # every allocated bank: the VM's TPM was manufactured with the sha256 bank
        # only (as swtpm_setup does), the bare swtpm has four banks.
        banks = [transact(d, wire.get_capability(5, 0, 1)) for d in datas]  # TPM_CAP_PCRS
        assert banks[0] != banks[1]  # else the counters must be equal too
        pcr17 = [transact(d, wire.pcr_read([17])) for d in datas]
        assert pcr17[0][:10] + pcr17[0][14:] == pcr17[1][:10] + pcr17[1][14:], pcr17
        assert wire.response_code(pcr17[1]) == 0 and pcr17[1][-32:] != bytes(32)
        assert both(cmd(4)) == struct.pack(">IB3x", 0, 1)  # established by the sequence
        assert both(cmd(11, b"\x03")) == bytes(4)  # reset from locality 3
        assert both(cmd(11, b"\x01\x00\x00\x00")) == struct.pack(">I", 0x3D)
        assert both(cmd(4)) == struct.pack(">IB3x", 0, 0)
    finally:
        for s in (*socks, *datas):
            s.close()


def test_send_command_header_framing_matches_swtpm(peers: tuple[Peer, Peer]) -> None:
    """PTM_CAP_SEND_COMMAND_HEADER: a command may carry the TCG prefix (u32 8, u8
    locality, u32 size); the answer then carries u32 size before and u32 0 after."""
    socks = [p.connect() for p in peers]
    datas = [attach_data(s) for s in socks]
    try:
        for s in socks:
            assert raw(s, cmd(2, bytes(4))) == bytes(4)
        command = wire.pcr_read([17])
        answers = []
        for d in datas:
            assert wire.response_code(transact(d, wire.startup(TPM2_SU.CLEAR))) == 0
            d.sendall(struct.pack(">IBI", 8, 3, len(command)) + command)
            size = struct.unpack(">I", recv_exact(d, 4))[0]
            answers.append((size, recv_exact(d, size), recv_exact(d, 4)))
            # The prefix's locality stays, as a SET_LOCALITY would.
            answers.append(transact(d, command))
        assert answers[0:2] == answers[2:4]
        assert answers[0][2] == bytes(4)
        assert both_raw(socks, cmd(11, b"\x00")) == struct.pack(">I", 0x3D)
    finally:
        for s in (*socks, *datas):
            s.close()


def both_raw(socks: list[socket.socket], message: bytes) -> bytes:
    a, b = (raw(s, message) for s in socks)
    assert a == b, f"{message.hex()}: swtpm {a.hex()} ours {b.hex()}"
    return a


def test_data_channel_after_its_control_connection_closed(peers: tuple[Peer, Peer]) -> None:
    """swtpm 0.7.1 keeps serving a SET_DATAFD data channel after the control
    connection that passed it closed, and refuses another SET_DATAFD while it
    lives (TPM_IOERROR); once its peer closes it, a new one is accepted, or, with
    ``--terminate`` (libvirt's), the process ends: only the data channel's peer
    going ends it, not a control connection (swtpm_ioctl's come and go)."""
    for peer in peers:
        ctrl = peer.connect()
        data = attach_data(ctrl)
        assert raw(ctrl, cmd(2, bytes(4))) == bytes(4)
        ctrl.close()
        time.sleep(0.3)
        assert wire.response_code(transact(data, wire.startup(TPM2_SU.CLEAR))) == 0, peer.name
        ctrl = peer.connect()
        mine, theirs = socket.socketpair()
        assert raw(ctrl, cmd(16), [theirs.fileno()]) == struct.pack(">I", 0x1F), peer.name
        theirs.close()
        mine.close()
        ctrl.close()
        assert peer.ioctl("-c") == (0, "ptm capability is 0xffff\n", ""), peer.name
        data.close()
        if peer.terminate:
            assert peer.proc.proc.wait(timeout=15) == 0, peer.name
            continue
        time.sleep(0.3)
        ctrl = peer.connect()
        data = attach_data(ctrl)
        assert wire.response_code(transact(data, wire.get_random(8))) == 0, peer.name
        data.close()
        ctrl.close()
