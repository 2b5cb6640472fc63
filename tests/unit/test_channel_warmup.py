"""The zygote's throwaway session (sgxvtpm.channel.warmup) over the real sim platform."""

from __future__ import annotations

import pytest

from sgxvtpm.channel import ChannelError, context, warmup
from sgxvtpm.platform.sim import SimPlatformDir


def test_exercise_completes_and_keeps_no_context(sim_platform: SimPlatformDir) -> None:
    warmup.exercise(sim_platform.enclave_platform, sim_platform.verifier())
    assert not context._cache  # nothing of the throwaway identity reaches a child


def test_exercise_fails_loudly_when_the_quote_does_not_verify(
    sim_platform: SimPlatformDir, other_sim_platform: SimPlatformDir
) -> None:
    with pytest.raises(ChannelError):
        warmup.exercise(sim_platform.enclave_platform, other_sim_platform.verifier())
