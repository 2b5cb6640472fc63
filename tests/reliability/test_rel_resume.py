"""Long version of the resume test (SECURITY.md property 19; RELIABILITY.md row 8).

Two VMs on one hostd: a QEMU guest (TCG) booted on ``vm attach`` reads its
PCRs 0-7 and 16 from sysfs in a loop, and a K2Client runs mixed commands
(PCR extends, NV writes and increments, DA-protected NV reads, GetRandom,
transient key creation) against a model. Their instance enclaves and hostd
are killed -9 at random moments, 200 times or more. No TPM2_Startup is sent
after the first; after every kill the model holds (PCR 16, NV data and
counter exactly as acknowledged, TPM_PT_LOCKOUT_COUNTER 0) and the guest
never reads another PCR value than at boot. Only with SGXVTPM_STRESS=1
(``make stress``); it prints its figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest
from tests.helpers.endpoint import start_vm_endpoint
from tests.helpers.hostd import Hostd, running_hostd
from tests.helpers.vmtools import create_vm
from tests.integration.test_crash_resume import (
    COUNTER,
    DA_AUTH,
    DA_INDEX,
    instance_pid,
    kill_hostd,
    lockout_counter,
    pcr16,
    prepared,
    read_counter,
)

import sgxvtpm._demo.guest as guest_module
from sgxvtpm.endpoint.k2 import K2Client
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.nv import execute
from sgxvtpm.util import log

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600),
              pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")]

KILLS = int(os.environ.get("SGXVTPM_RESUME_KILLS", "200"))
# After booting, the guest reads PCR 0-7 and 16 (one TPM2_PCR_Read each) forever.
_READ_LOOP = """k=0
while true; do
  k=$((k+1)); v=""
  for n in 0 1 2 3 4 5 6 7 16; do
    v="$v $(cat /sys/class/tpm/tpm0/pcr-sha256/$n 2>/dev/null || echo ERR)"
  done
  echo "READ $k$v"
  sleep 0.2
done
"""


def looping_initrd(workdir: Path) -> Path:
    """The demo's initramfs with a PCR reading loop after its boot report."""
    init = guest_module._INIT.replace("while true; do sleep 60; done\n", _READ_LOOP)
    assert init != guest_module._INIT
    original = guest_module._INIT
    guest_module._INIT = init
    try:
        return guest_module.build_initramfs(workdir)
    finally:
        guest_module._INIT = original


def guest_reads(console: str) -> list[list[str]]:
    return [line.lower().split()[2:] for line in console.splitlines()
            if re.match(r"READ \d+ ", line)]


class Driver:
    """vm2's workload with its model; records each request's latency."""

    def __init__(self, client: K2Client, seed: int) -> None:
        self.c = client
        self.rng = random.Random(seed)
        self.pcr = pcr16(client)
        self.counter = read_counter(client)
        self.nv = b"resumed!"
        self.latencies: list[float] = []
        self.commands = 0

    def step(self) -> None:
        c, roll = self.c, self.rng.random()
        t0 = time.perf_counter()
        if roll < 0.3:
            digest = os.urandom(32)
            execute(c.transact, wire.pcr_extend(16, digest))
            self.pcr = hashlib.sha256(self.pcr + digest).digest()
        elif roll < 0.5:
            execute(c.transact, wire.nv_increment(COUNTER))
            self.counter += 1
        elif roll < 0.65:
            data = os.urandom(8)
            execute(c.transact, wire.nv_write(DA_INDEX, data, auth_handle=DA_INDEX, auth=DA_AUTH))
            self.nv = data
        elif roll < 0.8:
            got = wire.parse_nv_read(execute(
                c.transact, wire.nv_read(DA_INDEX, 8, auth_handle=DA_INDEX, auth=DA_AUTH)))
            assert got == self.nv
        elif roll < 0.95:
            execute(c.transact, wire.get_random(32))
        else:
            created = wire.parse_create_primary(execute(c.transact, wire.create_primary(
                wire.ecc_p256_template())))
            execute(c.transact, wire.flush_context(created.handle))
        self.latencies.append(time.perf_counter() - t0)
        self.commands += 1

    def check(self) -> None:
        assert pcr16(self.c) == self.pcr
        assert read_counter(self.c) == self.counter
        got = wire.parse_nv_read(execute(
            self.c.transact, wire.nv_read(DA_INDEX, 8, auth_handle=DA_INDEX, auth=DA_AUTH)))
        assert got == self.nv
        assert lockout_counter(self.c) == 0


