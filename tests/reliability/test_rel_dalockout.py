"""Abrupt VM resets do not lock the owner out (RELIABILITY.md scenario 7; TPM 2.0
Part 1, 19.8.6).

A TPM that restarts without an orderly TPM2_Shutdown after a DA-protected
authorization was used counts one failed authorization; enough VM resets
would then lock out every DA-protected object. VtpmCore sends the
TPM2_Shutdown the guest did not (as swtpm 0.10 does) on INIT/STOP.

The VM here has an owner password and a persistent key without noDA
(DA-protected). Each of 100 cycles boots the TPM, uses the key with its
password, and then resets abruptly, half of them on K2 (the client drops
the session in the middle of a command, then INIT without Shutdown), half
through the tcti-swtpm endpoint (``sgxvtpm vm serve --swtpm``): a command is
sent and the data connection dropped unread, then CMD_INIT on the control
channel, which is what QEMU sends on system_reset. After every cycle
TPM_PT_LOCKOUT_COUNTER reads 0; at the end an owner-authorized command and
the DA-protected key still work. One wrong password then moves the counter
to 1, which shows the counter being read is live.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.helpers.endpoint import start_vm_endpoint
from tests.helpers.vmtools import NV_ATTRS, HostdCtl, client, lockout_counter, rc_of

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_CAP, TPM2_CC, TPM2_PT, TPM2_RH, TPM2_SU, TPMA_OBJECT
from sgxvtpm.tpm.nv import execute
from sgxvtpm.wire import swtpm_ctrl as ctrl

pytestmark = pytest.mark.integration

OWNER_AUTH = b"owner password"
KEY_AUTH = b"key password"
KEY = 0x81000120
RESETS = 100


def da_key_template() -> bytes:
    base = wire.ecc_p256_template(signing=True)
    attrs = int.from_bytes(base[4:8], "big") & ~int(TPMA_OBJECT.NODA)
    return base[:4] + wire.u32(attrs) + base[8:]


def provision(transact: Callable[[bytes], bytes]) -> None:
    execute(transact, wire.startup(TPM2_SU.CLEAR))
    execute(
        transact,
        wire.build_command(
            TPM2_CC.HierarchyChangeAuth, wire.tpm2b(OWNER_AUTH), [TPM2_RH.OWNER],
            [wire.password_session(b"")],
        ),
    )
    created = wire.parse_create_primary(
        execute(
            transact,
            wire.create_primary(da_key_template(), user_auth=KEY_AUTH, hierarchy_auth=OWNER_AUTH),
        )
    )
    execute(transact, wire.evict_control(created.handle, KEY, auth=OWNER_AUTH))


def use_key(transact: Callable[[bytes], bytes]) -> None:
    execute(transact, wire.sign(KEY, os.urandom(32), auth=KEY_AUTH))


def lockout(transact: Callable[[bytes], bytes]) -> int:
    command = wire.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
    return wire.parse_tpm_properties(execute(transact, command))[1][TPM2_PT.LOCKOUT_COUNTER]


# ------------------------------------------------------------------ the swtpm endpoint


class SwtpmEndpoint:
    """``sgxvtpm vm serve NAME --swtpm PATH``: raw TPM on PATH, swtpm control on PATH.ctrl."""

    def __init__(self, ctl: HostdCtl, name: str, path: Path) -> None:
        self.path = path
        self.ep = start_vm_endpoint(ctl.state, name, "--swtpm", str(path), log_dir=path.parent)
        self.data: socket.socket | None = None

    def init(self) -> None:
        """CMD_INIT without a shutdown first: QEMU's system_reset."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(60)
            s.connect(f"{self.path}.ctrl")
            s.sendall(ctrl.encode_request(ctrl.CtrlRequest(ctrl.CtrlCmd.INIT)))
            decoder = ctrl.CtrlResponseDecoder(ctrl.CtrlCmd.INIT)
            while (response := decoder.next_response()) is None:
                chunk = s.recv(4096)
                decoder.receive_data(chunk)
            assert response.result == 0, response

    def transact(self, command: bytes) -> bytes:
        if self.data is None:
            self.data = socket.socket(socket.AF_UNIX)
            self.data.settimeout(60)
            self.data.connect(str(self.path))
        self.data.sendall(command)
        framer = ctrl.CommandFramer()
        while (response := framer.next_command()) is None:
            chunk = self.data.recv(65536)
            assert chunk, "endpoint closed the data connection"
            framer.receive_data(chunk)
        return response

    def drop_mid_command(self) -> None:
        """Send a command and hang up without reading the answer."""
        assert self.data is not None
        self.data.sendall(wire.get_random(16))
        self.data.close()
        self.data = None

    def close(self) -> None:
        if self.data is not None:
            self.data.close()
        self.ep.stop()


def test_abrupt_resets_do_not_lock_out_the_owner(ctl: HostdCtl, tmp_path: Path) -> None:
    ctl.create("vm1")
    with client(ctl, "vm1") as c:
        c.power_on()
        provision(c.transact)
    endpoint = SwtpmEndpoint(ctl, "vm1", tmp_path / "vtpm")
    counters: list[int] = []
    try:
        for cycle in range(RESETS):
            if cycle % 2:
                endpoint.init()
                execute(endpoint.transact, wire.startup(TPM2_SU.CLEAR))
                use_key(endpoint.transact)
                counters.append(lockout(endpoint.transact))
                endpoint.drop_mid_command()
            else:
                # The endpoint holds the VM's TPM: this session takes it over (the
                # endpoint's next command opens a session of its own again).
                c = client(ctl, "vm1", takeover=True)
                c.power_on()  # INIT with no TPM2_Shutdown since the last use of the key
                execute(c.transact, wire.startup(TPM2_SU.CLEAR))
                use_key(c.transact)
                counters.append(lockout(c.transact))
                c.close()  # the session ends mid-way: no Shutdown, no goodbye
        endpoint.init()
        execute(endpoint.transact, wire.startup(TPM2_SU.CLEAR))
        assert lockout(endpoint.transact) == 0
    finally:
        endpoint.close()
    assert counters == [0] * RESETS, counters
    with client(ctl, "vm1") as c:
        c.power_on()
        execute(c.transact, wire.startup(TPM2_SU.CLEAR))
        # The owner hierarchy answers its password, the DA-protected key works.
        execute(c.transact, wire.nv_define_space(0x01500060, 8, NV_ATTRS,
                                                 hierarchy_auth=OWNER_AUTH))
        execute(c.transact, wire.nv_undefine_space(0x01500060, auth=OWNER_AUTH))
        use_key(c.transact)
        assert lockout_counter(c) == 0
        # The counter is live: one wrong password counts.
        assert rc_of(c.transact(wire.sign(KEY, bytes(32), auth=b"wrong"))) != 0
        assert lockout_counter(c) == 1
