"""Golden comparison: LibtpmsEngine against Debian's swtpm (same libtpms 0.9.2).

Both start from a freshly manufactured TPM after TPM2_Startup(CLEAR). The
same PCR_Extend sequence must give byte-identical PCR_Read responses, and
malformed commands must get the same response codes.

Real differences (transport, not TPM): swtpm frames a byte stream, the
engine takes whole messages. (1) A command shorter than the 10-byte header:
swtpm waits for the rest of the header (and closes without answer on EOF);
the engine answers TPM_RC_INSUFFICIENT at once. (2) A command larger than
the 4096-byte buffer: swtpm answers TPM_RC_COMMAND_SIZE for the first 4096
bytes, then parses the remaining bytes as a further command and answers that
too; the engine answers once.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

import pytest
from tests.helpers.sockets import recv_exact, recv_tpm_response
from tests.helpers.swtpm import Swtpm, swtpm_available
from tests.helpers.tpm import EngineProcess, started_engine

from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_ALG, TPM2_RC

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not swtpm_available(), reason="swtpm is not installed"),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EngineProcess, Swtpm]]:
    # One pair for the module: only the first test changes TPM state (PCRs).
    swtpm = Swtpm(tmp_path_factory.mktemp("swtpm"))
    engine = started_engine()
    try:
        yield engine, swtpm
    finally:
        engine.close()
        swtpm.close()


def test_pcr_extend_sequence_gives_identical_pcr_read(
    pair: tuple[EngineProcess, Swtpm],
) -> None:
    engine, swtpm = pair
    pcrs = [0, 7, 10, 16, 23]
    reads = [
        wire.pcr_read(pcrs),
        wire.pcr_read(pcrs, TPM2_ALG.SHA1),
        wire.pcr_read([16]),
    ]
    for round_ in range(3):
        for pcr in pcrs:
            event = hashlib.sha256(f"event {round_} {pcr}".encode()).digest()
            command = wire.pcr_extend(pcr, event)
            assert engine.process(command) == swtpm.transact(command)
            sha1 = wire.pcr_extend(pcr, hashlib.sha1(event).digest(), TPM2_ALG.SHA1)
            assert engine.process(sha1) == swtpm.transact(sha1)
        for read in reads:
            ours, theirs = engine.process(read), swtpm.transact(read)
            assert ours == theirs
            assert wire.response_code(ours) == TPM2_RC.SUCCESS
    # and the value is the SHA-256 chain we compute
    expected = bytes(32)
    for round_ in range(3):
        event = hashlib.sha256(f"event {round_} 16".encode()).digest()
        expected = hashlib.sha256(expected + event).digest()
    digests = wire.parse_pcr_read(engine.process(wire.pcr_read([16]))).digests
    assert digests == [expected]


def _get_random_with(tag: int = 0x8001, size_delta: int = 0, code: int = 0x17B) -> bytes:
    body = struct.pack(">H", 8)
    return struct.pack(">HII", tag, 12 + size_delta, code) + body


MALFORMED = {
    "unknown tag": _get_random_with(tag=0x1234),
    "TPM 1.2 tag": _get_random_with(tag=0x00C1),
    "non-command tag": _get_random_with(tag=0x8000),
    "size field too small": _get_random_with(size_delta=-1),
    "size field too large": _get_random_with(size_delta=1),
    "unknown command code": _get_random_with(code=0x999),
    "reserved bits in code": _get_random_with(code=0x2000017B),
    "sessions tag, no auth area": _get_random_with(tag=0x8002),
    "trailing parameter bytes": struct.pack(">HII", 0x8001, 13, 0x17B) + b"\x00\x08\x00",
    "truncated parameter": struct.pack(">HII", 0x8001, 11, 0x17B) + b"\x00",
    "unknown hash algorithm": wire.pcr_extend(16, bytes(32))[:-34] + b"\x00\xff" + bytes(32),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_commands_same_response(pair: tuple[EngineProcess, Swtpm], name: str) -> None:
    engine, swtpm = pair
    command = MALFORMED[name]
    ours = engine.process(command)
    assert ours == swtpm.transact(command)
    assert wire.response_code(ours) != TPM2_RC.SUCCESS


def test_oversize_command(pair: tuple[EngineProcess, Swtpm]) -> None:
    engine, swtpm = pair
    command = struct.pack(">HII", 0x8001, 5000, 0x17B) + bytes(4990)
    ours = engine.process(command)
    assert ours == wire.error_response(TPM2_RC.COMMAND_SIZE)
    with swtpm.connect(timeout=2) as stream:
        stream.sendall(command)
        assert recv_tpm_response(stream) == ours
        # swtpm's stream framing: the 904 bytes past its 4096-byte buffer are read
        # as another command (tag 0x0000 -> TPM_RC_VALUE). The engine answers once.
        assert recv_tpm_response(stream) == wire.error_response(TPM2_RC.VALUE)


def test_short_header(pair: tuple[EngineProcess, Swtpm]) -> None:
    engine, swtpm = pair
    short = bytes.fromhex("80010000")
    assert engine.process(short) == wire.error_response(TPM2_RC.INSUFFICIENT)
    with swtpm.connect(timeout=0.3) as stream:
        stream.sendall(short)
        with pytest.raises(TimeoutError):  # swtpm waits for 10 bytes
            recv_exact(stream, 1)
    assert wire.response_code(swtpm.transact(wire.get_random(8))) == TPM2_RC.SUCCESS


def test_fixed_properties_identical(pair: tuple[EngineProcess, Swtpm]) -> None:
    engine, swtpm = pair
    command = wire.get_capability(6, 0x100, 0x80)  # TPM_PROPERTIES, all of PT_FIXED
    assert engine.process(command) == swtpm.transact(command)
