"""The root of every exception sgxvtpm raises, and its three broad kinds.

Catch :class:`SgxvtpmError` to catch anything of ours (and nothing of
Python's or of a library's). Below it, as h11 splits them:

- :class:`RemoteProtocolError`: the peer (a client, hostd, an enclave, the
  TPM) sent bytes that are not a valid message of the protocol. Nothing is
  wrong with this program; drop the message or the connection, as the
  subclass's docstring says, and do not trust that peer's next message.
- :class:`LocalProtocolError`: this program tried to build or send a message
  the protocol does not allow (a field out of range, a message too large).
  Nothing was sent; it is a bug in the caller.
- :class:`UsageError`: this program called an API wrongly, not about a
  message (a session used after close, an engine call in the wrong state).
  Nothing was done; it is a bug in the caller.

Everything else (a refused request, a failed seal check, an unreachable
hostd) derives from :class:`SgxvtpmError` directly; its docstring says what
the user can do. Some classes also keep a builtin base (``ValueError``,
``RuntimeError``) that callers catch; each says so.

This module imports nothing of sgxvtpm, so every layer may import it.
"""

from __future__ import annotations


class SgxvtpmError(Exception):
    """Something sgxvtpm refused or could not do; the message says what and why.

    Catch a subclass where you can act on it; this root only where any
    failure of sgxvtpm is handled the same way (a CLI printing one line).
    """


class ProtocolError(SgxvtpmError):
    """A message broke one of sgxvtpm's wire protocols; see the two subclasses."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that is not a valid message of the protocol.

    Drop the message (answer it with the protocol's refusal if it has one) or
    the connection; the peer is broken or hostile, and retrying the same
    exchange will not help.
    """


class LocalProtocolError(ProtocolError):
    """This program tried to build or send a message the protocol does not allow.

    Nothing was sent. Fix the caller: the message says which field is wrong.
    """


class UsageError(SgxvtpmError):
    """This program used an sgxvtpm API wrongly (wrong state, wrong order).

    Nothing was done. Fix the caller: the message says what was expected.
    """
