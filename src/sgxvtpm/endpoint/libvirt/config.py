"""Where the libvirt executables find hostd, and the binding marker in libvirt's state dir.

libvirtd runs swtpm and swtpm_setup with its own environment, as its
``swtpm_user``. They find hostd's state directory (its socket) and the
operator credentials ``swtpm_setup`` creates VMs with, in this order:

1. ``SGXVTPM_STATE_DIR`` / ``SGXVTPM_CONFIG_DIR`` in the environment
   (libvirtd passes its environment on; set them in its systemd drop-in);
2. the system configuration file, ``/etc/sgxvtpm/sgxvtpm.conf``
   (``SGXVTPM_CONF`` names another), lines of ``key = value``::

       state_dir = /var/lib/sgxvtpm
       credentials = /etc/sgxvtpm/libvirt-operator

3. sgxvtpm's defaults (``~/.local/state/sgxvtpm``, ``~/.config/sgxvtpm``).

``swtpm_setup`` writes :data:`MARKER` into libvirt's TPM state directory next
to the VM's binding: the VM's name and hostd's state directory, so that
``swtpm socket`` (given only ``--tpmstate dir=``) knows which VM to attach.

Standard library only: ``swtpm socket`` reads this before its socket is up.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sgxvtpm.errors import SgxvtpmError

CONF_ENV = "SGXVTPM_CONF"
SYSTEM_CONF = "/etc/sgxvtpm/sgxvtpm.conf"
STATE_ENV = "SGXVTPM_STATE_DIR"  # host/statedir.py: ENV
CREDENTIALS_ENV = "SGXVTPM_CONFIG_DIR"  # vmm/credentials.py: ENV
MARKER = "sgxvtpm.json"
_KEYS = ("state_dir", "credentials")


class ConfigError(SgxvtpmError, ValueError):
    """The configuration file or the marker cannot be used; the message names the file."""


def parse_conf(text: str, where: str) -> dict[str, str]:
    """``key = value`` lines (``#`` comments, blank lines); unknown keys are refused."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in _KEYS or not value:
            raise ConfigError(f"{where}:{number}: expected one of "
                              f"{', '.join(k + ' = VALUE' for k in _KEYS)}, got {raw.strip()!r}")
        values[key] = value
    return values


@dataclass(frozen=True)
class HostdLocation:
    """hostd's state directory and the operator credentials (None: sgxvtpm's defaults)."""

    state_dir: str | None
    credentials: str | None


def locate(environ: dict[str, str] | None = None) -> HostdLocation:
    env = os.environ if environ is None else environ
    conf_path = env.get(CONF_ENV) or SYSTEM_CONF
    conf: dict[str, str] = {}
    try:
        with open(conf_path, encoding="utf-8") as f:
            conf = parse_conf(f.read(), conf_path)
    except FileNotFoundError:
        if CONF_ENV in env:
            raise ConfigError(f"{CONF_ENV}={conf_path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{conf_path}: {exc.strerror}") from None
    return HostdLocation(
        state_dir=env.get(STATE_ENV) or conf.get("state_dir"),
        credentials=env.get(CREDENTIALS_ENV) or conf.get("credentials"),
    )


@dataclass(frozen=True)
class Marker:
    """What ``swtpm_setup`` left in libvirt's TPM state directory."""

    vm: str
    state_dir: str
    #: swtpm_setup made this VM new for an incoming domain (``--overwrite`` on a
    #: directory of no VM of this host): state saved elsewhere cannot load into it.
    incoming_new: bool = False
    #: No VM yet (``vm`` is empty): an incoming domain from another member of this
    #: host's fleet. ``swtpm socket`` makes the incoming VM (setup.make_incoming).
    pending_incoming: bool = False
    #: The VM was made incoming on a fleet member: it takes the state of its
    #: namesake on another member (the newest export, once).
    fleet_incoming: bool = False

    def dumps(self) -> str:
        obj: dict[str, object] = {"vm": self.vm, "state_dir": self.state_dir}
        for flag in ("incoming_new", "pending_incoming", "fleet_incoming"):
            if getattr(self, flag):
                obj[flag] = True
        return json.dumps(obj, indent=2) + "\n"

    @classmethod
    def read(cls, tpm_state: str | Path) -> Marker | None:
        """The marker in ``tpm_state``; None if there is none."""
        path = Path(tpm_state) / MARKER
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in
                                                ("vm", "state_dir")):
            raise ConfigError(f"{path}: not an sgxvtpm binding marker")
        return cls(obj["vm"], obj["state_dir"], obj.get("incoming_new") is True,
                   obj.get("pending_incoming") is True, obj.get("fleet_incoming") is True)
