"""Run the code that was measured: import measured modules from measured bytes.

The loader reads each code file once, measures those bytes and sends the same
bytes to the enclave process. There, this finder is placed first on
``sys.meta_path`` so that importing a measured module executes exactly the
measured source, whatever is on disk by then. Measured files that are not
Python modules (a shared object, data) are checked on disk against their
measured bytes before the entry point runs.

Modules the zygote pre-imported are already in ``sys.modules``; the zygote
records the SHA-256 of each such module's source file right after importing
it and refuses a launch whose measured bytes differ (the loader then restarts
the zygote), so a pre-imported module is also the measured one.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Mapping, Sequence

from sgxvtpm.platform.base import PlatformError
from sgxvtpm.platform.sim.measure import CodeFile


class MeasuredCodeFinder(importlib.abc.MetaPathFinder):
    def __init__(self, code: Sequence[CodeFile]) -> None:
        # Modules already imported (the zygote's, checked by stale_preloads)
        # are never loaded again: keep only the sources still to be imported.
        self._files = {
            f.module_name: f for f in code if f.module_name and f.module_name not in sys.modules
        }

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        f = self._files.get(fullname)
        if f is None:
            return None
        spec = importlib.util.spec_from_loader(
            fullname, _MeasuredLoader(f), origin=str(f.path), is_package=f.is_package
        )
        if spec is not None:
            spec.has_location = True
            if f.is_package:
                # Unmeasured submodules of a measured package still load from disk.
                spec.submodule_search_locations = [str(f.path.parent)]
        return spec


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
    """Measured modules already imported in the zygote from different bytes."""
    stale = []
    for f in code:
        name = f.module_name
        digest = hashlib.sha256(f.data).digest()
        if name and name in sys.modules and preloaded.get(name) != digest:
            stale.append(name)
    return stale


def check_data_files(code: Sequence[CodeFile]) -> None:
    """Non-Python measured files must still hold their measured bytes on disk."""
    for f in code:
        if f.module_name is None:
            try:
                on_disk = f.path.read_bytes()
            except OSError as exc:
                raise PlatformError(f"measured file {f.path} is gone: {exc}") from exc
            if on_disk != f.data:
                raise PlatformError(f"measured file {f.path} changed after measurement")


def install(code: Sequence[CodeFile]) -> None:
    sys.meta_path.insert(0, MeasuredCodeFinder(code))
