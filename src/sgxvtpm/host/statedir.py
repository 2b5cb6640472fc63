"""The layout of a state directory (``--state-dir``, env SGXVTPM_STATE_DIR).

Everything hostd keeps, and nothing more::

    hostd.sock            the relay socket (VMM and VM endpoints connect here)
    hostd.lock            one hostd per directory
    platform/             the sim platform (root secret 0600, attestation root); root's
                          alone when hostd runs with --user
    manager/              the manager enclave's sealed registry
    instances/ID/         one instance enclave's sealed state

hostd is the untrusted relay: no private key of the operator or of a VM is
kept here. Those belong to the clients (sgxvtpm/vmm/credentials.py).
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from sgxvtpm.errors import SgxvtpmError

ENV = "SGXVTPM_STATE_DIR"

#: The longest path a unix socket can bind: sun_path's 108 bytes less the NUL (unix(7)).
MAX_SOCKET_PATH = 107


class StateDirError(SgxvtpmError):
    """The state directory cannot be used; the message names the path and the fix."""


def user_dir(env: str, xdg: str, home_default: str) -> Path:
    """``$env``, else sgxvtpm under ``$xdg``, else under ``~/home_default``."""
    chosen = os.environ.get(env)
    if chosen:
        return Path(chosen)
    base = os.environ.get(xdg) or str(Path.home() / home_default)
    return Path(base) / "sgxvtpm"


def default_state_dir() -> Path:
    return user_dir(ENV, "XDG_STATE_HOME", ".local/state")


class Entry:
    """A read-only attribute that is ``name`` under the instance's ``root``
    (``socket = Entry("hostd.sock")`` in a class with a ``root: Path``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Path:
        return obj.root / self.name  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Directory(abc.ABC):
    """A directory at ``root`` whose files are :class:`Entry` attributes;
    ``at(None)`` is the subclass's ``default()`` one."""

    root: Path

    @staticmethod
    @abc.abstractmethod
    def default() -> Path:
        """Where this kind of directory lives when none is given."""

    @classmethod
    def at(cls, path: Path | str | None) -> Self:
        return cls(Path(path) if path is not None else cls.default())


@dataclass(frozen=True)
class StateDir(Directory):
    default = staticmethod(default_state_dir)

    socket = Entry("hostd.sock")

    lock = Entry("hostd.lock")

    platform = Entry("platform")

    #: hostd's public copy of its platform's DCAP collateral (0644): clients of
    #: other users (libvirt's swtpm as tss) cannot read platform/ (root, 0700).
    collateral = Entry("collateral.json")

    #: Where a platform keeps its collateral, in platform/: the sim's own, a
    #: Gramine host's from the operator's PCCS (platform/gramine/launcher.py).
    PLATFORM_COLLATERAL = ("collateral.json", "dcap-collateral.json")

    manager = Entry("manager")

    def instance(self, instance_id: str) -> Path:
        return self.root / "instances" / instance_id

    def check(self) -> None:
        """StateDirError unless hostd can make and use this directory (nothing is made)."""
        for path in (self.root, *self.root.parents):
            if path.exists() or path.is_symlink():
                if not path.is_dir():
                    what = "is not" if path == self.root else f"is under {path}, which is not"
                    raise StateDirError(
                        f"the state directory {self.root} {what} a directory: give "
                        "--state-dir a directory (it is made if missing), or move the file away"
                    )
                break
        length = len(os.fsencode(self.socket))
        if length > MAX_SOCKET_PATH:
            raise StateDirError(
                f"hostd's socket path {self.socket} is {length} bytes, more than the "
                f"{MAX_SOCKET_PATH} AF_UNIX allows: give a shorter --state-dir"
            )

    def ensure(self) -> None:
        self.check()
        for directory in (self.root, self.manager, self.root / "instances"):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def legacy_client_keys(self) -> list[Path]:
        """Client private keys that older versions kept here (operator.key, vms/NAME/vm.key)."""
        found = [self.root / "operator.key"] if (self.root / "operator.key").exists() else []
        found += sorted((self.root / "vms").glob("*/vm.key"))
        return found
