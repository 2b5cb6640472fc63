"""sgxvtpm.testing: run a real hostd from tests, demos and benchmarks.

Shipped with the package, as trio ships ``trio.testing``: code that checks or
measures sgxvtpm from outside (its own tests, ``sgxvtpm demo``, the
benchmark suite, an integrator's tests) starts hostd the way an operator
does, through ``sgxvtpm hostd`` in a child process, and waits for it here
rather than each writing its own loop.

- :class:`HostdProcess`: ``sgxvtpm hostd`` in its own session, its output in
  a log file; ``start`` returns once the manager enclave is ready;
- :func:`wait_ready`: until the hostd on a socket answers and its manager
  has restored every instance;
- :func:`hostd_control`: one of hostd's own CONTROL requests (``ping``,
  ``wait_ready``, ``platform_root``), the only things it answers in the clear;
- :func:`terminate`: SIGTERM, then SIGKILL (of the process group) if it
  does not end in time;
- :mod:`sgxvtpm.testing.channel`: a client and a server session wired
  through an in-memory relay that records and can tamper with every record,
  for code that uses attested sessions, without processes.

Nothing here runs in an enclave (enclaves/specs.py refuses an enclave import
of this package).
"""

from sgxvtpm.testing.control import hostd_control
from sgxvtpm.testing.hostd import READY_TIMEOUT, HostdProcess, terminate, wait_ready

__all__ = ["READY_TIMEOUT", "HostdProcess", "hostd_control", "terminate", "wait_ready"]
