"""Measurement (MRENCLAVE, MRSIGNER) and running exactly the measured code."""

from __future__ import annotations

import hashlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sgxvtpm.platform import EnclaveSpec, PlatformError
from sgxvtpm.platform.sim import codeimport, identity_of_spec, measure_mrenclave, mrsigner_of
from sgxvtpm.platform.sim.measure import read_code, relative_name


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
        "signer_public_key": b"signer-spki",
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
    ident = identity_of_spec(_spec(_tree(tmp_path), isv_prod_id=7, isv_svn=9))
    assert ident.mrsigner == hashlib.sha256(b"signer-spki").digest() == mrsigner_of(b"signer-spki")
    assert (ident.isv_prod_id, ident.isv_svn) == (7, 9)
    with pytest.raises(PlatformError):
        identity_of_spec(_spec(_tree(tmp_path / "x"), isv_svn=70000))
    with pytest.raises(PlatformError):
        identity_of_spec(_spec([tmp_path / "missing.py"]))


@pytest.fixture
def clean_imports() -> Iterator[None]:
    meta = list(sys.meta_path)
    yield
    sys.meta_path[:] = meta
    for name in [n for n in sys.modules if n == "encpkg" or n.startswith("encpkg.")]:
        del sys.modules[name]


@pytest.mark.usefixtures("clean_imports")
def test_measured_bytes_are_what_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _tree(tmp_path, b"X = 'measured'\n")
    code = read_code(files)
    (tmp_path / "encpkg" / "mod.py").write_bytes(b"X = 'swapped on disk'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    codeimport.install(code)
    assert importlib.import_module("encpkg.mod").X == "measured"
    with pytest.raises(PlatformError, match="changed after measurement"):
        (tmp_path / "libfake.so").write_bytes(b"other")
        codeimport.check_data_files(code)
