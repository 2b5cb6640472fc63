"""What ``make install-system`` writes (endpoint/libvirt/system.py), without installing."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from sgxvtpm.endpoint.libvirt.config import parse_conf
from sgxvtpm.endpoint.libvirt.system import (
    GC_UNIT,
    HOSTD_UNIT,
    InstallError,
    Layout,
    _requirement_names,
    ensure_conf,
    ids,
    runtime_distributions,
    units,
)


def test_hostd_unit_runs_the_installed_hostd_as_sgxvtpm_with_the_libvirt_operator() -> None:
    layout = Layout()
    text = units(layout)[HOSTD_UNIT]
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split("=", 1)[1].split() == [
        "/opt/sgxvtpm/bin/sgxvtpm", "hostd", "--state-dir", "/var/lib/sgxvtpm",
        "--user", "sgxvtpm:sgxvtpm", "--operator-cert", "/var/lib/sgxvtpm-libvirt/operator.crt",
    ]  # fmt: skip
    assert "Before=libvirtd.service virtqemud.service" in text


def test_libvirt_drop_ins_put_the_executables_first_on_path_and_gc_runs_as_tss() -> None:
    files = units(Layout(prefix=Path("/p")))
    for unit in ("libvirtd.service", "virtqemud.service"):
        text = files[f"{unit}.d/sgxvtpm.conf"]
        assert "Environment=PATH=/p/libexec/sgxvtpm-libvirt:/usr/local/sbin:" in text
        assert "Environment=SGXVTPM_CONF=/etc/sgxvtpm/sgxvtpm.conf" in text
    gc = files[GC_UNIT]
    assert "User=tss" in gc and "ExecStart=/p/bin/sgxvtpm vm gc" in gc


def test_conf_names_the_state_dir_and_credentials_and_an_edited_one_is_kept(
    tmp_path: Path,
) -> None:
    layout = Layout(state_dir=Path("/s"), credentials=Path("/c"), conf_dir=tmp_path / "etc")
    said: list[str] = []
    ensure_conf(layout, said.append)
    assert parse_conf(layout.conf.read_text(), "x") == {"state_dir": "/s", "credentials": "/c"}
    assert said == [f"{layout.conf}: written"]
    ensure_conf(layout, said.append)
    assert len(said) == 1  # idempotent
    layout.conf.write_text("state_dir = /elsewhere\n")
    ensure_conf(layout, said.append)
    assert layout.conf.read_text() == "state_dir = /elsewhere\n" and "kept" in said[-1]


def test_ids_come_from_the_users_files_of_the_prefix(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n"
                                             "tss:x:102:109::/var/lib/tpm:/bin/false\n")
    layout = Layout(users_prefix=tmp_path)
    assert ids(layout, "tss") == (102, 109)
    with pytest.raises(InstallError, match="no user 'sgxvtpm'"):
        ids(layout, "sgxvtpm")


def test_runtime_dependencies_are_the_closure_without_test_tools() -> None:
    names = {d.metadata["Name"].lower() for d in runtime_distributions()}
    assert {"cryptography", "cffi"} <= names
    assert not names & {"pytest", "hypothesis", "mypy", "ruff", "sgxvtpm"}


def test_requirement_names_skip_extras() -> None:
    dist = importlib.metadata.distribution("sgxvtpm")
    names = _requirement_names(dist)
    assert "cryptography" in names and "pytest" not in names
