"""Shared objects inside an enclave come from its measured bytes, never from a path.

A library loaded by soname is whatever the dynamic linker finds first
(LD_LIBRARY_PATH, a planted file in a search directory), not the bytes the
platform measured into MRENCLAVE. The enclave bootstrap hands each measured
shared object over as an in-memory file (a sealed memfd) and registers it
here; code that loads a library asks for it by name. Outside an enclave
(tests, benchmarks, the host) there is nothing registered and the soname is
used as usual; inside one, an unmeasured library is refused.
"""

from __future__ import annotations

from sgxvtpm.errors import SgxvtpmError

_libraries: dict[str, str] = {}
_in_enclave = False


class UnmeasuredLibraryError(SgxvtpmError, RuntimeError):
    """An enclave asked for a shared object its measurement does not contain.

    Load it only where it is measured (an instance enclave's libtpms, see
    enclaves/specs.py), or add it to that enclave's measured code.
    """


def enter_enclave(libraries: dict[str, str]) -> None:
    """Called once by the enclave bootstrap: measured file name -> loadable path."""
    global _in_enclave
    _libraries.clear()
    _libraries.update(libraries)
    _in_enclave = True


def library_path(prefix: str, soname: str) -> str:
    """Where to load the library whose measured name starts with ``prefix``."""
    for name, path in _libraries.items():
        if name.startswith(prefix):
            return path
    if _in_enclave:
        raise UnmeasuredLibraryError(f"{soname} is not part of this enclave's measured code")
    return soname
