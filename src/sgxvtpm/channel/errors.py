"""The two exceptions of the channel layer.

Following pyca/cryptography, every authentication or integrity failure raises
the same opaque :class:`ChannelError`: a peer (or an attacker on the relay)
learns nothing about which check failed. The detailed reason is logged
locally on the ``sgxvtpm.channel`` logger.
"""

from __future__ import annotations

import logging

from sgxvtpm.errors import SgxvtpmError, UsageError

log = logging.getLogger("sgxvtpm.channel")

GENERIC_MESSAGE = "attested channel failed (authentication or integrity)"


class ChannelError(SgxvtpmError):
    """The attested channel failed: the peer could not be authenticated, or a
    record was tampered with, replayed, dropped or truncated.

    The session that raised it is dead; open a new one. The local log
    (``sgxvtpm.channel``) says which check failed.
    """

    def __init__(self, message: str = GENERIC_MESSAGE) -> None:
        super().__init__(message)


class ChannelUsageError(UsageError):
    """The local program used a session wrongly (sent after close, message
    too large, ...). Fix the caller; nothing was sent to the peer."""


def fail(reason: str, *args: object) -> ChannelError:
    """Log ``reason`` locally (never sent anywhere) and return the opaque error."""
    log.warning("channel failure: " + reason, *args)
    return ChannelError()
