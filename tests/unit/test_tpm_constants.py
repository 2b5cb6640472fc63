"""TPM constants: TCG values (cross-checked with tpm2-pytss) and rc_name."""

from __future__ import annotations

import enum

import pytest
from tpm2_pytss import constants as pytss  # type: ignore[import-untyped]

from sgxvtpm.tpm.constants import (
    TPM2_ALG,
    TPM2_CAP,
    TPM2_CC,
    TPM2_ECC_CURVE,
    TPM2_HT,
    TPM2_PT,
    TPM2_RC,
    TPM2_RH,
    TPM2_ST,
    TPM2_SU,
    TPMA_NV,
    TPMA_OBJECT,
    TPMA_SESSION,
    rc_base,
    rc_name,
)

# pytss spells a few members differently (lower-case, other prefixes).
_PYTSS_ALIASES: dict[tuple[type[enum.Enum], str], str | None] = {
    (TPM2_RH, "SRK"): None,  # deprecated names pytss omits
    (TPM2_RH, "REVOKE"): None,
    (TPM2_RH, "TRANSPORT"): None,
    (TPM2_RH, "OPERATOR"): None,
    (TPM2_RH, "ADMIN"): None,
    (TPM2_RH, "EK"): None,
    (TPM2_RH, "UNASSIGNED"): None,
    (TPM2_RH, "PW"): "PW",
    (TPM2_HT, "HMAC_SESSION"): "HMAC_SESSION",
}

_PAIRS: list[tuple[type[enum.Enum], object]] = [
    (TPM2_ST, pytss.TPM2_ST),
    (TPM2_CC, pytss.TPM2_CC),
    (TPM2_RC, pytss.TPM2_RC),
    (TPM2_ALG, pytss.TPM2_ALG),
    (TPM2_ECC_CURVE, pytss.TPM2_ECC),
    (TPM2_SU, pytss.TPM2_SU),
    (TPM2_RH, pytss.TPM2_RH),
    (TPM2_HT, pytss.TPM2_HT),
    (TPM2_CAP, pytss.TPM2_CAP),
    (TPM2_PT, pytss.TPM2_PT),
    (TPMA_NV, pytss.TPMA_NV),
    (TPMA_OBJECT, pytss.TPMA_OBJECT),
    (TPMA_SESSION, pytss.TPMA_SESSION),
]


def _pytss_value(ours: type[enum.Enum], theirs: object, name: str) -> int | None:
    alias = _PYTSS_ALIASES.get((ours, name), name)
    if alias is None:
        return None
    for candidate in (alias, alias.upper(), alias.replace("_", ""), alias.upper().replace("_", "")):
        if hasattr(theirs, candidate):
            return int(getattr(theirs, candidate))
    # pytss splits TPM2_PT by group: TPM2_PT_HR.TRANSIENT_MIN is PT_HR_TRANSIENT_MIN
    group, _, rest = name.partition("_")
    sub = getattr(pytss, f"{ours.__name__}_{group}", None)
    if sub is not None and hasattr(sub, rest):
        return int(getattr(sub, rest))
    return None


@pytest.mark.parametrize(("ours", "theirs"), _PAIRS, ids=lambda x: getattr(x, "__name__", ""))
def test_values_match_tpm2_pytss(ours: type[enum.Enum], theirs: object) -> None:
    checked = 0
    mismatches = []
    for member in ours:
        value = _pytss_value(ours, theirs, member.name)
        if value is None:
            continue
        checked += 1
        if value != member.value:
            mismatches.append((member.name, hex(member.value), hex(value)))
    assert not mismatches
    assert checked >= len(ours) // 2, f"only {checked} of {len(ours)} members cross-checked"


@pytest.mark.parametrize(
    ("rc", "name"),
    [
        (0x000, "TPM_RC_SUCCESS"),
        (0x01E, "TPM_RC_BAD_TAG"),
        (0x101, "TPM_RC_FAILURE"),
        (0x142, "TPM_RC_COMMAND_SIZE"),
        (0x922, "TPM_RC_RETRY"),
        (0x09A, "TPM_RC_INSUFFICIENT"),
        (0x1DA, "TPM_RC_INSUFFICIENT (parameter 1)"),
        (0x2C4, "TPM_RC_VALUE (parameter 2)"),
        (0xFC4, "TPM_RC_VALUE (parameter 15)"),
        (0x18B, "TPM_RC_HANDLE (handle 1)"),
        (0x78B, "TPM_RC_HANDLE (handle 7)"),
        (0x98E, "TPM_RC_AUTH_FAIL (session 1)"),
        (0xF8E, "TPM_RC_AUTH_FAIL (session 7)"),
        (0x03D, "TPM_RC(0x3d)"),
        (0x0BF, "TPM_RC(0xbf)"),
    ],
)
def test_rc_name(rc: int, name: str) -> None:
    assert rc_name(rc) == name


def test_rc_base_strips_only_format_one_numbers() -> None:
    assert rc_base(0x1DA) == TPM2_RC.INSUFFICIENT
    assert rc_base(0x98E) == TPM2_RC.AUTH_FAIL
    assert rc_base(0x922) == 0x922
    assert rc_base(0x142) == 0x142


def test_rc_name_agrees_with_tpm2_pytss_decoding() -> None:
    # pytss' TPM2_RC decoding of format-one codes: same base error
    for rc in (0x1DA, 0x2C4, 0x18B, 0x98E):
        assert rc_base(rc) == int(pytss.TPM2_RC(rc & 0xBF))
