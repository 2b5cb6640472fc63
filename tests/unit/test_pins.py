"""The operator's Gramine pins (sgxvtpm/vmm/pins.py): parsing and the policy they make."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sgxvtpm.platform.base import EnclaveIdentity
from sgxvtpm.vmm import pins

MANAGER, INSTANCE, SIGNER = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


def _text(**over: object) -> str:
    data: dict[str, object] = {"mrenclave": {"manager": MANAGER.hex(), "instance": INSTANCE.hex()},
                               "mrsigner": SIGNER.hex()}
    data.update(over)
    return json.dumps(data)


def _identity(mrenclave: bytes, mrsigner: bytes) -> EnclaveIdentity:
    return EnclaveIdentity(mrenclave=mrenclave, mrsigner=mrsigner, isv_prod_id=1, isv_svn=1,
                           attributes=bytes(16), misc_select=0)


def test_the_policy_needs_the_roles_mrenclave_and_the_signer(tmp_path: Path) -> None:
    p = pins.parse(_text(), tmp_path / "gramine.json")
    assert p.root == pins.INTEL
    manager = p.policy("manager")
    assert manager.accepts(_identity(MANAGER, SIGNER))
    assert not manager.accepts(_identity(INSTANCE, SIGNER))  # the other role's build
    assert not manager.accepts(_identity(MANAGER, b"\x04" * 32))  # another signer
    assert p.policy("instance").accepts(_identity(INSTANCE, SIGNER))


def test_a_pem_root_is_read_next_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "root.pem").write_text("PEM")
    assert pins.parse(_text(root="root.pem"), tmp_path / "gramine.json").root == "PEM"


@pytest.mark.parametrize("text, what", [
    ("not json", "not Gramine measurement pins"),
    (_text(mrsigner="00"), "mrsigner is not 32 bytes"),
    (json.dumps({"mrsigner": SIGNER.hex()}), "missing 'mrenclave'"),
    (_text(mrenclave={"manager": MANAGER.hex()}), "missing 'instance'"),
    (_text(root="absent.pem"), "absent.pem"),
    (_text(root=3), "root must be"),
])  # fmt: skip
def test_bad_pins_are_one_line_naming_the_file(tmp_path: Path, text: str, what: str) -> None:
    with pytest.raises(pins.PinsError, match=what) as err:
        pins.parse(text, tmp_path / "gramine.json")
    assert str(tmp_path / "gramine.json") in str(err.value) and "\n" not in str(err.value)


def test_missing_file_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pins.ENV, raising=False)
    with pytest.raises(pins.PinsError, match="sgxvtpm gramine pins"):
        pins.load(tmp_path)
    monkeypatch.setenv(pins.ENV, str(tmp_path / "elsewhere.json"))
    with pytest.raises(pins.PinsError, match=r"elsewhere\.json"):
        pins.load(tmp_path)
