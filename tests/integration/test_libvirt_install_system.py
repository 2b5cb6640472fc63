"""``make install-system`` into a temporary tree, as root: what tss can and cannot reach.

The tree stands for /opt, /var/lib and /etc; the users' files are copies
(``--users-prefix``), so the machine's passwd and group are never changed.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers.libvirt import install_system, system_tree

from sgxvtpm.endpoint.libvirt.system import Layout, gid, ids

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(sys.platform != "linux" or shutil.which("useradd") is None
                       or not Path("/usr/bin/python3").exists(),
                       reason="needs Debian's python3 and shadow's useradd"),
]


@pytest.fixture(scope="module")
def layout() -> Iterator[Layout]:
    if os.geteuid() != 0:
        pytest.skip("install-system runs as root")
    with system_tree("sgxvtpm-install-") as top:
        yield Layout(prefix=top / "opt", state_dir=top / "state", credentials=top / "cred",
                     conf_dir=top / "etc", unit_dir=top / "units", users_prefix=top / "users")


def _as_tss(layout: Layout, *argv: str) -> subprocess.CompletedProcess[str]:
    uid, group = ids(layout, "tss")
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={group}", "--clear-groups",
                           "--", *argv], capture_output=True, text=True, timeout=60,
                          check=False, env={"PATH": "/usr/bin:/bin"})


def test_install_system_twice_and_what_tss_gets(layout: Layout) -> None:
    first = install_system(layout)
    assert first.returncode == 0, first.stderr
    assert "user tss: added to group sgxvtpm" in first.stdout
    again = install_system(layout)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "install-system: nothing to do, the layout is in place"

    # The users: hostd's, and tss in its group; the machine's files untouched.
    assert ids(layout, "sgxvtpm")[1] == gid(layout, "sgxvtpm")
    members = next(line for line in (layout.users_prefix / "etc/group").read_text().splitlines()
                   if line.startswith("sgxvtpm:")).split(":")[3].split(",")
    assert "tss" in members
    assert "\nsgxvtpm:" not in "\n" + Path("/etc/group").read_text()

    # The operator credentials: tss's, nobody else's.
    uid, _ = ids(layout, "tss")
    for path in (layout.credentials, layout.credentials / "operator.key"):
        st = path.stat()
        assert st.st_uid == uid and stat.S_IMODE(st.st_mode) & 0o077 == 0, path
    # The code: root's, readable and runnable by tss, with the system's Python.
    interpreter = (layout.libexec / "swtpm").read_text().splitlines()[0]
    assert interpreter == f"#!{layout.interpreter} -IS"
    assert layout.interpreter.resolve().is_relative_to("/usr")
    for argv in ([str(layout.libexec / "swtpm"), "socket", "--print-capabilities"],
                 [str(layout.libexec / "swtpm_setup"), "--print-capabilities"]):
        done = _as_tss(layout, *argv)
        assert done.returncode == 0, done.stderr
        assert "tpm-2.0" in json.loads(done.stdout)["features"]
    # The heavy part of the CLI too (cryptography, compiled for this Python X.Y).
    done = _as_tss(layout, str(layout.prefix / "bin" / "sgxvtpm"), "--version")
    assert done.returncode == 0 and done.stdout.startswith("sgxvtpm"), done.stderr
    done = _as_tss(layout, str(layout.interpreter), "-I", "-c",
                   "import cryptography.hazmat.primitives.asymmetric.ec, sgxvtpm.cli")
    assert done.returncode == 0, done.stderr
    # Compiled: tss cannot write __pycache__, and libvirt waits one second for swtpm.
    tag = sys.implementation.cache_tag
    for module in ("swtpm", "options"):
        assert (layout.site_packages / "sgxvtpm/endpoint/libvirt/__pycache__" /
                f"{module}.{tag}.pyc").exists(), module
    assert "state_dir = " in layout.conf.read_text()
