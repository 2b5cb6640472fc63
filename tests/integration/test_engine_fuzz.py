"""Bad input never crashes or hangs the engine.

One engine in a child process takes random bytes and mutated valid commands;
every answer must be a well-formed TPM response. The framing answers must be
exactly what wire.validate_command predicts.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers.tpm import EngineProcess, started_engine

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPMA_NV

pytestmark = pytest.mark.integration

_EXAMPLES = 5000 if os.environ.get("SGXVTPM_STRESS") else 500
_FUZZ = settings(
    max_examples=_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

VALID_COMMANDS = [
    wire.get_random(16),
    wire.read_clock(),
    wire.get_capability(6, 0x100, 8),
    wire.pcr_extend(16, b"\x01" * 32),
    wire.pcr_read([0, 16]),
    wire.nv_define_space(0x01500200, 16, TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD),
    wire.nv_write(0x01500200, b"fuzz"),
    wire.nv_read(0x01500200, 4),
    wire.nv_read_public(0x01500200),
    wire.create_primary(wire.ecc_p256_template()),
    wire.create_primary(wire.ecc_p256_template(signing=True)),
    wire.read_public(0x80000000),
    wire.flush_context(0x80000000),
    wire.sign(0x80000000, b"\x02" * 32),
    wire.shutdown(1),
]


@pytest.fixture(scope="module")
def tpm() -> Iterator[EngineProcess]:
    ep = started_engine()
    ep.timeout = 20.0  # a hang fails the test instead of blocking the suite
    yield ep
    # still alive and correct after everything it was fed
    assert len(wire.parse_get_random(ep.process(wire.get_random(8)))) == 8
    assert ep.close() == 0


def assert_well_formed(command: bytes, response: bytes) -> None:
    assert len(response) >= 10, response.hex()
    tag, size, code = struct.unpack_from(">HII", response)
    assert size == len(response)
    assert tag in (0x8001, 0x8002)
    if code != 0:
        assert len(response) == 10 and tag == 0x8001
    expected = wire.validate_command(command)
    if expected is not None:
        assert response == wire.error_response(expected), command.hex()


@_FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(tpm: EngineProcess, data: bytes) -> None:
    assert_well_formed(data, tpm.process(data))


@st.composite
def mutated_command(draw: st.DrawFn) -> bytes:
    cmd = bytearray(draw(st.sampled_from(VALID_COMMANDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert"]))
        pos = draw(st.integers(0, max(0, len(cmd) - 1)))
        if kind == "flip" and cmd:
            cmd[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and cmd:
            cmd[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del cmd[pos:]
        elif kind == "extend":
            cmd += draw(st.binary(min_size=1, max_size=64))
        else:
            cmd[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    # mostly keep the size field honest so the bytes reach the parameter unmarshalers
    if len(cmd) >= 6 and draw(st.integers(0, 3)):
        cmd[2:6] = struct.pack(">I", len(cmd))
    return bytes(cmd)


@_FUZZ
@given(mutated_command())
def test_mutated_valid_commands(tpm: EngineProcess, cmd: bytes) -> None:
    assert_well_formed(cmd, tpm.process(cmd))


def test_every_tag_matches_validate_command(tpm: EngineProcess) -> None:
    body = struct.pack(">IIH", 12, 0x17B, 8)  # size, GetRandom, 8 bytes
    commands = [struct.pack(">H", tag) + body for tag in range(0x10000)]
    for cmd, response in zip(commands, tpm.call("process_many", commands), strict=True):
        assert_well_formed(cmd, response)


def test_size_and_length_grid_matches_validate_command(tpm: EngineProcess) -> None:
    base = wire.get_random(8)
    commands = []
    for length in [*range(0, 14), 4095, 4096, 4097, 6000]:
        for size in (0, 9, 10, length - 1, length, length + 1, 0xFFFFFFFF):
            raw = bytearray((base + bytes(max(0, length - len(base))))[:length])
            if length >= 6:
                raw[2:6] = struct.pack(">I", size % 2**32)
            commands.append(bytes(raw))
    responses = tpm.call("process_many", commands)
    for cmd, response in zip(commands, responses, strict=True):
        assert_well_formed(cmd, response)
