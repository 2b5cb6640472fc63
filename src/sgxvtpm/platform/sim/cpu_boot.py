"""The sim CPU process starts here: it forks the zygote first, then becomes the CPU.

    python -I -m sgxvtpm.platform.sim.cpu_boot CPU-ARGS   (loader.py's command)

Before this process imports or reads anything of the platform, it is what a
new zygote is after its first imports (:mod:`.zygote`'s DEFAULT_PRELOAD:
cryptography, ssl, ctypes and this package, which the enclaves measure), and
it forks the zygote from that state. So the zygote holds nothing the CPU has
by then: no platform secret, no module the enclaves do not measure
(codeimport.stale_preloads still finds none). And the CPU, the zygote and,
through it, every enclave share those libraries' pages instead of the CPU
holding a copy of its own (~8 MB per host, benchmarks/ANALYSIS.md). Then it
runs the CPU (:func:`.cpu.main`), which adopts the zygote. A zygote the CPU
starts later (the first one died, or its pre-imports went stale) is a new
interpreter (``Cpu.start_zygote``): the CPU holds the platform's secrets by
then.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback

from sgxvtpm.platform.sim import zygote
from sgxvtpm.platform.sim.spawn import ForkedChild, set_process_name


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--preload", default="")
    p.add_argument("--gramine-sim", action="store_true")
    opts, _ = p.parse_known_args(argv)
    early = None if opts.gramine_sim else fork_zygote(opts.preload, opts.control_fd)
    from sgxvtpm.platform.sim import cpu  # only now: nothing of it is in the zygote

    return cpu.main(argv, zygote=early)


def fork_zygote(preload: str, cpu_control_fd: int) -> tuple[ForkedChild, socket.socket]:
    """The zygote, forked from this process as it is now; its control socket's other end."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the zygote's side (tests see it run enclaves)
        status = 1
        try:
            parent.close()
            os.close(cpu_control_fd)  # hostd's socket is the CPU's alone
            set_process_name("sgxvtpm-zygote")  # ps: its command line is the CPU's
            status = zygote.main(["--control-fd", str(child.detach()), "--preload", preload])
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    child.close()
    return ForkedChild(pid), parent


if __name__ == "__main__":
    sys.exit(main())
