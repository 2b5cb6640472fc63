"""Rollback counters in a host TPM (Debian's swtpm), through a host that lies.

The host relays every TPM command (``Mitm.transact``, a real socket to a
real swtpm per command). The man in the middle replays older responses,
rewrites the value NV_Read returns, forges one, drops the session HMAC,
swaps the pinned key, redefines or undefines the counter's index, or clears
the TPM: each must fail (a missing counter, or a refused answer), never
return a value the pinned TPM did not give to this command.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.helpers.swtpm import Swtpm

from sgxvtpm.enclaves.sealing import SealError, SealKind
from sgxvtpm.enclaves.state import SealedFile
from sgxvtpm.platform.base import EnclaveIdentity, EnclavePlatform, PlatformError
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.platform.tpm_counters import (
    TpmCountedPlatform,
    TpmCounters,
    counter_secret,
    provision,
)
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import HEADER_SIZE, TPM2_ALG, TPM2_CC, TPM2_RH, TPM2_ST, TPMA_NV
from sgxvtpm.tpm.nv import execute
from sgxvtpm.tpm.nvcounter import CounterError, HostTpmCounters, counter_public
from sgxvtpm.tpm.session import nv_name

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("swtpm") is None, reason="Debian's swtpm is not installed"),
]

Rewrite = Callable[[bytes, bytes], bytes]  # (command, response) -> response


class Mitm:
    """The untrusted host between the enclave and its TPM: relays, records, rewrites."""

    def __init__(self, tpm: Swtpm) -> None:
        self.tpm = tpm
        self.log: list[tuple[bytes, bytes]] = []
        self.rewrite: dict[int, Rewrite] = {}
        self.answer: dict[int, bytes] = {}  # answered here, never sent to the TPM

    def transact(self, command: bytes) -> bytes:
        code = int.from_bytes(command[6:10], "big")
        if code in self.answer:
            return self.answer[code]
        response = self.tpm.transact(command)
        self.log.append((command, response))
        rewrite = self.rewrite.get(code)
        return response if rewrite is None else rewrite(command, response)

    def responses(self, code: int) -> list[bytes]:
        return [r for c, r in self.log if int.from_bytes(c[6:10], "big") == code]


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    with Swtpm(tmp_path_factory.mktemp("host-tpm")) as tpm:
        yield tpm


def _primary(tpm: Swtpm, template: bytes, hierarchy: int = TPM2_RH.ENDORSEMENT) -> int:
    command = wire.create_primary(template, hierarchy)
    return wire.parse_create_primary(execute(tpm.transact, command)).handle


@pytest.fixture(scope="module")
def keys(swtpm: Swtpm) -> dict[str, int]:
    """Transient primaries: an RSA and an ECC one under the endorsement hierarchy, and
    another RSA key (the owner's) the host might present instead."""
    return {
        "rsa": swtpm.persistent_primary(wire.rsa2048_template(), TPM2_RH.ENDORSEMENT, 0x81010001),
        "ecc": swtpm.persistent_primary(wire.ecc_p256_template(), TPM2_RH.ENDORSEMENT, 0x81010002),
        "other-rsa": swtpm.persistent_primary(wire.rsa2048_template(), TPM2_RH.OWNER, 0x81000001),
    }


@pytest.fixture
def enclave_platform(fresh_sim_platform: SimPlatformDir) -> EnclavePlatform:
    """A sim enclave's keys (its sealing key roots the counters' secret)."""
    identity = EnclaveIdentity(b"\x01" * 32, bytes(range(32)), isv_prod_id=1, isv_svn=1)
    return fresh_sim_platform.enclave_platform(identity)


@pytest.fixture
def mitm(swtpm: Swtpm) -> Mitm:
    return Mitm(swtpm)


def _counters(mitm: Mitm, keys: dict[str, int], alg: str = "rsa") -> HostTpmCounters:
    name = provision(mitm.tpm.transact, keys[alg]).key_name  # provisioning: an honest host
    return HostTpmCounters(mitm.transact, keys[alg], name, os.urandom(32))


@pytest.mark.parametrize("alg", ["rsa", "ecc"])
def test_counter_counts_up_and_reopens(mitm: Mitm, keys: dict[str, int], alg: str) -> None:
    counters = _counters(mitm, keys, alg)
    first = counters.create("instance_state:vm1")
    assert first >= 1
    assert counters.read("instance_state:vm1") == first
    assert [counters.increment("instance_state:vm1") for _ in range(3)] == [
        first + 1,
        first + 2,
        first + 3,
    ]
    assert counters.create("instance_state:vm1") == first + 3  # create opens an existing one
    assert counters.read("instance_state:vm1") == first + 3
    # Everything that matters went in an authenticated session: none in clear.
    codes = {int.from_bytes(c[6:10], "big") for c, _ in mitm.log}
    assert TPM2_CC.StartAuthSession in codes
    for command, _ in mitm.log:
        code = int.from_bytes(command[6:10], "big")
        if code in (TPM2_CC.NV_Read, TPM2_CC.NV_Increment, TPM2_CC.NV_DefineSpace):
            assert int.from_bytes(command[:2], "big") == TPM2_ST.SESSIONS
            assert counters._auth("instance_state:vm1") not in command


def _value(response: bytes, value: int) -> bytes:
    """``response`` (NV_Read) with its 8 data bytes replaced; its HMAC left alone."""
    start = HEADER_SIZE + 4 + 2  # parameterSize, then the TPM2B's size
    return response[:start] + value.to_bytes(8, "big") + response[start + 8 :]


def _without_sessions(response: bytes) -> bytes:
    """``response`` as TPM_ST_NO_SESSIONS: no parameterSize, no session area."""
    size = int.from_bytes(response[HEADER_SIZE : HEADER_SIZE + 4], "big")
    params = response[HEADER_SIZE + 4 : HEADER_SIZE + 4 + size]
    return wire.build_header(TPM2_ST.NO_SESSIONS, HEADER_SIZE + len(params), 0) + params


def _zero_hmac(response: bytes) -> bytes:
    return response[:-32] + bytes(32)


@pytest.mark.parametrize(
    "lie",
    ["older value", "forged higher value", "HMAC dropped", "HMAC zeroed", "replayed response"],
)
def test_host_lying_about_a_read_is_refused(mitm: Mitm, keys: dict[str, int], lie: str) -> None:
    counters = _counters(mitm, keys)
    start = counters.create("c")
    old = mitm.responses(TPM2_CC.NV_Read)[-1]  # the answer "start", HMAC'd for its own nonce
    current = counters.increment("c")
    assert current == start + 1
    rewrites: dict[str, Rewrite] = {
        "older value": lambda c, r: _value(r, start),
        "forged higher value": lambda c, r: _value(r, current + 5),
        "HMAC dropped": lambda c, r: _without_sessions(r),
        "HMAC zeroed": lambda c, r: _zero_hmac(r),
        "replayed response": lambda c, r: old,
    }
    mitm.rewrite[TPM2_CC.NV_Read] = rewrites[lie]
    with pytest.raises(CounterError, match="does not authenticate"):
        counters.read("c")
    with pytest.raises(CounterError, match="does not authenticate"):
        counters.increment("c")  # the increment happened; its read-back is refused
    del mitm.rewrite[TPM2_CC.NV_Read]
    assert counters.read("c") == current + 1  # the honest answer still reaches us


def test_a_skipped_increment_is_refused(mitm: Mitm, keys: dict[str, int]) -> None:
    """The host answers NV_Increment itself (an earlier success) without sending it on."""
    counters = _counters(mitm, keys)
    start = counters.create("c")
    counters.increment("c")
    mitm.answer[TPM2_CC.NV_Increment] = mitm.responses(TPM2_CC.NV_Increment)[-1]
    with pytest.raises(CounterError, match="does not authenticate"):
        counters.increment("c")
    del mitm.answer[TPM2_CC.NV_Increment]
    assert counters.read("c") == start + 1


def test_another_key_is_refused(mitm: Mitm, keys: dict[str, int]) -> None:
    name = provision(mitm.tpm.transact, keys["rsa"]).key_name
    # The host presents another key at the pinned handle's place.
    counters = HostTpmCounters(mitm.transact, keys["other-rsa"], name, os.urandom(32))
    with pytest.raises(CounterError, match="not the pinned one"):
        counters.create("c")
    # The host shows the pinned public area, but the handle is another key:
    # the TPM cannot decrypt the salt, or the session does not authenticate.
    pinned = mitm.tpm.transact(wire.read_public(keys["rsa"]))
    mitm.rewrite[TPM2_CC.ReadPublic] = lambda c, r: pinned
    counters = HostTpmCounters(mitm.transact, keys["other-rsa"], name, os.urandom(32))
    with pytest.raises(CounterError, match=r"salted session|does not authenticate|refused"):
        counters.create("c")


def test_a_key_that_is_not_tpm_generated_is_not_pinned(swtpm: Swtpm) -> None:
    """A signing key (not a restricted decryption key) cannot be pinned."""
    handle = _primary(swtpm, wire.ecc_p256_template(signing=True), TPM2_RH.OWNER)
    try:
        with pytest.raises(PlatformError, match="not a TPM-generated restricted decryption"):
            provision(swtpm.transact, handle)
    finally:
        execute(swtpm.transact, wire.flush_context(handle))


def test_undefined_index_is_missing_and_a_new_one_starts_higher(
    mitm: Mitm, keys: dict[str, int]
) -> None:
    counters = _counters(mitm, keys)
    counters.create("c")
    for _ in range(5):
        last = counters.increment("c")
    execute(mitm.tpm.transact, wire.nv_undefine_space(counters.index("c")))  # owner's right
    with pytest.raises(CounterError, match="does not exist"):
        counters.read("c")
    with pytest.raises(CounterError, match="does not exist"):
        counters.increment("c")
    # Defined again (a reset state), it starts above everything it ever was.
    assert counters.create("c") > last


def test_host_defined_index_with_its_own_auth_is_refused(mitm: Mitm, keys: dict[str, int]) -> None:
    """The host defines our index itself, same attributes, its own authValue, and
    sets the value it likes: the Name matches, our authorization does not."""
    counters = _counters(mitm, keys)
    index = counters.index("c")
    attributes = int.from_bytes(counter_public(index, False)[6:10], "big")
    execute(mitm.tpm.transact, wire.nv_define_space(index, 8, attributes, auth=b"host"))
    for _ in range(3):
        execute(mitm.tpm.transact, wire.nv_increment(index, index, auth=b"host"))
    with pytest.raises(CounterError, match="refused NV_Read"):
        counters.read("c")
    with pytest.raises(CounterError, match="refused NV_Read"):
        counters.create("c")
    execute(mitm.tpm.transact, wire.nv_undefine_space(index))


def test_host_index_with_other_attributes_is_refused(mitm: Mitm, keys: dict[str, int]) -> None:
    counters = _counters(mitm, keys)
    index = counters.index("c")
    attributes = TPMA_NV.TPM_NT_COUNTER | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | TPMA_NV.OWNERWRITE
    execute(mitm.tpm.transact, wire.nv_define_space(index, 8, attributes))
    try:
        with pytest.raises(CounterError, match="not one of our counters"):
            counters.create("c")
        # And if the host claims it is ours, the TPM checks the Name in the HMAC.
        public = counter_public(index, True)
        params = wire.tpm2b(public) + wire.tpm2b(nv_name(public))
        lie = wire.build_header(TPM2_ST.NO_SESSIONS, HEADER_SIZE + len(params), 0) + params
        mitm.answer[TPM2_CC.NV_ReadPublic] = lie
        with pytest.raises(CounterError, match="refused NV_Read"):
            counters.read("c")
    finally:
        execute(mitm.tpm.transact, wire.nv_undefine_space(index))


def test_cleared_tpm_means_missing_counters(tmp_path: Path) -> None:
    """TPM2_Clear deletes the owner's indices: a denial of service, seen as missing."""
    with Swtpm(tmp_path) as tpm:
        key = _primary(tpm, wire.rsa2048_template())
        name = provision(tpm.transact, key).key_name
        counters = HostTpmCounters(tpm.transact, key, name, os.urandom(32))
        counters.create("c")
        clear = wire.build_command(
            TPM2_CC.Clear, handles=[TPM2_RH.LOCKOUT], sessions=[wire.password_session()]
        )
        execute(tpm.transact, clear)
        key = _primary(tpm, wire.rsa2048_template())  # the EPS survives: same key, same Name
        counters = HostTpmCounters(tpm.transact, key, name, counters.secret)
        with pytest.raises(CounterError, match="does not exist"):
            counters.read("c")


def test_sealed_state_rollback_is_caught_with_tpm_counters(
    mitm: Mitm, keys: dict[str, int], enclave_platform: EnclavePlatform, tmp_path: Path
) -> None:
    """Sealing (enclaves/state.py) unchanged, its counters in the host TPM."""
    config = provision(mitm.tpm.transact, keys["ecc"])
    platform = TpmCountedPlatform(
        enclave_platform, TpmCounters.open(enclave_platform, mitm.transact, config)
    )
    path = tmp_path / "state.sealed"
    owner = os.urandom(8).hex()
    counter = f"{SealKind.INSTANCE_STATE.name.lower()}:{owner}"
    sealed = SealedFile(platform, SealKind.INSTANCE_STATE, owner, path)
    sealed.create(b"v1")
    old = path.read_bytes()
    sealed.commit(b"v2")
    current = path.read_bytes()
    path.write_bytes(old)  # the host puts the older sealed file back
    with pytest.raises(SealError, match="older than the platform counter"):
        SealedFile(platform, SealKind.INSTANCE_STATE, owner, path).load()
    # The same enclave family (same sealing key) finds the same counter again.
    again = TpmCountedPlatform(
        enclave_platform, TpmCounters.open(enclave_platform, mitm.transact, config)
    )
    assert again.counter_read(counter) == platform.counter_read(counter) == sealed.version
    # The host undefines the index (or clears its TPM): the state is refused, not reset.
    path.write_bytes(current)
    index = HostTpmCounters(
        mitm.transact, config.key_handle, config.key_name, counter_secret(enclave_platform)
    ).index(counter)
    execute(mitm.tpm.transact, wire.nv_undefine_space(index))
    with pytest.raises(SealError, match=r"platform counter unavailable.*does not exist"):
        SealedFile(platform, SealKind.INSTANCE_STATE, owner, path).load()


def test_tpm2_pytss_esapi_agrees_with_our_sessions(mitm: Mitm, keys: dict[str, int]) -> None:
    """ESAPI (tpm2-tss), in its own session salted to the same key, reads and increments
    the index we defined: our encrypted authValue and our Names are what the TPM holds."""
    esys = pytest.importorskip("tpm2_pytss")
    counters = _counters(mitm, keys, "rsa")
    counters.create("c")
    value = counters.increment("c")
    ctx = esys.ESAPI(mitm.tpm.tcti)  # swtpm serves one connection at a time: ours wait
    try:
        key = ctx.tr_from_tpmpublic(keys["rsa"])
        aes = esys.TPMT_SYM_DEF(
            algorithm=TPM2_ALG.AES,
            keyBits=esys.TPMU_SYM_KEY_BITS(aes=128),
            mode=esys.TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
        )
        session = ctx.start_auth_session(
            key, esys.ESYS_TR.NONE, esys.TPM2_SE.HMAC, aes, TPM2_ALG.SHA256
        )
        nv = ctx.tr_from_tpmpublic(counters.index("c"))
        ctx.tr_set_auth(nv, counters._auth("c"))
        assert int.from_bytes(bytes(ctx.nv_read(nv, 8, 0, nv, session1=session)), "big") == value
        ctx.nv_increment(nv, nv, session1=session)
        ctx.flush_context(session)
    finally:
        ctx.close()
    assert counters.read("c") == value + 1
