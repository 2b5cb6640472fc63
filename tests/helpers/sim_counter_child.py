"""Counter crash-test child: increment a counter and print each acknowledged value.

Usage: python -m tests.helpers.sim_counter_child PLATFORM_DIR COUNT
Prints one line per increment, only after counter_increment returned (so
after the value is durable). The parent kills it with SIGKILL at random.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sgxvtpm.platform import EnclaveIdentity
from sgxvtpm.platform.sim import SimPlatformDir

IDENTITY = EnclaveIdentity(mrenclave=b"\x01" * 32, mrsigner=b"\x02" * 32, isv_prod_id=1, isv_svn=1)
COUNTER = "crash-test"


def main() -> None:
    platform = SimPlatformDir.open_or_create(Path(sys.argv[1])).enclave_platform(IDENTITY)
    platform.counter_create(COUNTER)
    out = sys.stdout
    for _ in range(int(sys.argv[2])):
        out.write(f"{platform.counter_increment(COUNTER)}\n")
        out.flush()


if __name__ == "__main__":
    main()
