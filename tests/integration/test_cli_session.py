"""An ordinary session through the CLI, with swtpm's ``--log``/``--pid`` and ``vm tpm``
(real hostd, real enclaves, real ``vm serve``, tpm2-tools, real sockets).

hostd's log (its own, the sim CPU's and every enclave's lines: they share its
stderr) is nothing but JSON lines, and a client that disconnects abruptly is
routine: no warning or error event.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from tests.helpers.hostd import Hostd, running_hostd
from tests.helpers.vmtools import sgxvtpm_cli

from sgxvtpm.enclaves.ekcert import TCG_AT_TPM_MANUFACTURER, TCG_AT_TPM_MODEL, TCG_AT_TPM_VERSION
from sgxvtpm.testing.hostd import terminate

pytestmark = pytest.mark.integration

GET_RANDOM_8 = "80010000000c0000017b0008"
#: A K2 client that asks for an RSA primary key and is gone before the answer.
ABRUPT_CLIENT = """
import os, sys, threading, time
from pathlib import Path
from sgxvtpm.endpoint.k2 import K2Client, VmBinding
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.tpm import wire
client = K2Client(VmBinding.load(StateDir(Path(sys.argv[1])), sys.argv[2]), label="abrupt")
client.power_on_if_stopped()
client.transact(wire.startup())
threading.Thread(target=client.transact, args=(wire.create_primary(wire.rsa2048_template()),),
                 daemon=True).start()
