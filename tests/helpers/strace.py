"""Every byte a process tree hands the kernel to write, as ``strace -f`` sees it
(SECURITY.md property 18: no host process writes a VM's TPM secrets in the clear).

:func:`launcher` is a command prefix (``HostdProcess(launcher=...)``): strace
follows every fork and clone of the command from its first instruction, writes
one trace file per thread (``DIR/trace.TID``) and, for each write-like system
call, a full hex dump of the bytes the kernel took (``-e write=all``), whatever
the descriptor: a file (kept or deleted later), a pipe, a unix or TCP socket, a
terminal. :func:`written` reads the dumps back as one byte stream per thread
and descriptor, so bytes split over several calls are found too.

What a system-call trace cannot see, and so this does not check: stores to a
shared memory mapping (``mmap`` of a file or memfd, shared memory), and
io_uring. :data:`UNDUMPED` are the calls that move bytes strace does not dump;
:func:`written` reports each use, and a test can refuse them.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

#: The calls whose buffers ``-e write=all`` dumps (strace 6.1, ``dumpio``).
DUMPED = ("write", "pwrite64", "writev", "pwritev", "pwritev2", "sendto", "sendmsg",
          "sendmmsg", "vmsplice")  # fmt: skip
#: Calls that write bytes without a dump: another process's memory, or
#: descriptor-to-descriptor copies (their source may be a memory mapping).
UNDUMPED = ("process_vm_writev", "sendfile", "splice", "tee", "copy_file_range")

_CALL = re.compile(r"^(\w+)\((\d+)")
# " | 00010  65 78 65 63 ...  exec/pyenv: line |": offset, 16 bytes in hex, text.
_DUMP = re.compile(r"^ \| [0-9a-f]{5,}  (.{49})")


def launcher(out: Path) -> list[str]:
    """``strace`` recording into directory ``out`` (made if missing) what its command
    and every descendant write, from the first system call to the last."""
    out.mkdir(parents=True, exist_ok=True)
    return [
        "strace", "-f", "-ff", "-qq", "-o", str(out / "trace"),
        # Only the listed calls stop the tracee (a seccomp filter): much faster.
        "--seccomp-bpf", "-e", f"trace={','.join(('execve', *DUMPED, *UNDUMPED))}",
        "-e", "write=all", "-e", "signal=none",
    ]  # fmt: skip


@dataclass
class Trace:
    """What :func:`written` read: one byte stream per (thread, descriptor), the
    calls of :data:`UNDUMPED` seen (thread, call line), each thread's programs."""

    streams: dict[tuple[int, int], bytearray] = field(default_factory=dict)
    undumped: list[tuple[int, str]] = field(default_factory=list)
    programs: dict[int, list[str]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)

    @property
    def threads(self) -> set[int]:
        return set(self.programs)

    def find(self, needles: dict[str, bytes]) -> list[str]:
        """Each (needle, thread, descriptor, offset) where a needle occurs."""
        return [
            f"{what} in thread {tid} fd {fd} at byte {data.find(needle)}"
            f" ({' / '.join(self.programs.get(tid, [])) or 'forked, no exec'})"
            for (tid, fd), data in sorted(self.streams.items())
            for what, needle in needles.items()
            if needle in data
        ]


def written(out: Path) -> Trace:
    """Read back the trace files :func:`launcher` made in ``out``."""
    trace = Trace()
    for path in sorted(out.glob("trace.*")):
        tid = int(path.suffix[1:])
        trace.programs[tid] = []
        stream: bytearray | None = None
        for line in path.read_text(errors="replace").splitlines():
            if (dump := _DUMP.match(line)) is not None:
                if stream is not None:
                    stream += bytes.fromhex(dump.group(1).replace(" ", ""))
                continue
            if line.startswith(" * "):  # "* N bytes in buffer K" of an iovec
                continue
            stream = None
            call = _CALL.match(line)
            name = call.group(1) if call else line.split("(", 1)[0]
            trace.calls[name] += 1
            if name == "execve":
                trace.programs[tid].append(line[:200])
            elif name in UNDUMPED:
                trace.undumped.append((tid, line[:200]))
            elif call is not None and name in DUMPED:
                stream = trace.streams.setdefault((tid, int(call.group(2))), bytearray())
    return trace


def process_tree(pid: int) -> set[int]:
    """``pid`` and its descendants, every thread of each (from /proc, now)."""
    seen: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = [int(t.name) for t in Path(f"/proc/{p}/task").iterdir()]
        except FileNotFoundError:
            continue
        seen.update(tids)
        for tid in tids:
            with contextlib.suppress(FileNotFoundError):
                children = Path(f"/proc/{p}/task/{tid}/children").read_text()
                todo += [int(c) for c in children.split()]
    return seen
