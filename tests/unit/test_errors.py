"""One exception root (sgxvtpm.errors): every exception class of the package derives from it."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import sgxvtpm
from sgxvtpm import errors
from sgxvtpm.errors import LocalProtocolError, RemoteProtocolError, SgxvtpmError, UsageError


def exception_classes() -> list[type[BaseException]]:
    """Every exception class defined at the top level of a module of the package."""
    found = []
    for info in pkgutil.walk_packages(sgxvtpm.__path__, "sgxvtpm."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
            ):
                found.append(obj)
    return found


CLASSES = exception_classes()


def name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_the_walk_finds_the_package_exceptions() -> None:
    names = {name(c) for c in CLASSES}
    assert {"sgxvtpm.wire.vtpm.VtpmProtocolError", "sgxvtpm.channel.errors.ChannelError",
            "sgxvtpm.host.hostd.HostdError", "sgxvtpm.wire.k1.K1ProtocolError"} <= names
    assert len(names) >= 40


def test_every_exception_class_derives_from_sgxvtpm_error() -> None:
    assert [name(c) for c in CLASSES if not issubclass(c, SgxvtpmError)] == []


def test_every_exception_class_says_what_it_means() -> None:
    assert [name(c) for c in CLASSES if not (c.__doc__ or "").strip()] == []


@pytest.mark.parametrize("cls", [c for c in CLASSES if c.__module__ != errors.__name__], ids=name)
def test_protocol_errors_are_remote_and_usage_errors_local_or_usage(cls: type) -> None:
    """As h11: what a peer sent (RemoteProtocolError) is never confused with what
    this program got wrong (LocalProtocolError for a message, UsageError for an API)."""
    if cls.__name__.endswith("ProtocolError"):
        assert issubclass(cls, RemoteProtocolError)
    if cls.__name__.endswith(("UsageError", "MisuseError")):
        assert issubclass(cls, LocalProtocolError | UsageError)
    assert not (issubclass(cls, RemoteProtocolError) and issubclass(cls, LocalProtocolError))


# Builtin bases these classes had before the common root; callers catch them as such
# (e.g. ``except ValueError`` around TPM parsing in the manager and instance enclaves).
KEPT_BASES = {
    "sgxvtpm.tpm.wire.TpmProtocolError": ValueError,
    "sgxvtpm.wire.vtpm.VtpmProtocolError": ValueError,
    "sgxvtpm.wire.vtpm.VtpmUsageError": ValueError,
    "sgxvtpm.wire.swtpm_ctrl.CtrlProtocolError": ValueError,
    "sgxvtpm.wire.swtpm_ctrl.CtrlUsageError": ValueError,
    "sgxvtpm.wire.mssim.MssimProtocolError": ValueError,
    "sgxvtpm.wire.mssim.MssimUsageError": ValueError,
    "sgxvtpm.wire.relay.RelayUsageError": ValueError,
    "sgxvtpm._demo.guest.EventLogError": ValueError,
    "sgxvtpm.tpm.engine.EngineMisuseError": RuntimeError,
    "sgxvtpm.enclaves.specs.EnclaveCodeError": RuntimeError,
    "sgxvtpm.util.measured.UnmeasuredLibraryError": RuntimeError,
}


@pytest.mark.parametrize(("qualified", "base"), sorted(KEPT_BASES.items()))
def test_builtin_bases_callers_catch_are_kept(qualified: str, base: type) -> None:
    module, _, attr = qualified.rpartition(".")
    cls = getattr(importlib.import_module(module), attr)
    assert issubclass(cls, SgxvtpmError) and issubclass(cls, base)


def test_the_root_imports_nothing_of_sgxvtpm() -> None:
    """Any layer, the lowest included, may import it."""
    tree = ast.parse(Path(errors.__file__).read_text())
    imported = [
        n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    ] + [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert [m for m in imported if m.startswith("sgxvtpm")] == []
