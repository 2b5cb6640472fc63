"""Measurement (MRENCLAVE, MRSIGNER) and running exactly the measured code."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import pytest

from sgxvtpm.platform import EnclaveSpec, PlatformError
from sgxvtpm.platform.sim import codeimport, identity_of_spec, measure_mrenclave, mrsigner_of
from sgxvtpm.platform.sim.measure import read_code, relative_name
from sgxvtpm.util import measured


def _tree(root: Path, body: bytes = b"X = 1\n") -> list[Path]:
    pkg = root / "encpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_bytes(b"")
    (pkg / "mod.py").write_bytes(body)
    (root / "libfake.so").write_bytes(b"\x7fELF fake")
    return [pkg / "__init__.py", pkg / "mod.py", root / "libfake.so"]


def _spec(files: list[Path], **kw: object) -> EnclaveSpec:
    fields: dict[str, object] = {
        "name": "e",
        "entry": "encpkg.mod:main",
        "code_files": files,
        "config": b"cfg",
        "isv_prod_id": 1,
        "isv_svn": 1,
    }
    fields.update(kw)
    return EnclaveSpec(**fields)  # type: ignore[arg-type]


def test_relative_names(tmp_path: Path) -> None:
    files = _tree(tmp_path)
    assert [relative_name(f) for f in files] == [
        "encpkg/__init__.py",
        "encpkg/mod.py",
        "libfake.so",
    ]
    assert [f.module_name for f in read_code(files)] == ["encpkg", "encpkg.mod", None]


def test_measurement_is_independent_of_install_location(tmp_path: Path) -> None:
    one, two = _tree(tmp_path / "a"), _tree(tmp_path / "b" / "deeper")
    assert measure_mrenclave(_spec(one)) == measure_mrenclave(_spec(two))
    assert len(measure_mrenclave(_spec(one))) == 32


@pytest.mark.parametrize(
    "change",
    [
        {"config": b"cfg2"},
        {"entry": "encpkg.mod:other"},
    ],
)
def test_measured_fields(tmp_path: Path, change: dict[str, object]) -> None:
    files = _tree(tmp_path)
    assert measure_mrenclave(_spec(files)) != measure_mrenclave(_spec(files, **change))


def test_code_byte_and_order_are_measured(tmp_path: Path) -> None:
    one = _tree(tmp_path / "a", b"X = 1\n")
    two = _tree(tmp_path / "b", b"X = 2\n")
    assert measure_mrenclave(_spec(one)) != measure_mrenclave(_spec(two))
    assert measure_mrenclave(_spec(one)) != measure_mrenclave(_spec(one[::-1]))


def test_identity_from_spec(tmp_path: Path) -> None:
    ident = identity_of_spec(_spec(_tree(tmp_path), isv_prod_id=7, isv_svn=9), b"signer-spki")
    assert ident.mrsigner == hashlib.sha256(b"signer-spki").digest() == mrsigner_of(b"signer-spki")
    assert (ident.isv_prod_id, ident.isv_svn) == (7, 9)
    with pytest.raises(PlatformError):
        identity_of_spec(_spec(_tree(tmp_path / "x"), isv_svn=70000), b"k")
    with pytest.raises(PlatformError):
        identity_of_spec(_spec([tmp_path / "missing.py"]), b"k")


@pytest.mark.usefixtures("clean_imports")
def test_measured_bytes_are_what_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _tree(tmp_path, b"X = 'measured'\n")
    code = read_code(files)
    (tmp_path / "encpkg" / "mod.py").write_bytes(b"X = 'swapped on disk'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    codeimport.install(code)
    assert importlib.import_module("encpkg.mod").X == "measured"
    # A measured shared object is loaded from a sealed copy of its measured bytes.
    (tmp_path / "libfake.so").write_bytes(b"other")
    staged = measured.library_path("libfake", "libfake.so")
    assert staged.startswith("/proc/self/fd/")
    assert Path(staged).read_bytes() == b"\x7fELF fake"
    with pytest.raises(OSError), open(staged, "r+b") as f:
        f.write(b"x")
    with pytest.raises(measured.UnmeasuredLibraryError):
        measured.library_path("libtpms", "libtpms.so.0")


@pytest.mark.usefixtures("clean_imports")
def test_unmeasured_module_of_a_measured_package_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _tree(tmp_path)
    (tmp_path / "encpkg" / "extra.py").write_bytes(b"X = 'never measured'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    codeimport.install(read_code(files))
    with pytest.raises(ImportError, match="not part of this enclave's measured code"):
        importlib.import_module("encpkg.extra")


def test_an_oversized_or_malformed_platform_message_is_refused() -> None:
    """What a compromised enclave could announce to the sim CPU is bounded (ENCLU_MAX)."""
    import socket
    import struct

    from sgxvtpm.platform.sim.zygote_proto import ENCLU_MAX, ZygoteGone, recv_message

    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">II", 16, 0xFFFFFFF0))
        with pytest.raises(ZygoteGone, match="exceeds"):
            recv_message(b, ENCLU_MAX)
        a.sendall(struct.pack(">II", 3, 0) + b"[1]")
        with pytest.raises(ZygoteGone, match="malformed"):
            recv_message(b, ENCLU_MAX)
