"""The per-command latency client: the same code for every target.

A target is anything with ``transact(command) -> response`` (complete raw
TPM 2.0 commands and responses, Part 1 section 18). The client brings the
TPM up (TPM2_Startup if nobody has), creates what the timed commands need
(an NV index, two signing primaries), then times each command with
``time.perf_counter_ns`` around ``transact`` alone, after a warm-up, the
commands interleaved round by round.

TPM_RC_RETRY and kin (Part 1, 19.8.6) mean "send it again": a sample that
got one is not recorded and the command is repeated, as a TSS would do.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from benchmarks.stats import Summary, summarize_ns
from sgxvtpm.tpm import wire
from sgxvtpm.tpm.constants import TPM2_RC, TPM2_SU, TPMA_NV
from sgxvtpm.tpm.nv import execute


class Transport(Protocol):
    def transact(self, command: bytes) -> bytes:
        """Send one complete TPM command; return the complete response."""
        ...

    def close(self) -> None: ...


#: An owner NV index in the range TCG leaves to the owner (TCG Registry of
#: reserved handles: 0x01000000-0x013FFFFF is TPM-vendor, 0x01500000+ is owner).
NV_INDEX = 0x01500042
NV_SIZE = 64
NV_ATTRIBUTES = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.NO_DA
#: PCR 16 is the debug PCR (PC Client PFP, 3.3.4): extending it disturbs nobody.
PCR = 16
_RETRY_CODES = frozenset({TPM2_RC.RETRY, TPM2_RC.YIELDED, TPM2_RC.TESTING})

CHEAP = ("GetRandom(32)", "PCR_Extend", "PCR_Read", "NV_Write(64)", "NV_Read(64)")
HEAVY = ("Sign ECDSA P-256", "Sign RSA-2048", "CreatePrimary ECC P-256")
COMMANDS = CHEAP + HEAVY


@dataclass(frozen=True)
class Iterations:
    cheap: int
    heavy: int
    warmup_cheap: int
    warmup_heavy: int

    @classmethod
    def scaled(cls, cheap: int) -> Iterations:
        """Heavy commands get a tenth of the cheap count (they cost ~100x more)."""
        heavy = max(5, cheap // 10)
        return cls(cheap, heavy, max(2, cheap // 10), max(1, heavy // 10))


class BenchError(Exception):
    """A target answered a benchmark command with an error: the figures would be wrong."""


def startup(transport: Transport) -> None:
    """TPM2_Startup(CLEAR) unless the TPM is already started (TPM_RC_INITIALIZE)."""
    rc = wire.response_code(transport.transact(wire.startup(TPM2_SU.CLEAR)))
    if rc not in (TPM2_RC.SUCCESS, TPM2_RC.INITIALIZE):
        raise BenchError(f"TPM2_Startup failed: {rc:#x}")


class Fixture:
    """The objects the timed commands use, created once per target."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        run = transport.transact
        # A previous run on the same TPM may have left the index behind;
        # TPM_RC_HANDLE (it does not exist) is the usual answer.
        run(wire.nv_undefine_space(NV_INDEX))
        execute(run, wire.nv_define_space(NV_INDEX, NV_SIZE, NV_ATTRIBUTES))
        execute(run, wire.nv_write(NV_INDEX, bytes(NV_SIZE)))
        self.ecc_key = self._primary(wire.ecc_p256_template(signing=True))
        self.rsa_key = self._primary(wire.rsa2048_template(signing=True))

    def _primary(self, template: bytes) -> int:
        response = execute(self.transport.transact, wire.create_primary(template))
        return wire.parse_create_primary(response).handle

    def close(self) -> None:
        run = self.transport.transact
        for handle in (self.ecc_key, self.rsa_key):
            run(wire.flush_context(handle))
        run(wire.nv_undefine_space(NV_INDEX))


def _timed(transact: Callable[[bytes], bytes], command: bytes) -> tuple[int, bytes]:
    """(elapsed ns, response) of one successful command, retrying RETRY untimed."""
    for _ in range(16):
        t0 = time.perf_counter_ns()
        response = transact(command)
        elapsed = time.perf_counter_ns() - t0
        rc = int.from_bytes(response[6:10], "big")
        if rc == TPM2_RC.SUCCESS:
            return elapsed, response
        if rc not in _RETRY_CODES:
            code = int.from_bytes(command[6:10], "big")
            raise BenchError(f"command {code:#x} failed with {rc:#x}")
    raise BenchError("the TPM kept answering TPM_RC_RETRY")


def _rounds(steps: dict[str, Callable[[], int]], warmup: int, n: int) -> dict[str, Summary]:
    """Run every step once per round, ``warmup + n`` rounds; summarise the last ``n``.

    Interleaving the commands gives each the same conditions (scheduler
    placement of client and server, cache, CPU frequency) instead of letting
    whichever runs first or last pay for a change in them.
    """
    samples: dict[str, list[int]] = {name: [] for name in steps}
    for i in range(warmup + n):
        for name, step in steps.items():
            elapsed = step()
            if i >= warmup:
                samples[name].append(elapsed)
    return {name: summarize_ns(values) for name, values in samples.items()}


def _command_step(transact: Callable[[bytes], bytes], *commands: bytes) -> Callable[[], int]:
    """Time one command per call, taking turns when several are given."""
    turn = itertools.cycle(commands)
    return lambda: _timed(transact, next(turn))[0]


def _create_primary_step(transact: Callable[[bytes], bytes]) -> Callable[[], int]:
    """CreatePrimary ECC P-256 (storage), timed; the FlushContext after it is not."""
    command = wire.create_primary(wire.ecc_p256_template())

    def step() -> int:
        elapsed, response = _timed(transact, command)
        handle = wire.parse_create_primary(response).handle
        wire.check_success(transact(wire.flush_context(handle)))
        return elapsed

    return step


def measure(transport: Transport, iterations: Iterations) -> dict[str, Summary]:
    """Median and p99 of every command in :data:`COMMANDS` on ``transport``."""
    startup(transport)
    fixture = Fixture(transport)
    run = transport.transact
    digest = hashlib.sha256(b"sgxvtpm benchmark").digest()
    cheap = {
        "GetRandom(32)": wire.get_random(32),
        "PCR_Extend": wire.pcr_extend(PCR, digest),
        "PCR_Read": wire.pcr_read([PCR]),
        "NV_Read(64)": wire.nv_read(NV_INDEX, NV_SIZE),
    }
    heavy = {
        "Sign ECDSA P-256": wire.sign(fixture.ecc_key, digest),
        "Sign RSA-2048": wire.sign(fixture.rsa_key, digest),
    }
    cheap_steps = {name: _command_step(run, command) for name, command in cheap.items()}
    # The TPM writes NV only when the data differ (reference code, _plat__NvIsDifferent):
    # alternate two payloads so that every NV_Write is a real, persisted change.
    cheap_steps["NV_Write(64)"] = _command_step(
        run, wire.nv_write(NV_INDEX, b"\xa5" * NV_SIZE), wire.nv_write(NV_INDEX, b"\x5a" * NV_SIZE)
    )
    cheap_steps = {name: cheap_steps[name] for name in CHEAP}
    heavy_steps = {name: _command_step(run, command) for name, command in heavy.items()}
    heavy_steps["CreatePrimary ECC P-256"] = _create_primary_step(run)
    try:
        results = _rounds(cheap_steps, iterations.warmup_cheap, iterations.cheap)
        results.update(_rounds(heavy_steps, iterations.warmup_heavy, iterations.heavy))
    finally:
        fixture.close()
    return results
