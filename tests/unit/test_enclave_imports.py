"""Code that runs in an enclave imports no host-side code.

hostd, the VMM and the VM endpoints are outside the trust boundary: an enclave
module that imported them would run host code inside the enclave. The
multiplexer the enclaves use lives in sgxvtpm.mux, hostd's switch in
sgxvtpm.host.switch. Checked on the source (every import statement, also
those inside functions), so it holds whatever a test happens to import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sgxvtpm

PACKAGE = Path(sgxvtpm.__file__).parent
ENCLAVE_SIDE = ("enclaves", "mux")
HOST_SIDE = ("sgxvtpm.host", "sgxvtpm.vmm", "sgxvtpm.endpoint")


def imported(path: Path) -> set[str]:
    package = ".".join(("sgxvtpm", *path.relative_to(PACKAGE).parent.parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize(
    "path",
    sorted(p for part in ENCLAVE_SIDE for p in (PACKAGE / part).rglob("*.py")),
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_enclave_code_imports_no_host_code(path: Path) -> None:
    host = sorted(n for n in imported(path) if n.startswith(HOST_SIDE))
    assert not host, f"{path.relative_to(PACKAGE)} imports {host}"
