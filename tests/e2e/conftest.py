"""Fixtures for the QEMU / tpm2-tools end-to-end tests.

``vtpm_ctrl_factory`` yields a function ``make(workdir) -> ctrl socket path``
that starts a QEMU-facing vTPM endpoint. By default it is the local endpoint
over a LocalBackend (NOT protected); the real ``sgxvtpm vm attach`` can be
swapped in by overriding this fixture (e.g. in a conftest next to a test).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers.endpoint import EndpointProcess, start_local, swtpm_available
from helpers.guest import build_initramfs, missing_tools

CtrlFactory = Callable[[Path], Path]


@pytest.fixture(scope="session")
def qemu_ready() -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(f"QEMU guest tests need: {', '.join(missing)}")
    if not swtpm_available():
        pytest.skip("the golden comparison needs Debian's swtpm")


@pytest.fixture(scope="session")
def initrd(qemu_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(tmp_path_factory.mktemp("initramfs"))


@pytest.fixture
def vtpm_ctrl_factory() -> Iterator[CtrlFactory]:
    started: list[EndpointProcess] = []

    def make(workdir: Path) -> Path:
        workdir.mkdir(parents=True, exist_ok=True)
        ep = start_local(workdir / "state", ctrl=workdir / "vtpm.ctrl")
        started.append(ep)
        return Path(ep.address)

    yield make
    for ep in started:
        ep.stop()
