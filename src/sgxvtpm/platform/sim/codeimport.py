"""Run the code that was measured: import measured modules from measured bytes.

The loader reads each code file once and sends those bytes; the CPU measures
them and the enclave process gets the same bytes. There, this finder is
placed first on ``sys.meta_path`` so that importing a measured module
executes exactly the measured source, whatever is on disk by then, and a
module of a measured package that is *not* measured cannot be imported at
all (it would run unmeasured code under a genuine MRENCLAVE). Measured files
that are not Python modules are shared objects: each becomes a sealed
in-memory file that :mod:`sgxvtpm.util.measured` hands to whoever loads the
library, so the bytes the dynamic linker maps are the measured ones.

The zygote stages each measured library once per distinct content
(:class:`SharedLibraries`) and its enclaves inherit that sealed file, so that
every instance maps the same pages of libtpms instead of a private copy each.
An enclave uses an inherited file only after checking it itself
(:func:`holds_exactly`: sealed against any change, and its bytes hash to the
measured bytes' digest); otherwise it stages its own private copy.

Modules the zygote pre-imported are already in ``sys.modules``; the zygote
records the SHA-256 of each such module's source file right after importing
it and refuses a launch whose measured bytes differ, or that does not
measure a pre-imported module of its own packages (the CPU then restarts
the zygote), so a pre-imported module is also a measured one.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import mmap
import os
import sys
import types
from collections.abc import Mapping, Sequence

from sgxvtpm.platform.base import PlatformError
from sgxvtpm.platform.sim.measure import CodeFile
from sgxvtpm.util import measured


class MeasuredCodeFinder(importlib.abc.MetaPathFinder):
    def __init__(self, code: Sequence[CodeFile]) -> None:
        # Modules already imported (the zygote's, checked by stale_preloads)
        # are never loaded again: keep only the sources still to be imported.
        self._files = {
            f.module_name: f for f in code if f.module_name and f.module_name not in sys.modules
        }
        self._packages = measured_packages(code)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        f = self._files.get(fullname)
        if f is None:
            if fullname.partition(".")[0] in self._packages:
                raise ImportError(f"{fullname} is not part of this enclave's measured code")
            return None
        spec = importlib.util.spec_from_loader(
            fullname, _MeasuredLoader(f), origin=str(f.path), is_package=f.is_package
        )
        if spec is not None:
            spec.has_location = True
            if f.is_package:
                # Submodules are found by this finder (first on sys.meta_path)
                # or refused by it; the path is only for introspection.
                spec.submodule_search_locations = [str(f.path.parent)]
        return spec


def measured_packages(code: Sequence[CodeFile]) -> set[str]:
    """Top-level packages that the measured code defines (e.g. {"sgxvtpm"})."""
    return {f.name.split("/")[0] for f in code if f.is_package and "/" in f.name}


class _MeasuredLoader(importlib.abc.Loader):
    def __init__(self, f: CodeFile) -> None:
        self._file = f

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__file__ = str(self._file.path)
        code = compile(self._file.data, str(self._file.path), "exec", dont_inherit=True)
        exec(code, module.__dict__)


def source_digests() -> dict[str, bytes]:
    """SHA-256 of the source file of every imported pure-Python module."""
    digests = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path.endswith(".py"):
            try:
                with open(path, "rb") as fh:
                    digests[name] = hashlib.sha256(fh.read()).digest()
            except OSError:
                continue
    return digests


def stale_preloads(code: Sequence[CodeFile], preloaded: Mapping[str, bytes]) -> list[str]:
    """Pre-imported modules that would run unmeasured in an enclave of ``code``.

    A measured module imported in the zygote from different bytes, or a
    module of a measured package that the zygote imported and ``code`` does
    not measure at all.
    """
    stale = []
    names = set()
    for f in code:
        name = f.module_name
        if name is None:
            continue
        names.add(name)
        digest = hashlib.sha256(f.data).digest()
        if name in sys.modules and preloaded.get(name) != digest:
            stale.append(name)
    packages = measured_packages(code)
    for name in list(sys.modules):
        if name.partition(".")[0] in packages and name not in names:
            stale.append(name)
    return sorted(stale)


SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
STAGED_LIMIT = 8


def install(code: Sequence[CodeFile], staged: Mapping[str, int] | None = None) -> None:
    """Run only measured code from now on: modules from their bytes, libraries from memfds.

    ``staged`` maps a measured library's name to an inherited sealed memfd
    (the zygote's, :class:`SharedLibraries`); it is used only if
    :func:`holds_exactly` the measured bytes, else closed and replaced by a
    private copy.
    """
    libraries = {}
    inherited = dict(staged or {})
    for f in code:
        if f.module_name is None:
            fd = inherited.pop(f.name, None)
            if fd is not None and holds_exactly(fd, f.data):
                libraries[f.name] = f"/proc/self/fd/{fd}"
                continue
            if fd is not None:
                os.close(fd)
            libraries[f.name] = f"/proc/self/fd/{_sealed_memfd(f)}"
    for fd in inherited.values():
        os.close(fd)
    measured.enter_enclave(libraries)
    sys.meta_path.insert(0, MeasuredCodeFinder(code))


def holds_exactly(fd: int, data: bytes) -> bool:
    """Whether ``fd`` is sealed for good and holds exactly ``data``.

    F_SEAL_SEAL with F_SEAL_WRITE, SHRINK and GROW means nobody, including
    whoever created the file and every process that holds it, can change
    its bytes any more; then one hash of what it holds now settles what it
    will hold. The check does not rely on the zygote being honest (it is in
    every enclave's trusted base anyway, since it forks them): it costs one
    SHA-256 of the library per launch (about a millisecond for libtpms) and
    keeps the property local to the enclave.
    """
    try:
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS != SEALS:
            return False
        size = os.fstat(fd).st_size
        if size != len(data):
            return False
        if size == 0:
            return True
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as view:
            held = hashlib.sha256(view).digest()
    except (OSError, ValueError):
        return False
    return held == hashlib.sha256(data).digest()


class SharedLibraries:
    """The zygote's sealed copies of measured libraries, one per distinct content.

    Keyed by the library's measured name and the SHA-256 of its bytes: the
    first launch that measures a library stages it (the zygote learns the
    bytes from the launch, which carries what the CPU measured), later
    launches with the same bytes get the same file, and a launch with other
    bytes under the same name gets a copy of its own. Enclaves inherit the
    file across fork and check it (:func:`install`); the zygote never maps
    it. At most ``limit`` copies are kept, the least recently used is closed
    first (enclaves that inherited it keep theirs).
    """

    def __init__(self, limit: int = STAGED_LIMIT) -> None:
        self._limit = limit
        self._fds: dict[tuple[str, bytes], int] = {}

    def for_launch(self, code: Sequence[CodeFile]) -> dict[str, int]:
        """Measured library name -> staged fd, for the libraries of ``code``.

        A library that cannot be staged is left out (the enclave then
        stages a private copy, or reports why it cannot).
        """
        chosen: dict[str, int] = {}
        used = set()
        for f in code:
            if f.module_name is not None:
                continue
            key = (f.name, hashlib.sha256(f.data).digest())
            fd = self._fds.pop(key, None)
            if fd is None:
                try:
                    fd = _sealed_memfd(f)
                except PlatformError:
                    continue
            self._fds[key] = fd  # most recently used last
            used.add(key)
            chosen[f.name] = fd
        for key in [k for k in self._fds if k not in used][: max(0, len(self._fds) - self._limit)]:
            os.close(self._fds.pop(key))
        return chosen

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _sealed_memfd(f: CodeFile) -> int:
    """The measured bytes as an in-memory file nobody can change; its fd."""
    fd = os.memfd_create(f.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(f.data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError as exc:
        os.close(fd)
        raise PlatformError(f"cannot stage measured file {f.name}: {exc}") from exc
    return fd