time.sleep(0.01)
os._exit(0)
"""


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path``, each of which must be one JSON object."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"{path}: not a JSON line: {line!r}") from None
        assert isinstance(record, dict) and "event" in record, line
        records.append(record)
    return records


@contextlib.contextmanager
def serving(h: Hostd, name: str, sock: Path, *extra: str) -> Iterator[Served]:
    """``vm serve NAME --swtpm SOCK EXTRA`` until the block ends (SIGTERM, status 0)."""
    with subprocess.Popen(
        [sys.executable, "-m", "sgxvtpm.cli", "vm", "serve", name, "--swtpm", str(sock),
         "--state-dir", str(h.state.root), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        served = Served(proc)
        try:
            line = proc.stdout.readline()
            assert line.startswith(f"serving {name}"), (line, proc.stderr.read())
            yield served
        finally:
            served.status = terminate(proc)
            served.stderr = proc.stderr.read()


@dataclass
class Served:
    proc: subprocess.Popen[str]
    status: int | None = None
    stderr: str = ""


def tpm2(tool: str, sock: Path, *args: str) -> str:
    done = subprocess.run([tool, "-T", f"swtpm:path={sock}", *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hostd, Path, Path]]:
    """A hostd started with ``--log file=`` and ``--pid file=``; its log and pid file."""
    tmp = tmp_path_factory.mktemp("session")
    log_file, pid_file = tmp / "hostd.jsonl", tmp / "hostd.pid"
    with running_hostd(tmp / "state",
                       args=["--log", f"file={log_file}", "--pid", f"file={pid_file}"]) as h:
        yield h, log_file, pid_file


def test_an_ordinary_session_logs_only_json_and_no_warning_for_a_client_gone(
    session: tuple[Hostd, Path, Path], tmp_path: Path
) -> None:
    h, log_file, pid_file = session
    assert pid_file.read_text() == f"{h.pid}\n"
    assert sgxvtpm_cli(h.state, "vm", "create", "vm1").returncode == 0
    abrupt = subprocess.run([sys.executable, "-c", ABRUPT_CLIENT, str(h.state.root), "vm1"],
                            capture_output=True, text=True, timeout=60)
    assert abrupt.returncode == 0, abrupt.stderr
    sock = tmp_path / "tpm.sock"
    with serving(h, "vm1", sock, "--log", f"file={tmp_path / 'serve.jsonl'}",
                 "--pid", f"file={tmp_path / 'serve.pid'}") as endpoint:
        assert (tmp_path / "serve.pid").read_text() == f"{endpoint.proc.pid}\n"
        tpm2("tpm2_startup", sock, "-c")  # TPM_RC_INITIALIZE is fine: it runs already
        assert len(bytes.fromhex(tpm2("tpm2_getrandom", sock, "--hex", "8").strip())) == 8
        with socket.socket(socket.AF_UNIX) as gone:  # half a command, then gone
            gone.connect(str(sock))
            gone.sendall(bytes.fromhex(GET_RANDOM_8)[:6])
        assert len(bytes.fromhex(tpm2("tpm2_getrandom", sock, "--hex", "8").strip())) == 8
    assert endpoint.status == 0
    assert not (tmp_path / "serve.pid").exists()
    assert endpoint.stderr == ""  # all in the file
    served = json_lines(tmp_path / "serve.jsonl")
    assert any(r["event"] == "endpoint.serving" for r in served)
    assert sgxvtpm_cli(h.state, "vm", "destroy", "vm1").returncode == 0
    time.sleep(0.5)  # the instance's last lines
    records = json_lines(log_file)
    events = {r["event"] for r in records}
    assert {"hostd.listening", "manager.instance_created", "manager.instance_destroyed"} <= events
    assert any(r["component"].startswith("instance-") for r in records)  # enclaves' lines too
    loud = [r for r in records + served if r.get("level") in ("warning", "error")
            and r["event"] != "hostd.running_as_root"]
    assert loud == []
    assert h.log_path.read_text() == ""  # hostd's own stdout/stderr: everything is in the file


def test_vm_tpm_sends_one_command_without_resetting_or_taking_over(
    session: tuple[Hostd, Path, Path], tmp_path: Path
) -> None:
    h = session[0]
    assert sgxvtpm_cli(h.state, "vm", "create", "raw").returncode == 0
    done = sgxvtpm_cli(h.state, "vm", "tpm", "raw", GET_RANDOM_8)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "80010000000a00000101\n"  # not started: TPM_RC_FAILURE, no INIT
    sock = tmp_path / "tpm.sock"
    with serving(h, "raw", sock) as endpoint:
        tpm2("tpm2_startup", sock, "-c")
        tpm2("tpm2_pcrextend", sock, "16:sha256=" + "11" * 32)
        busy = sgxvtpm_cli(h.state, "vm", "tpm", "raw", GET_RANDOM_8)
    assert busy.returncode == 1 and busy.stderr.count("\n") == 1
    assert "raw already has a connected endpoint" in busy.stderr
    assert f"pid {endpoint.proc.pid}" in busy.stderr and "does not take the TPM over" in busy.stderr
    done = sgxvtpm_cli(h.state, "vm", "tpm", "raw", GET_RANDOM_8)
    response = bytes.fromhex(done.stdout.strip())
    # TPM_ST_NO_SESSIONS, 10 + 2 + 8 bytes, TPM_RC_SUCCESS, a TPM2B of 8 random bytes
    assert response[:10] == bytes.fromhex("80010000001400000000") and response[10:12] == b"\0\x08"
    pcr_read = "8001" "00000014" "0000017e" "00000001" "000b" "03" "000001"  # sha256 {16}
    done = sgxvtpm_cli(h.state, "vm", "tpm", "raw", pcr_read)
    assert done.returncode == 0, done.stderr
    extended = hashlib.sha256(bytes(32) + bytes.fromhex("11" * 32)).hexdigest()
    assert done.stdout.strip().endswith(extended)  # vm tpm reset nothing


@pytest.mark.parametrize("bad", ["80010000000c0000017b00g8", "", "8"])
def test_vm_tpm_with_bad_hex_is_one_line_and_status_2(
    session: tuple[Hostd, Path, Path], bad: str
) -> None:
    done = sgxvtpm_cli(session[0].state, "vm", "tpm", "raw", bad)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "is not a TPM command in hex" in done.stderr


def test_a_log_level_filters_and_an_unknown_one_is_a_usage_error(
    session: tuple[Hostd, Path, Path], tmp_path: Path
) -> None:
    h = session[0]
    if sgxvtpm_cli(h.state, "vm", "show", "lv").returncode != 0:
        assert sgxvtpm_cli(h.state, "vm", "create", "lv").returncode == 0
    with serving(h, "lv", tmp_path / "t.sock", "--log", f"file={tmp_path}/w.jsonl,level=warning"):
        pass
    assert json_lines(tmp_path / "w.jsonl") == []  # endpoint.serving is info
    done = sgxvtpm_cli(h.state, "vm", "serve", "lv", "--swtpm", str(tmp_path / "u.sock"),
                       "--log", f"file={tmp_path}/x,level=loud")
    assert done.returncode == 2 and "--log: level must be one of debug, info" in done.stderr


def _raw_properties(getcap: str) -> dict[str, int]:
    """``TPM2_PT_X: raw: 0x...`` of tpm2_getcap properties-fixed's output."""
    found: dict[str, int] = {}
    name = ""
    for line in getcap.splitlines():
        if line.startswith("TPM2_PT_") and line.rstrip().endswith(":"):
            name = line.strip().rstrip(":")
        elif line.strip().startswith("raw:") and name:
            found[name] = int(line.split(":", 1)[1].strip(), 16)
    return found


