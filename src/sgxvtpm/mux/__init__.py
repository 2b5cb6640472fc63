"""The trusted end of relay connections: attested sessions multiplexed on one stream.

hostd's switch (:mod:`sgxvtpm.host.switch`) only moves relay frames
(:mod:`sgxvtpm.wire.relay`) between connections; the code here runs where
the sessions' keys are, in the enclaves and in the VMM. :mod:`.connection`
is the relay protocol as one sans-IO state machine (sessions, CONTROL,
HANDOFF, admission and bounds); :mod:`.aio` is its asyncio driver (the
instance enclave's epoll loop and the blocking K2 client drive it too);
:mod:`.limits` holds the bounds, so that no client can make another wait or
grow memory without bound.
"""
