"""What the two kinds of enclave are made of, and the identity a verifier expects.

An enclave's measured code is an allow-list: exactly the modules of this
package that its entry points import, directly or not (:func:`import_closure`
over the source, so no module of the untrusted host, VMM or endpoint can
hide in an enclave unmeasured), the platform's enclave bootstrap
(base.PlatformKind.enclave_bootstrap: the sim zygote, which runs in every
enclave process before its entry), and, for an instance, libtpms' shared
object. The manager and the instance measure the same module set (the sim
zygote pre-imports both entries for every enclave, so each enclave's memory
holds both); entry, configuration and libtpms tell them apart. A verifier
computes the expected MRENCLAVE from the code it has installed, with its
platform kind's measurement: no host-side file decides what is trusted.

Reading the imports of ~90 modules with :mod:`ast` takes about 0.2 s, most of
a ``sgxvtpm vm create``; :class:`_ImportCache` keeps each module's import list
under the SHA-256 of its bytes (and of this file, whose scan made the list) in
the user's cache directory. The cache can only name imports: a list that is
wrong makes the closure measure other files than the loader measures (the
attestation is refused) or leave out a module (which the enclave then cannot
import, platform/sim/codeimport.py); it cannot make unmeasured code run.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes.util
import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.platform.base import EnclaveSpec, MeasurementPolicy, PlatformKind

PACKAGE = "sgxvtpm"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_ROOT = str(PACKAGE_ROOT)
# Code that must never run inside an enclave: a module of these imported by
# enclave code is an error, not something to measure.
UNTRUSTED = (
    "sgxvtpm.host",
    "sgxvtpm.vmm",
    "sgxvtpm.endpoint",
    "sgxvtpm.attest",
    "sgxvtpm.cli",
    "sgxvtpm.testing",
    "sgxvtpm._demo",
)
# Both entry points; every enclave process runs them after the platform's bootstrap.
ENTRY_MODULES = ("sgxvtpm.enclaves.manager", "sgxvtpm.enclaves.instance")

MANAGER_PROD_ID = 1
INSTANCE_PROD_ID = 2
ISV_SVN = 1

MANAGER_ENTRY = "sgxvtpm.enclaves.manager:main"
INSTANCE_ENTRY = "sgxvtpm.enclaves.instance:main"


class EnclaveCodeError(SgxvtpmError, RuntimeError):
    """Enclave code imports something that must stay outside enclaves.

    Move that code out of the enclave's imports: enclaves may import only the
    layers below them (docs/ARCHITECTURE.md, "Layers and seams").
    """


def module_path(name: str) -> Path | None:
    """The source file of module ``name`` of this package, or None if there is none."""
    rel = os.path.join(_ROOT, *name.split(".")[1:])  # strings: called ~850 times a closure
    for candidate in (os.path.join(rel, "__init__.py"), rel + ".py"):
        if os.path.isfile(candidate):
            return Path(candidate)
    return None


def import_closure(roots: Iterable[str]) -> dict[str, Path]:
    """Every module of this package that importing ``roots`` can execute.

    Read from the source (ast): ``import`` and ``from ... import`` anywhere in
    a module, including inside functions, resolved against this package;
    parents of a module are included (importing a.b runs a/__init__.py).
    Imports under ``if TYPE_CHECKING:`` never run and are skipped.
    """
    found: dict[str, Path] = {}
    todo = list(roots)
    cache = _ImportCache.load()
    while todo:
        name = todo.pop()
        if name in found or not (name == PACKAGE or name.startswith(PACKAGE + ".")):
            continue
        if any(name == u or name.startswith(u + ".") for u in UNTRUSTED):
            raise EnclaveCodeError(f"enclave code imports {name}, which is host-side code")
        path = module_path(name)
        if path is None:
            continue  # a name imported from a module, not a module
        found[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += cache.imports_of(name, path)
    cache.save()
    return found


class _ImportCache:
    """Import lists by the SHA-256 of (this scanner, module name, module bytes);
    best effort: a cache that cannot be read or written is an empty one."""

    # Entries kept across runs (an enclave closure is ~90 modules: two
    # versions of the code and a third being scanned); beyond it only this
    # run's are. Every process that builds specs reads the whole file, and
    # hostd keeps the pages it parsed it into (~2.3 MB for a 680 KB file,
    # ~0.4 MB for one version's 65 KB).
    LIMIT = 256

    def __init__(self, path: Path | None, entries: dict[str, list[str]]) -> None:
        self._path = path
        self._scanner = hashlib.sha256(Path(__file__).read_bytes()).digest()
        self._old = entries
        self._used: dict[str, list[str]] = {}
        self._missed = False

    @classmethod
    def load(cls) -> _ImportCache:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        if not os.path.isabs(base):
            return cls(None, {})
        path = Path(base, "sgxvtpm", f"imports-py{sys.version_info[0]}{sys.version_info[1]}.json")
        try:
            entries = json.loads(path.read_bytes())
        except (OSError, ValueError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    def imports_of(self, name: str, path: Path) -> list[str]:
        data = path.read_bytes()
        key = hashlib.sha256(b"\0".join((self._scanner, name.encode(), data))).hexdigest()
        names = self._old.get(key)
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            names = _imports_of(name, path, data)
            self._missed = True
        self._used[key] = names
        return names

    def save(self) -> None:
        over = len(self._old) > self.LIMIT  # (a file from an older, larger limit)
        if not (self._missed or over) or self._path is None:
            return
        entries = {**self._old, **self._used}
        if len(entries) > self.LIMIT:
            entries = self._used
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, self._path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _imports_of(name: str, path: Path, data: bytes) -> list[str]:
    tree = ast.parse(data, str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: list[str] = []
    for node in _executed_statements(tree.body):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


_BODIES = ("body", "orelse", "finalbody", "handlers", "cases")


def _executed_statements(body: Iterable[ast.AST]) -> Iterable[ast.AST]:
    """Every statement in ``body`` and in the bodies nested in it (functions,
    classes, branches, handlers, match cases), but those of ``if TYPE_CHECKING:``.
    An import is a statement, so no expression needs visiting."""
    for node in body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _executed_statements(node.orelse)
            continue
        yield node
        for field in _BODIES:
            inner = getattr(node, field, None)
            if inner:
                yield from _executed_statements(inner)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def enclave_modules(platform: PlatformKind) -> tuple[Path, ...]:
    """The measured Python files of both enclaves on ``platform``, in a stable order."""
    return _closure_files(platform.enclave_bootstrap)


@functools.cache
def _closure_files(bootstrap: tuple[str, ...]) -> tuple[Path, ...]:
    return tuple(sorted(import_closure((*ENTRY_MODULES, *bootstrap)).values()))


@functools.cache
def libtpms_path() -> Path:
    name = ctypes.util.find_library("tpms") or "libtpms.so.0"
    for directory in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                      "/usr/lib", "/usr/local/lib"):
        candidate = Path(directory) / name
        if candidate.exists():
            return candidate.resolve()
    raise FileNotFoundError("libtpms.so.0 not found: install Debian's libtpms0")


def _config(name: str, prod_id: int) -> bytes:
    return json.dumps(
        {"enclave": name, "isv_prod_id": prod_id, "isv_svn": ISV_SVN, "threads": 1},
        sort_keys=True,
    ).encode()


def manager_spec(platform: PlatformKind) -> EnclaveSpec:
    """The manager enclave on ``platform``, unsigned (the platform's signer adds the SIGSTRUCT)."""
    return EnclaveSpec(
        name="manager",
        entry=MANAGER_ENTRY,
        code_files=enclave_modules(platform),
        config=_config("manager", MANAGER_PROD_ID),
        isv_prod_id=MANAGER_PROD_ID,
        isv_svn=ISV_SVN,
    )


def instance_spec(platform: PlatformKind) -> EnclaveSpec:
    """An instance enclave on ``platform``, unsigned."""
    return EnclaveSpec(
        name="instance",
        entry=INSTANCE_ENTRY,
        code_files=(*enclave_modules(platform), libtpms_path()),
        config=_config("instance", INSTANCE_PROD_ID),
        isv_prod_id=INSTANCE_PROD_ID,
        isv_svn=ISV_SVN,
    )


def release(platform: PlatformKind) -> list[EnclaveSpec]:
    """What the platform's vendor key signs (open_platform's ``release``; the sim CPU
    calls it, see platform/sim/cpu.py)."""
    return [manager_spec(platform), instance_spec(platform)]


_POLICIES: dict[tuple[str, str], MeasurementPolicy] = {}


def expected_policy(kind: str, platform: PlatformKind) -> MeasurementPolicy:
    """The default policy: the exact MRENCLAVE the code installed here has on ``platform``.

    Computed once per enclave kind and platform kind (it reads and hashes the code).
    """
    key = (kind, platform.name)
    policy = _POLICIES.get(key)
    if policy is None:
        spec = manager_spec(platform) if kind == "manager" else instance_spec(platform)
        policy = MeasurementPolicy(mrenclaves=frozenset({platform.measure(spec)}))
        _POLICIES[key] = policy
    return policy


def peer_policy(signer_mrsigner: bytes, kind: str) -> MeasurementPolicy:
    """Enclave-to-enclave policy: same signer, the right product, current SVN or later."""
    prod = MANAGER_PROD_ID if kind == "manager" else INSTANCE_PROD_ID
    return MeasurementPolicy(mrsigner=signer_mrsigner, isv_prod_id=prod, min_isv_svn=ISV_SVN)
