#!/usr/bin/env bash
# Install what sgxvtpm needs: Debian packages (apt-get, with sudo when not root)
# and a .venv holding the package and its test extras. Idempotent and quick when
# everything is already present.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(
    libtpms0 swtpm swtpm-tools          # the TPM engine, and swtpm as the peer we compare with
    tpm2-tools libtss2-dev pkg-config    # TSS clients; headers to build tpm2-pytss
    qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio   # a real guest for e2e
    python3-venv gcc python3-dev
    strace                               # tests/e2e/test_fleet_migration_strace.py
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients   # a real libvirtd for e2e
)

missing=()
for p in "${DEBS[@]}"; do
    [[ $p == \#* ]] && continue
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
        missing+=("$p")
    fi
done
# python3-venv/python3-dev only matter when the python3 on PATH is Debian's.
if [[ "$(command -v python3)" != /usr/bin/python3 ]]; then
    filtered=()
    for p in "${missing[@]}"; do
        [[ $p == python3-venv || $p == python3-dev ]] || filtered+=("$p")
    done
    missing=("${filtered[@]}")
fi
if ((${#missing[@]})); then
    echo "install: Debian packages: ${missing[*]}"
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp=.venv/.installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
