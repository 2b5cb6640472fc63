"""Fuzz targets: every codec and socket-facing parser, one function per target.

Each target takes arbitrary bytes and either returns or raises one of the
exceptions that parser documents for remote misbehaviour (``ALLOWED``).
Anything else (another exception type, a hang, unbounded memory) is a
finding. The same functions run three ways:

- under atheris (coverage-guided, :mod:`tests.fuzz.run`, ``scripts/fuzz.sh``);
- on the kept corpus and regression cases, in-process (tests/fuzz/test_fuzz_targets.py);
- nowhere else: they do no I/O except reading the fixtures below.

The quote and certificate targets verify against a fixed sim platform root
(tests/fuzz/fixtures/root_ca.pem, made with the seeds by
``python -m tests.fuzz.make_seeds``) so that the seeds are valid inputs and
the fuzzer starts from the deep end of the parser.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS = FUZZ_DIR / "corpus"
REGRESSIONS = FUZZ_DIR / "regressions"
FIXTURES = FUZZ_DIR / "fixtures"

#: No parser may keep more than this many bytes buffered from one input: the
#: inputs are at most a few KiB, so growth past it means unbounded buffering.
MAX_BUFFERED = 1 << 20


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]
    max_len: int = 4096


def _chunks(data: bytes) -> list[bytes]:
    """Split ``data`` into pieces whose sizes the first byte chooses (byte-by-byte too)."""
    if not data:
        return []
    step = data[0] % 17 or len(data)
    body = data[1:]
    return [body[i : i + step] for i in range(0, len(body), step)]


# ------------------------------------------------------------------ relay frames


def relay_frames(data: bytes) -> None:
    from sgxvtpm.wire import relay

    decoder = relay.RelayDecoder()
    consumed = bytearray()
    for piece in [*_chunks(data), b""]:
        decoder.receive_data(piece)
        while (frame := decoder.next_frame()) is not None:
            # A frame that decodes must encode to the very same bytes (no
            # ambiguity a relay and an enclave could read differently).
            wire = relay.encode(frame)
            consumed += wire
            if frame.type is relay.FrameType.CONTROL:
                assert isinstance(frame.control_object(), dict)
            elif frame.type in (relay.FrameType.OPEN, relay.FrameType.CLOSE):
                frame.text  # noqa: B018 - must not raise after decode checked it
    assert decoder.at_clean_end
    assert bytes(consumed) == data[1:], "decoded frames do not re-encode to the input"


# ------------------------------------------------------------------ swtpm control / data


def swtpm_ctrl(data: bytes) -> None:
    from sgxvtpm.wire import swtpm_ctrl as ctrl

    if not data:
        return
    selector, rest = data[0], data[1:]
    if selector & 1:  # the server side (what QEMU and tcti-swtpm send us)
        # QEMU's 4-byte locality bodies, tcti-swtpm's 1 byte, or as read (vm attach).
        body = (ctrl.QEMU_LOCALITY_BODY, 1, ctrl.LOCALITY_AS_READ)[(selector >> 1) % 3]
        decoder = ctrl.CtrlRequestDecoder(locality_body=body)
        for piece in [*_chunks(rest), b""]:
            decoder.receive_data(piece)
            while (request := decoder.next_request()) is not None:
                assert isinstance(request, ctrl.CtrlRequest)
            assert decoder.pending <= MAX_BUFFERED
    else:  # the client side (our ctrl-channel tests and tools read responses)
        code = (selector >> 1) % 0x20
        responses = ctrl.CtrlResponseDecoder(code, short_errors=bool(selector & 0x80))
        for piece in [*_chunks(rest), b""]:
            responses.receive_data(piece)
            if responses.next_response() is not None:
                return


def swtpm_data(data: bytes) -> None:
    from sgxvtpm.tpm.constants import HEADER_SIZE
    from sgxvtpm.wire import swtpm_ctrl as ctrl

    framer = ctrl.CommandFramer()
    for piece in [*_chunks(data), b""]:
        framer.receive_data(piece)
        # What the endpoints call: plain commands and the TCG SEND_COMMAND prefix.
        while (frame := framer.next_data_command()) is not None:
            command = frame.command
            assert len(command) >= HEADER_SIZE
            assert int.from_bytes(command[2:6], "big") == len(command)
            assert frame.locality is None or 0 <= frame.locality <= 255
        assert framer.pending <= MAX_BUFFERED


# ------------------------------------------------------------------ mssim


def mssim(data: bytes) -> None:
    from sgxvtpm.wire import mssim as ms

    if not data:
        return
    port = ms.Port.COMMAND if data[0] & 1 else ms.Port.PLATFORM
    if data[0] & 2:
        decoder = ms.MssimRequestDecoder(port)
        for piece in [*_chunks(data[1:]), b""]:
            decoder.receive_data(piece)
            while (request := decoder.next_request()) is not None:
                assert isinstance(request.code, ms.MssimCmd)
                if request.code in ms.END_CODES:
                    return
            assert decoder.pending <= MAX_BUFFERED
    else:
        responses = ms.MssimResponseDecoder(port)
        for piece in [*_chunks(data[1:]), b""]:
            responses.receive_data(piece)
            while responses.next_response() is not None:
                pass


# ------------------------------------------------------------------ vTPM requests (K2)


def vtpm(data: bytes) -> None:
    from sgxvtpm.wire import vtpm as v

    for decode, encode in (
        (v.decode_request, v.encode_request),
        (v.decode_response, v.encode_response),
    ):
        try:
            message = decode(data)
        except v.VtpmProtocolError:
            continue
        # What decodes re-encodes to a message that decodes the same.
        assert decode(encode(message)) == message  # type: ignore[operator, arg-type]


# ------------------------------------------------------------------ TPM command headers


def tpm_header(data: bytes) -> None:
    from sgxvtpm.tpm import wire
    from sgxvtpm.tpm.constants import TPM2_RC

    rc = wire.validate_command(data)
    if rc is None:
        header = wire.parse_header(data)
        assert header.size == len(data)
    else:  # only the framing codes of Part 4, 6.2 (ExecuteCommand)
        assert rc in (TPM2_RC.INSUFFICIENT, TPM2_RC.VALUE, TPM2_RC.BAD_TAG,
                      TPM2_RC.COMMAND_SIZE), hex(rc)
    with contextlib.suppress(wire.TpmProtocolError):
        wire.response_code(data)
    # The response parsers of tpm.wire take TPM answers from K2 (the VM's
    # side reads what the instance returns).
    names = [n for n in dir(wire) if n.startswith("parse_") and n != "parse_header"]
    for parse in (getattr(wire, n) for n in names):
        with contextlib.suppress(wire.TpmProtocolError, wire.TpmResponseError):
            parse(data)


# ------------------------------------------------------------------ sealed blobs


def sealed_blob(data: bytes) -> None:
    from sgxvtpm.enclaves.registry import Registry
    from sgxvtpm.enclaves.sealing import SealError, SealHeader, parse_header
    from sgxvtpm.enclaves.state import Bundle

    try:
        header, offset = parse_header(data)
    except SealError:
        pass
    else:
        assert isinstance(header, SealHeader)
        assert offset + 12 + 16 <= len(data)
        # The header re-encodes to the bytes it was parsed from (it is the AAD).
        assert header.encode() == data[:offset]
    # The plaintext parsers behind the AEAD (reached only with an authentic
    # blob, but they must not fail in another way either).
    for decode in (Bundle.decode, Registry.decode):
        with contextlib.suppress(SealError):
            decode(data)


# ------------------------------------------------------------------ quotes and RA-TLS certificates


@functools.cache
def _root_pem() -> bytes:
    return (FIXTURES / "root_ca.pem").read_bytes()


@functools.cache
def _quote_verifier() -> object:
    from sgxvtpm.platform.sim.quote import SimQuoteVerifier

    return SimQuoteVerifier(_root_pem())


@functools.cache
def _cert_policy() -> object:
    from sgxvtpm.platform.base import MeasurementPolicy

    meta = json.loads((FIXTURES / "identity.json").read_text())
    return MeasurementPolicy(
        mrenclaves=frozenset({bytes.fromhex(meta["mrenclave"])}),
        mrsigner=bytes.fromhex(meta["mrsigner"]),
        isv_prod_id=int(meta["isv_prod_id"]),
    )


def quote(data: bytes) -> None:
    from sgxvtpm.platform.sim.quote import SimQuoteVerifier

    verifier = _quote_verifier()
    assert isinstance(verifier, SimQuoteVerifier)
    verified = verifier.verify(data)
    assert len(verified.report_data) == 64


def ra_tls_cert(data: bytes) -> None:
    from sgxvtpm.channel.evidence import verify_enclave_certificate
    from sgxvtpm.platform.base import MeasurementPolicy
    from sgxvtpm.platform.sim.quote import SimQuoteVerifier

    policy, verifier = _cert_policy(), _quote_verifier()
    assert isinstance(policy, MeasurementPolicy)
    assert isinstance(verifier, SimQuoteVerifier)
    verify_enclave_certificate(data, policy, verifier, expected_cn="fuzz-enclave")


# ------------------------------------------------------------------ the table


def _allowed(name: str) -> tuple[type[BaseException], ...]:
    from sgxvtpm.channel import ChannelError
    from sgxvtpm.enclaves.sealing import SealError
    from sgxvtpm.platform.base import AttestationError
    from sgxvtpm.tpm.wire import TpmProtocolError, TpmResponseError
    from sgxvtpm.wire.mssim import MssimProtocolError
    from sgxvtpm.wire.relay import RelayProtocolError
    from sgxvtpm.wire.swtpm_ctrl import CtrlProtocolError
    from sgxvtpm.wire.vtpm import VtpmProtocolError

    return {
        "relay": (RelayProtocolError,),
        "swtpm_ctrl": (CtrlProtocolError,),
        "swtpm_data": (CtrlProtocolError,),
        "mssim": (MssimProtocolError,),
        "vtpm": (VtpmProtocolError,),
        "tpm_header": (TpmProtocolError, TpmResponseError),
        "sealed_blob": (SealError,),
        "quote": (AttestationError,),
        "ra_tls_cert": (ChannelError,),
    }[name]


_FUNCTIONS: dict[str, tuple[Callable[[bytes], None], int]] = {
    "relay": (relay_frames, 4096),
    "swtpm_ctrl": (swtpm_ctrl, 4096),
    "swtpm_data": (swtpm_data, 8192),
    "mssim": (mssim, 4096),
    "vtpm": (vtpm, 4096),
    "tpm_header": (tpm_header, 4096),
    "sealed_blob": (sealed_blob, 4096),
    "quote": (quote, 8192),
    "ra_tls_cert": (ra_tls_cert, 12288),
}

NAMES: tuple[str, ...] = tuple(_FUNCTIONS)


def target(name: str) -> Target:
    run, max_len = _FUNCTIONS[name]
    return Target(name, run, _allowed(name), max_len)


def check(name: str, data: bytes) -> None:
    """Run one input through a target; only a finding escapes."""
    t = target(name)
    with contextlib.suppress(t.allowed):
        t.run(data)
