"""Measured libraries staged once by the zygote and checked by each enclave (codeimport)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from tests.helpers.processes import is_open, open_fds

from sgxvtpm.platform.sim import codeimport
from sgxvtpm.platform.sim.measure import CodeFile
from sgxvtpm.util import measured

LIB = CodeFile("libfake.so.0", Path("/nonexistent/libfake.so.0"), b"\x7fELF measured bytes")
OTHER = CodeFile(LIB.name, LIB.path, b"\x7fELF other release!!")  # same size, other bytes


def _memfd(data: bytes, seals: int) -> int:
    fd = os.memfd_create("libfake.so.0", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _inode(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino




def test_the_zygote_stages_each_library_content_once() -> None:
    staged = codeimport.SharedLibraries()
    try:
        first = staged.for_launch([LIB])
        assert staged.for_launch([LIB]) == first
        other = staged.for_launch([OTHER])
        assert other[LIB.name] != first[LIB.name]
        assert staged.for_launch([LIB]) == first
        for fd, f in ((first[LIB.name], LIB), (other[LIB.name], OTHER)):
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & codeimport.SEALS == codeimport.SEALS
            assert os.pread(fd, 1 << 16, 0) == f.data
            assert codeimport.holds_exactly(fd, f.data)
        assert not codeimport.holds_exactly(first[LIB.name], OTHER.data)
    finally:
        staged.close()


def test_staged_copies_are_bounded_but_a_launch_keeps_its_own() -> None:
    staged = codeimport.SharedLibraries(limit=1)
    try:
        a = staged.for_launch([LIB])[LIB.name]
        b = staged.for_launch([OTHER])[OTHER.name]
        assert not is_open(a) and is_open(b)  # least recently used closed
        both = staged.for_launch([OTHER, CodeFile("libtwo.so", LIB.path, b"two")])
        assert both[OTHER.name] == b and all(is_open(fd) for fd in both.values())
    finally:
        staged.close()


@pytest.mark.usefixtures("clean_imports")
def test_an_enclave_uses_an_inherited_copy_of_its_measured_bytes() -> None:
    staged = codeimport.SharedLibraries()
    try:
        fds = staged.for_launch([LIB])
        codeimport.install([LIB], fds)
        assert measured.library_path("libfake", "libfake.so.0") == f"/proc/self/fd/{fds[LIB.name]}"
    finally:
        staged.close()


@pytest.mark.usefixtures("clean_imports")
@pytest.mark.parametrize(
    ("data", "seals"),
    [
        (OTHER.data, codeimport.SEALS),  # other bytes, same size
        (LIB.data + b"\0", codeimport.SEALS),  # other size
        (LIB.data, 0),  # anyone holding it may still write
        (LIB.data, codeimport.SEALS & ~fcntl.F_SEAL_WRITE),
        (LIB.data, codeimport.SEALS & ~fcntl.F_SEAL_SEAL),  # seals could still change
        (LIB.data, codeimport.SEALS & ~fcntl.F_SEAL_GROW),
    ],
)
def test_an_enclave_stages_its_own_copy_unless_the_inherited_one_is_sealed_and_exact(
    data: bytes, seals: int
) -> None:
    fd = _memfd(data, seals)
    rejected = _inode(os.fstat(fd))
    codeimport.install([LIB], {LIB.name: fd})
    path = measured.library_path("libfake", "libfake.so.0")
    assert _inode(os.stat(path)) != rejected
    assert not any(_inode(os.fstat(int(n))) == rejected for n in open_fds())  # not kept
    assert Path(path).read_bytes() == LIB.data
    own = int(path.rsplit("/", 1)[1])
    assert fcntl.fcntl(own, fcntl.F_GET_SEALS) & codeimport.SEALS == codeimport.SEALS


@pytest.mark.usefixtures("clean_imports")
def test_an_inherited_regular_file_is_not_trusted(tmp_path: Path) -> None:
    """Right bytes, but a file on disk can be rewritten after the check."""
    lib = tmp_path / "libfake.so.0"
    lib.write_bytes(LIB.data)
    fd = os.open(lib, os.O_RDONLY)
    assert not codeimport.holds_exactly(fd, LIB.data)
    codeimport.install([LIB], {LIB.name: fd})
    staged = os.stat(measured.library_path("libfake", "libfake.so.0"))
    assert _inode(staged) != _inode(lib.stat())


@pytest.mark.usefixtures("clean_imports")
def test_inherited_copies_of_libraries_not_measured_are_closed() -> None:
    fd = _memfd(LIB.data, codeimport.SEALS)
    codeimport.install([], {LIB.name: fd})
    assert not is_open(fd)
    with pytest.raises(measured.UnmeasuredLibraryError):
        measured.library_path("libfake", "libfake.so.0")
