"""The zygote's throwaway session (sgxvtpm.channel.warmup) over the real sim platform."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgxvtpm.channel import ChannelError, context, warmup
from sgxvtpm.platform.sim import SimPlatformDir


def test_exercise_completes_and_keeps_no_context(tmp_path: Path) -> None:
    pd = SimPlatformDir.open_or_create(tmp_path / "platform")
    warmup.exercise(pd.enclave_platform, pd.verifier())
    assert not context._cache  # nothing of the throwaway identity reaches a child


def test_exercise_fails_loudly_when_the_quote_does_not_verify(tmp_path: Path) -> None:
    pd = SimPlatformDir.open_or_create(tmp_path / "platform")
    other = SimPlatformDir.open_or_create(tmp_path / "other")
    with pytest.raises(ChannelError):
        warmup.exercise(pd.enclave_platform, other.verifier())
