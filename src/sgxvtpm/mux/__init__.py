"""The trusted end of relay connections: attested sessions multiplexed on one stream.

hostd's switch (:mod:`sgxvtpm.host.switch`) only moves relay frames
(:mod:`sgxvtpm.wire.relay`) between connections; the code here runs where
the sessions' keys are, in the enclaves and in the VMM: :mod:`.aio` is the
asyncio multiplexer, :mod:`.limits` the bounds both ends keep so that no
client can make another wait or grow memory without bound.
"""
