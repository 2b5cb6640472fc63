"""Executables libvirt runs in place of swtpm and swtpm_setup, backed by sgxvtpm.

``sgxvtpm libvirt path`` prints the directory holding ``swtpm``,
``swtpm_setup`` (scripts running :mod:`.swtpm` and :mod:`.setup`) and
``swtpm_ioctl`` (the system's): put it first on libvirtd's PATH. Nothing is
imported here: ``swtpm socket`` must bind its control socket within
libvirt's one second, before any heavy import (swtpm.py).
"""
