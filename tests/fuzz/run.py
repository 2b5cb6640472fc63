"""Run one fuzz target under atheris (libFuzzer, coverage-guided).

    python -m tests.fuzz.run TARGET [--runs N] [--work DIR] [--artifacts DIR] [-- libFuzzer args]

The sgxvtpm modules are instrumented for coverage; the kept corpus
(tests/fuzz/corpus/TARGET) is read, and new inputs go to ``--work`` (a temp
directory by default), so the repo's corpus only grows when someone copies
an interesting input into it. A crash, an uncaught exception, a timeout
(``-timeout``, 10 s per input) or RSS above ``-rss_limit_mb`` (1024 MiB) ends
the run with a non-zero status and leaves the input in ``--artifacts``; keep
it in tests/fuzz/regressions/TARGET/ once it is fixed.

libFuzzer ends the process itself and prints ``Done N runs`` and
``stat::number_of_executed_units: N`` (``-print_final_stats=1``), which the
tests and scripts/fuzz.sh read.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import atheris
from tests.fuzz import targets as registry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", choices=registry.NAMES)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--work", type=Path, help="writable corpus dir (default: a temp dir)")
    parser.add_argument("--artifacts", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer -seed (0: random)")
    args, extra = parser.parse_known_args(argv)

    # Instrument our own code only: the coverage that matters is our parsers'.
    with atheris.instrument_imports(include=["sgxvtpm"]):
        import sgxvtpm.channel.evidence
        import sgxvtpm.enclaves.registry
        import sgxvtpm.enclaves.sealing
        import sgxvtpm.enclaves.state
        import sgxvtpm.platform.sim.quote
        import sgxvtpm.tpm.wire
        import sgxvtpm.wire.mssim
        import sgxvtpm.wire.relay
        import sgxvtpm.wire.swtpm_ctrl
        import sgxvtpm.wire.vtpm  # noqa: F401

    # Rejections are logged (sgxvtpm/util/log.py); a line per input would drown libFuzzer's.
    from sgxvtpm.util import log

    log.configure("fuzz", stream=None)
    target = registry.target(args.target)
    # Warm the caches (fixtures, verifier) outside the timed inputs.
    registry.check(args.target, b"")

    def one_input(data: bytes) -> None:
        with contextlib.suppress(target.allowed):
            target.run(data)

    work = args.work or Path(tempfile.mkdtemp(prefix=f"fuzz-{args.target}-"))
    work.mkdir(parents=True, exist_ok=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    seeds = registry.CORPUS / args.target
    regressions = registry.REGRESSIONS / args.target
    libfuzzer = [
        sys.argv[0],
        f"-runs={args.runs}",
        f"-max_len={target.max_len}",
        "-timeout=10",
        "-rss_limit_mb=1024",
        f"-seed={args.seed}",
        f"-artifact_prefix={args.artifacts}/{args.target}-",
        "-print_final_stats=1",
        *extra,
        str(work),
        str(seeds),
    ]
    if regressions.is_dir():
        libfuzzer.append(str(regressions))
    atheris.Setup(libfuzzer, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