def test_resume_under_200_random_kills_with_a_booted_guest(tmp_path: Path) -> None:
    if guest_module.missing_tools():
        pytest.skip(f"needs {guest_module.missing_tools()}")
    rng = random.Random(int(os.environ.get("SGXVTPM_SEED", "17")))
    with running_hostd(tmp_path / "state") as h:
        driver = Driver(prepared(h), rng.randrange(2**32))  # vm1: the K2Client's VM
        driver.c.reconnect_timeout = 120
        create_vm(h, "guest")
        attach = start_vm_endpoint(h.state, "guest", "--ctrl", str(tmp_path / "guest.ctrl"),
                                   log_dir=tmp_path)
        qemu = guest_module.Guest(tmp_path, looping_initrd(tmp_path), tmp_path / "guest.ctrl")
        try:
            boot = qemu.wait_for_boots(1, 180)[0]
            boot_values = [boot.pcrs[n] for n in range(8)]
            deadline = time.monotonic() + 60
            while not guest_reads(qemu.console()) and time.monotonic() < deadline:
                time.sleep(0.2)
            first = guest_reads(qemu.console())[0]
            assert first[:8] == boot_values
            figures = _kill_loop(h, driver, rng)
            time.sleep(2)  # the guest reads a few more times after the last kill
            reads = guest_reads(qemu.console())
            assert attach.alive()
        finally:
            driver.c.close()
            qemu.stop()
            attach.stop()
    wrong = [r for r in reads if r != first]
    attach_log = (tmp_path / "guest-attach.log").read_text()
    figures.update(guest_reads=len(reads), guest_reads_wrong_or_failed=len(wrong),
                   guest_endpoint_resumes=attach_log.count('"event": "k2.resumed"'),
                   guest_endpoint_refused=attach_log.count('"event": "k2.resume_refused"'))
    print("\nRESUME-STRESS " + json.dumps(figures))
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    assert not wrong, wrong[:5]
    assert figures["k2_resume_refused"] == figures["guest_endpoint_refused"] == 0


def _kill_loop(h: Hostd, driver: Driver, rng: random.Random) -> dict[str, object]:
    kills = {"instance_vm1": 0, "instance_guest": 0, "hostd": 0}
    started = time.monotonic()
    with log.capture() as events:
        for _ in range(KILLS):
            victim = rng.choices(list(kills), [0.45, 0.4, 0.15])[0]
            delay = rng.uniform(0, 0.02)
            if victim == "hostd":  # killed and restarted while vm1 is mid-command
                killer = threading.Timer(delay, kill_hostd, (h,))
            else:
                name = "vm1" if victim == "instance_vm1" else "guest"
                killer = threading.Timer(delay, os.kill, (instance_pid(h, name), signal.SIGKILL))
            killer.start()
            for _ in range(rng.randint(1, 6)):  # commands racing the kill
                driver.step()
            killer.join()
            kills[victim] += 1
            driver.check()
    resumed = [e for e in events if e["event"] == "k2.resumed"]
    return {
        "kills": sum(kills.values()), **kills,
        "seconds": round(time.monotonic() - started),
        "vm1_commands": driver.commands,
        "k2_resumes": len(resumed),
        "k2_replayed": sum(1 for e in resumed if e.get("replayed")),
        "k2_reconnect_attempts": sum(1 for e in events if e["event"] == "k2.reconnect"),
        "k2_resume_refused": sum(1 for e in events if e["event"] == "k2.resume_refused"),
        "vm1_latency_p50_ms": round(statistics.median(driver.latencies) * 1e3, 2),
        "vm1_latency_max_s": round(max(driver.latencies), 3),
    }