def test_the_ek_certificate_names_the_tpm_as_the_tpm_reports_itself(
    session: tuple[Hostd, Path, Path], tmp_path: Path
) -> None:
    h = session[0]
    assert sgxvtpm_cli(h.state, "vm", "create", "ident", "--ek", "rsa2048,ecc-p256"
                       ).returncode == 0
    shown = sgxvtpm_cli(h.state, "vm", "show", "ident", "--json")
    certs = json.loads(shown.stdout)["ek_certificates"]
    sock = tmp_path / "tpm.sock"
    with serving(h, "ident", sock):
        tpm2("tpm2_startup", sock, "-c")
        props = _raw_properties(tpm2("tpm2_getcap", sock, "properties-fixed"))
    vendor = b"".join(props[f"TPM2_PT_VENDOR_STRING_{i}"].to_bytes(4, "big") for i in (1, 2, 3, 4))
    expected = {
        TCG_AT_TPM_MANUFACTURER: f"id:{props['TPM2_PT_MANUFACTURER']:08X}",
        TCG_AT_TPM_MODEL: vendor.replace(b"\0", b"").decode().strip(),
        TCG_AT_TPM_VERSION: f"id:{props['TPM2_PT_FIRMWARE_VERSION_1']:08X}",
    }
    assert expected[TCG_AT_TPM_MANUFACTURER] == "id:49424D00"  # libtpms: "IBM"
    assert sorted(certs) == ["ecc-p256", "rsa2048"]
    for der in certs.values():
        cert = x509.load_der_x509_certificate(bytes.fromhex(der))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        (name,) = san.get_values_for_type(x509.DirectoryName)
        found = {a.oid: a.value for a in name}
        assert found == expected


def test_attest_verify_and_ca_show_print_json(session: tuple[Hostd, Path, Path]) -> None:
    h = session[0]
    assert sgxvtpm_cli(h.state, "vm", "create", "att", "--ek", "ecc-p256").returncode == 0
    done = sgxvtpm_cli(h.state, "attest", "verify", "att", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["vm"] == "att" and report["ok"] is True and report["reason"] == ""
    assert report["checks"] and all(c["passed"] is True for c in report["checks"])
    done = sgxvtpm_cli(h.state, "ca", "show", "--json")
    assert done.returncode == 0, done.stderr
    ca = json.loads(done.stdout)
    cert = x509.load_pem_x509_certificate(ca["pem"].encode())
    assert ca["sha256"] == cert.fingerprint(hashes.SHA256()).hex()
    assert ca["subject"] == cert.subject.rfc4514_string()
