"""The benchmark suite: sgxvtpm side by side with swtpm and in-process libtpms.

Entry point: :func:`benchmarks.run.main` (``make bench``, ``sgxvtpm bench``).
"""
