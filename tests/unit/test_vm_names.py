"""VM names: one rule (enclaves.registry.check_vm_name) for the manager and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgxvtpm import cli

GOOD = ["vm1", "a", "web-01.prod_x", "A" * 61, "x.."]
BAD = [".", "..", ".hidden", "-rf", "a/b", "../x", "a b", "", "x" * 62, "vm\x00", "é"]


@pytest.mark.parametrize("name", GOOD)
def test_good_names(name: str) -> None:
    from sgxvtpm.enclaves.registry import check_vm_name

    assert check_vm_name(name) == name


@pytest.mark.parametrize("name", BAD)
def test_bad_names(name: str) -> None:
    from sgxvtpm.enclaves.registry import check_vm_name

    with pytest.raises(ValueError, match="bad VM name"):
        check_vm_name(name)


def test_longest_name_fits_the_certificate_cn() -> None:
    from sgxvtpm.enclaves.registry import MAX_VM_NAME, VM_CN_PREFIX

    assert len(VM_CN_PREFIX) + MAX_VM_NAME == 64  # X.509 ub-common-name


@pytest.mark.parametrize("command", [["vm", "create"], ["vm", "show"], ["vm", "destroy"]])
def test_cli_refuses_a_bad_name_in_one_line_before_contacting_hostd(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    assert cli.main([*command, "..", "--state-dir", str(state)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sgxvtpm: error: bad VM name '..'"), err
    assert not state.exists()
