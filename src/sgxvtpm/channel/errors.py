"""The two exceptions of the channel layer.

Following pyca/cryptography, every authentication or integrity failure raises
the same opaque :class:`ChannelError`: a peer (or an attacker on the relay)
learns nothing about which check failed. The detailed reason is logged
locally, as a ``channel.failure`` event (sgxvtpm/util/log.py).
"""

from __future__ import annotations

from sgxvtpm.errors import SgxvtpmError, UsageError
from sgxvtpm.util import log

GENERIC_MESSAGE = "attested channel failed (authentication or integrity)"


class ChannelError(SgxvtpmError):
    """The attested channel failed: the peer could not be authenticated, or a
    record was tampered with, replayed, dropped or truncated.

    The session that raised it is dead; open a new one. The local log
    (its ``channel.failure`` event) says which check failed.
    """

    def __init__(self, message: str = GENERIC_MESSAGE) -> None:
        super().__init__(message)


class ChannelUsageError(UsageError):
    """The local program used a session wrongly (sent after close, message
    too large, ...). Fix the caller; nothing was sent to the peer."""


def fail(reason: str, *args: object) -> ChannelError:
    """Log ``reason % args`` locally (never sent anywhere) and return the opaque error."""
    log.log("channel.failure", reason=reason % args if args else reason)
    return ChannelError()
