"""``vm create`` is all or nothing (real hostd, real CLI processes).

A creation that fails after the manager launched the instance leaves no
registration, no instance and no binding: the name is free again.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from tests.helpers.hostd import Hostd, running_hostd
from tests.helpers.vmtools import sgxvtpm_cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def module_hostd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostd]:
    with running_hostd(tmp_path_factory.mktemp("atomic") / "state") as h:
        yield h


def _names(h: Hostd) -> list[str]:
    done = sgxvtpm_cli(h.state, "vm", "list", "--json")
    assert done.returncode == 0, done.stderr
    return [vm["name"] for vm in json.loads(done.stdout)]


def _instances(h: Hostd) -> set[str]:
    root = h.state.root / "instances"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def _one_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("sgxvtpm: error: "), done.stderr
    return done.stderr.removeprefix("sgxvtpm: error: ").strip()


def test_a_binding_that_cannot_be_stored_leaves_no_vm_and_frees_the_name(
    module_hostd: Hostd,
) -> None:
    h = module_hostd
    before = _instances(h)
    vm_dir = h.vm_dir("half")
    (vm_dir / "ca.crt").mkdir(parents=True)  # the third file of the binding cannot be written
    (vm_dir / "ca.crt" / "x").write_text("")
    message = _one_error(sgxvtpm_cli(h.state, "vm", "create", "half"))
    assert message.startswith("half was not created: its binding could not be stored")
    assert "half" not in _names(h)
    assert _instances(h) == before  # the instance is stopped and its state erased
    assert not (vm_dir / "vm.key").exists() and not (vm_dir / "vm.crt").exists()
    shutil.rmtree(vm_dir / "ca.crt")
    done = sgxvtpm_cli(h.state, "vm", "create", "half")  # the name is free again
    assert done.returncode == 0, done.stderr
    assert "half" in _names(h) and (vm_dir / "ca.crt").is_file()


def test_a_registry_that_cannot_be_saved_leaves_no_vm_and_frees_the_name(
    module_hostd: Hostd,
) -> None:
    h = module_hostd
    before = _instances(h)
    registry = h.state.root / "manager" / "registry.sealed"
    aside = registry.with_name("registry.aside")
    registry.rename(aside)
    (registry / "x").mkdir(parents=True)  # the save's rename onto it fails
    try:
        message = _one_error(sgxvtpm_cli(h.state, "vm", "create", "unsaved"))
    finally:
        shutil.rmtree(registry)
        aside.rename(registry)
    assert "unsaved" not in _names(h)
    assert _instances(h) == before
    assert message.startswith("the manager's registry could not be saved: ")
    assert not h.vm_dir("unsaved").exists()
    done = sgxvtpm_cli(h.state, "vm", "create", "unsaved")
    assert done.returncode == 0, done.stderr
    assert "unsaved" in _names(h)


@pytest.mark.parametrize("length", [62, 64])
def test_a_name_too_long_for_its_certificate_is_refused_before_anything_is_made(
    module_hostd: Hostd, length: int
) -> None:
    h = module_hostd
    before = _instances(h)
    name = "n" * length
    message = _one_error(sgxvtpm_cli(h.state, "vm", "create", name))
    assert message.startswith(f"bad VM name {name!r}: use 1-61 characters")
    assert name not in _names(h) and _instances(h) == before
