"""The directory of executables to put first on libvirtd's PATH (``sgxvtpm libvirt path``).

libvirt looks up ``swtpm``, ``swtpm_setup`` and ``swtpm_ioctl`` on its PATH
(all three must exist). The first two are short scripts that run this
interpreter in isolated mode (``-I``: neither libvirt's cwd nor PYTHONPATH
is imported from) on :mod:`.swtpm` and :mod:`.setup`. ``swtpm`` also runs
without ``site`` (``-S``: no site-packages scan, no ``.pth`` files) and finds
the sgxvtpm package at the path written into it; it runs ``site.main()``
itself once its control socket is up (swtpm.py). ``swtpm_ioctl`` is a
symbolic link to the system's (``swtpm_ioctl -s`` is all libvirt runs, and
the endpoint answers it as swtpm does). The directory is made, or brought up
to date, by every call: by default ``PREFIX/libexec/sgxvtpm-libvirt`` of
this interpreter's prefix (the virtual environment sgxvtpm is installed in).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.util.durable import atomic_write

SCRIPTS = {
    "swtpm": "sgxvtpm.endpoint.libvirt.swtpm",
    "swtpm_setup": "sgxvtpm.endpoint.libvirt.setup",
}
#: Started without site (-S): libvirt waits one second for its control socket.
FAST = ("swtpm",)
IOCTL = "swtpm_ioctl"


class BinDirError(SgxvtpmError, OSError):
    """The directory cannot be made: the message says what is missing."""


def default_dir() -> Path:
    return Path(sys.prefix) / "libexec" / "sgxvtpm-libvirt"


def package_root() -> str:
    """The directory holding the ``sgxvtpm`` package (sys.path entry)."""
    import sgxvtpm

    return str(Path(sgxvtpm.__file__).resolve().parent.parent)


def script(module: str, interpreter: str | None = None, *, fast: bool = False,
           root: str | None = None) -> str:
    """The script running ``module``'s main() with ``interpreter``; ``fast``: without
    site, the sgxvtpm package found in ``root`` (default: where it is now)."""
    if not fast:
        return (f"#!{interpreter or sys.executable} -I\n"
                f"import sys\nfrom {module} import main\nsys.exit(main())\n")
    return (f"#!{interpreter or sys.executable} -IS\n"
            f"import sys\nsys.path.append({root or package_root()!r})\n"
            f"from {module} import main\nsys.exit(main())\n")


def system_ioctl(exclude: Path) -> str | None:
    """The system's swtpm_ioctl, not one in ``exclude``."""
    dirs = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep)
            if d and Path(d).resolve() != exclude.resolve()]
    for candidate in ("/usr/bin", "/usr/local/bin"):
        if candidate not in dirs:
            dirs.append(candidate)
    return shutil.which(IOCTL, path=os.pathsep.join(dirs))


def ensure(directory: Path | None = None, *, interpreter: str | None = None,
           root: str | None = None) -> Path:
    """Make (or update) the directory; its path. ``interpreter`` and ``root`` (the
    directory holding the sgxvtpm package): another installation's (install-system)."""
    directory = (directory or default_dir()).absolute()
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    for name, module in SCRIPTS.items():
        path = directory / name
        text = script(module, interpreter, fast=name in FAST, root=root).encode()
        try:
            same = path.read_bytes() == text and os.access(path, os.X_OK)
        except OSError:
            same = False
        if not same:
            atomic_write(path, text, 0o755)
    ioctl = system_ioctl(directory)
    if ioctl is None:
        raise BinDirError(f"no {IOCTL} on PATH: install Debian's swtpm-tools")
    link = directory / IOCTL
    if not link.is_symlink() or os.readlink(link) != ioctl:
        tmp = directory / f".{IOCTL}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(ioctl)
        tmp.replace(link)
    return directory
