"""Endorsement Key manufacturing: the TCG EK templates, handles and NV indices.

Sans-IO like :mod:`sgxvtpm.tpm.nv`: every function takes ``transact`` (one
command in, one response out), so the same code manufactures a libtpms
engine inside an instance enclave and Debian's swtpm in the tests.

Sources and what was checked against the real programs (swtpm_setup 0.7.1,
tpm2-tools 5.4, Debian 12):

* ``rsa2048`` and ``ecc-p256`` use the low-range default templates L-1 and L-2
  of the TCG EK Credential Profile 2.x (section B.3.3 / B.3.4): SHA-256 name,
  ``fixedTPM|fixedParent|sensitiveDataOrigin|adminWithPolicy|restricted|decrypt``,
  AES-128-CFB, the PolicySecret(TPM_RH_ENDORSEMENT) policy, and the unique
  field zero-filled (256 bytes for RSA, 32+32 bytes for ECC). They are what
  ``tpm2_createek -G rsa|ecc`` creates, so its public key equals ours.
* ``ecc-p384`` and ``rsa3072`` use the high-range templates as swtpm_setup
  0.7.1 creates them (H-3 for P-384; its RSA-3072 sibling with
  ``--rsa-keysize 3072``): SHA-384 name, adds ``userWithAuth``, AES-256-CFB,
  the SHA-384 PolicyB digest and an empty unique field. Checked by creating
  our template on a TPM manufactured by swtpm_setup: same key as its EK.
* Persistent handles: 0x81010001 (RSA 2048) and 0x81010002 (ECC P-256) from
  the TCG TPM v2.0 Provisioning Guidance, Table 2 (swtpm_setup 0.7.1 creates
  no P-256 EK); 0x81010016 (P-384) and 0x8101001c (RSA 3072) as swtpm_setup
  0.7.1 uses them.
* Certificate NV indices (EK Credential Profile 2.x, 2.2.1.4): 0x01c00002,
  0x01c0000a, 0x01c00016, 0x01c0001c; platform certificate 0x01c08000 (swtpm).
  tpm2_getekcertificate 5.4 reads only 0x01c00002 and 0x01c0000a.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sgxvtpm.tpm.constants import (
    TPM2_ALG,
    TPM2_CAP,
    TPM2_CC,
    TPM2_ECC_CURVE,
    TPM2_PT,
    TPM2_RH,
    TPMA_OBJECT,
)
from sgxvtpm.tpm.nv import (
    Transact,
    define_and_write,
    execute,
    get_tpm_property,
    read_all,
)
from sgxvtpm.tpm.wire import (
    Reader,
    TpmProtocolError,
    build_command,
    create_primary,
    evict_control,
    flush_context,
    parse_create_primary,
    parse_read_public,
    password_session,
    read_public,
    response_parameters,
    tpm2b,
    u8,
    u16,
    u32,
)

EkPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

#: NV index of the platform certificate (swtpm_setup --create-platform-cert).
PLATFORM_CERT_NV_INDEX = 0x01C08000


def _policy_secret_endorsement(digest: Callable[[bytes], bytes], size: int) -> bytes:
    """PolicyA: TPM2_PolicySecret(TPM_RH_ENDORSEMENT) from a zero digest.

    Part 3, 23.4 (PolicySecret) and 23.2.4 (PolicyUpdate): d1 = H(0 || CC ||
    authName), d2 = H(d1 || policyRef) with an empty policyRef; the name of a
    permanent handle is the handle itself.
    """
    step = digest(bytes(size) + u32(TPM2_CC.PolicySecret) + u32(TPM2_RH.ENDORSEMENT))
    return digest(step)


#: EK Credential Profile, B.3.2: the L-1/L-2 authPolicy (= 8371976744...).
POLICY_A_SHA256 = _policy_secret_endorsement(lambda b: hashlib.sha256(b).digest(), 32)
#: EK Credential Profile 2.3+, B.6 "PolicyB" SHA-384 (PolicyOR of PolicyA and
#: PolicyC), the authPolicy of the high-range templates; the value swtpm_setup
#: 0.7.1 puts in its P-384 and RSA-3072 EKs.
POLICY_B_SHA384 = bytes.fromhex(
    "b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4"
    "cb1c0ad9bde419cacb47ba09699646150f9fc000f3f80e12"
)

_LOW_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.ADMINWITHPOLICY
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)  # 0x000300b2
_HIGH_ATTRS = _LOW_ATTRS | TPMA_OBJECT.USERWITHAUTH  # 0x000300f2


@dataclass(frozen=True)
class EkProfile:
    """One EK kind: its template and where swtpm_setup/TCG put it."""

    alg: str
    handle: int
    nv_index: int
    template: bytes  # TPMT_PUBLIC


def _aes_cfb(bits: int) -> bytes:
    return u16(TPM2_ALG.AES) + u16(bits) + u16(TPM2_ALG.CFB)


def _rsa_template(
    name_alg: int, attrs: int, policy: bytes, bits: int, sym: int, unique: int
) -> bytes:
    # TPMT_PUBLIC (Part 2, 12.2.4) with TPMS_RSA_PARMS (12.2.3.5): symmetric,
    # scheme NULL, keyBits, exponent 0 (= 65537), then TPM2B_PUBLIC_KEY_RSA.
    params = _aes_cfb(sym) + u16(TPM2_ALG.NULL) + u16(bits) + u32(0)
    return (
        u16(TPM2_ALG.RSA) + u16(name_alg) + u32(attrs) + tpm2b(policy) + params
        + tpm2b(bytes(unique))
    )  # fmt: skip


def _ecc_template(
    name_alg: int, attrs: int, policy: bytes, curve: int, sym: int, unique: int
) -> bytes:
    # TPMS_ECC_PARMS (12.2.3.6): symmetric, scheme NULL, curveID, kdf NULL;
    # unique is TPMS_ECC_POINT: two TPM2B_ECC_PARAMETER.
    params = _aes_cfb(sym) + u16(TPM2_ALG.NULL) + u16(curve) + u16(TPM2_ALG.NULL)
    point = tpm2b(bytes(unique)) + tpm2b(bytes(unique))
    return u16(TPM2_ALG.ECC) + u16(name_alg) + u32(attrs) + tpm2b(policy) + params + point


_P256, _P384 = TPM2_ECC_CURVE.NIST_P256, TPM2_ECC_CURVE.NIST_P384
# (alg, persistent handle, certificate NV index, template); unique sizes: L-1 256
# zero bytes, L-2 32+32 zero bytes, high range empty (EK Credential Profile B.3).
EK_PROFILES: dict[str, EkProfile] = {
    p.alg: p
    for p in (
        EkProfile(
            "rsa2048", 0x81010001, 0x01C00002,
            _rsa_template(TPM2_ALG.SHA256, _LOW_ATTRS, POLICY_A_SHA256, 2048, 128, 256),
        ),
        EkProfile(
            "ecc-p256", 0x81010002, 0x01C0000A,
            _ecc_template(TPM2_ALG.SHA256, _LOW_ATTRS, POLICY_A_SHA256, _P256, 128, 32),
        ),
        EkProfile(
            "ecc-p384", 0x81010016, 0x01C00016,
            _ecc_template(TPM2_ALG.SHA384, _HIGH_ATTRS, POLICY_B_SHA384, _P384, 256, 0),
        ),
        EkProfile(
            "rsa3072", 0x8101001C, 0x01C0001C,
            _rsa_template(TPM2_ALG.SHA384, _HIGH_ATTRS, POLICY_B_SHA384, 3072, 256, 0),
        ),
    )
}  # fmt: skip
EK_ALGS: tuple[str, ...] = tuple(EK_PROFILES)


def profile(alg: str) -> EkProfile:
    """The EK profile for ``alg``; ValueError names the supported ones."""
    try:
        return EK_PROFILES[alg]
    except KeyError:
        raise ValueError(f"unknown EK algorithm {alg!r}; use one of {', '.join(EK_ALGS)}") from None


@dataclass(frozen=True)
class EkPublic:
    """A created EK: its kind, persistent handle, TPM2B_PUBLIC and public key."""

    alg: str
    handle: int
    public_area: bytes  # TPM2B_PUBLIC, as tpm2_readpublic -f tss writes it
    public_key: EkPublicKey
    name: bytes = field(default=b"")  # TPM2B_NAME contents: nameAlg || H(TPMT_PUBLIC)

    @property
    def nv_index(self) -> int:
        return profile(self.alg).nv_index


# ---------------------------------------------------------------- TPMT_PUBLIC

_CURVES: dict[int, ec.EllipticCurve] = {
    TPM2_ECC_CURVE.NIST_P256: ec.SECP256R1(),
    TPM2_ECC_CURVE.NIST_P384: ec.SECP384R1(),
    TPM2_ECC_CURVE.NIST_P521: ec.SECP521R1(),
}


def _skip_sym(r: Reader) -> None:
    if r.u16() != TPM2_ALG.NULL:  # TPMT_SYM_DEF_OBJECT: alg, keyBits, mode
        r.u16(), r.u16()


def _skip_scheme(r: Reader) -> None:
    if r.u16() != TPM2_ALG.NULL:  # TPMT_*_SCHEME: scheme, hashAlg
        r.u16()


def public_key_from_tpmt(tpmt_public: bytes) -> EkPublicKey:
    """The RSA or ECC public key in a TPMT_PUBLIC (Part 2, 12.2.4).

    Raises TpmProtocolError for a truncated area, ValueError for a key type
    or curve that is not RSA or NIST P-256/384/521.
    """
    r = Reader(tpmt_public)
    key_type = r.u16()
    r.u16()  # nameAlg
    r.u32()  # objectAttributes
    r.tpm2b()  # authPolicy
    if key_type == TPM2_ALG.RSA:
        _skip_sym(r)
        _skip_scheme(r)
        r.u16()  # keyBits
        exponent = r.u32() or 65537
        modulus = int.from_bytes(r.tpm2b(), "big")
        r.done()
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    if key_type == TPM2_ALG.ECC:
        _skip_sym(r)
        _skip_scheme(r)
        curve_id = r.u16()
        _skip_scheme(r)  # kdf
        x, y = r.tpm2b(), r.tpm2b()
        r.done()
        curve = _CURVES.get(curve_id)
        if curve is None:
            raise ValueError(f"unsupported ECC curve {curve_id:#x}")
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
        ).public_key()
    raise ValueError(f"unsupported key type {key_type:#x}")


def _ek_public(alg: str, handle: int, tpmt_public: bytes, name: bytes) -> EkPublic:
    return EkPublic(alg, handle, tpm2b(tpmt_public), public_key_from_tpmt(tpmt_public), name)


# ---------------------------------------------------------------- EK creation


def create_ek(
    transact: Transact,
    alg: str,
    *,
    persist: bool = True,
    endorsement_auth: bytes = b"",
    owner_auth: bytes = b"",
) -> EkPublic:
    """TPM2_CreatePrimary(TPM_RH_ENDORSEMENT) from the EK template for ``alg``.

    With ``persist`` (default) the key is made persistent at the profile's
    handle with TPM2_EvictControl (owner authorization, Part 3, 28.5) and the
    transient copy is flushed; otherwise the transient handle is flushed and
    the returned handle is 0. The EK is a function of the endorsement seed
    and the template only, so running this again gives the same key.
    """
    prof = profile(alg)
    created = parse_create_primary(
        execute(
            transact,
            create_primary(prof.template, TPM2_RH.ENDORSEMENT, hierarchy_auth=endorsement_auth),
        )
    )
    try:
        if persist:
            execute(transact, evict_control(created.handle, prof.handle, TPM2_RH.OWNER, owner_auth))
    finally:
        execute(transact, flush_context(created.handle))
    return _ek_public(alg, prof.handle if persist else 0, created.public, created.name)


def read_ek_public(transact: Transact, alg: str) -> EkPublic:
    """The persistent EK of ``alg`` (TPM2_ReadPublic on its handle)."""
    prof = profile(alg)
    result = parse_read_public(execute(transact, read_public(prof.handle)))
    return _ek_public(alg, prof.handle, result.public, result.name)


def write_ek_certificate(
    transact: Transact, alg: str, cert_der: bytes, *, lock: bool = True, platform_auth: bytes = b""
) -> None:
    """Store ``cert_der`` at the TCG NV index for ``alg``'s EK certificate."""
    define_and_write(
        transact, profile(alg).nv_index, cert_der, lock=lock, platform_auth=platform_auth
    )


def write_platform_certificate(
    transact: Transact, cert_der: bytes, *, lock: bool = True, platform_auth: bytes = b""
) -> None:
    """Store ``cert_der`` at NV 0x01c08000, where swtpm_setup puts its platform certificate."""
    define_and_write(
        transact, PLATFORM_CERT_NV_INDEX, cert_der, lock=lock, platform_auth=platform_auth
    )


def read_ek_certificate(transact: Transact, alg: str) -> bytes:
    """The DER EK certificate stored for ``alg`` (TpmResponseError if none)."""
    return read_all(transact, profile(alg).nv_index)


# ---------------------------------------------------------------- PCR banks

PCR_BANKS: dict[str, int] = {
    "sha1": TPM2_ALG.SHA1,
    "sha256": TPM2_ALG.SHA256,
    "sha384": TPM2_ALG.SHA384,
    "sha512": TPM2_ALG.SHA512,
    "sm3_256": TPM2_ALG.SM3_256,
}


def implemented_pcr_banks(transact: Transact) -> dict[int, int]:
    """{hash alg: sizeofSelect} of every bank the TPM implements (TPM_CAP_PCRS)."""
    command = build_command(TPM2_CC.GetCapability, u32(TPM2_CAP.PCRS) + u32(0) + u32(1))
    _, r = response_parameters(execute(transact, command))
    r.u8()  # moreData
    r.u32()  # capability
    banks = {}
    for _ in range(r.u32()):
        alg, size = r.u16(), r.u8()
        r.take(size)
        banks[alg] = size
    return banks


def _bank_alg(name: str) -> int:
    try:
        return PCR_BANKS[name]
    except KeyError:
        raise ValueError(f"unknown PCR bank {name!r}; use {', '.join(PCR_BANKS)}") from None


def check_pcr_banks(banks: Sequence[str]) -> None:
    """ValueError naming the allowed banks unless every one of ``banks`` is in PCR_BANKS."""
    for name in banks:
        _bank_alg(name)


def allocate_pcr_banks(
    transact: Transact, banks: Sequence[str], *, platform_auth: bytes = b""
) -> None:
    """TPM2_PCR_Allocate (Part 3, 22.5): activate exactly ``banks``, all PCRs each.

    Every implemented bank is listed, the wanted ones with all PCRs selected
    and the others with none, as swtpm_setup does. The new allocation takes
    effect only at the next TPM reset (_TPM_Init then TPM2_Startup(CLEAR),
    Part 3, 22.5.1): the caller must send TPM2_Shutdown(CLEAR) and restart
    the TPM (swtpm: CMD_INIT on the control channel; libtpms: stop/start the
    engine), then TPM2_Startup(CLEAR). Until then the old banks stay active.
    """
    wanted = {_bank_alg(b) for b in banks}
    if not wanted:
        raise ValueError("allocate at least one PCR bank")
    implemented = implemented_pcr_banks(transact)
    missing = wanted - set(implemented)
    if missing:
        names = [n for n, a in PCR_BANKS.items() if a in missing]
        raise ValueError(f"the TPM does not implement PCR bank(s) {', '.join(names)}")
    selection = u32(len(implemented))
    for alg, size in implemented.items():
        fill = b"\xff" if alg in wanted else b"\x00"
        selection += u16(alg) + u8(size) + fill * size
    command = build_command(
        TPM2_CC.PCR_Allocate, selection, [TPM2_RH.PLATFORM], [password_session(platform_auth)]
    )
    _, r = response_parameters(execute(transact, command))
    if not r.u8():  # allocationSuccess
        raise TpmProtocolError("TPM2_PCR_Allocate answered allocationSuccess = NO")


# ---------------------------------------------------------------- TPM identity


@dataclass(frozen=True)
class TpmSpecInfo:
    """What goes into an EK certificate's TPM attributes, read from the TPM."""

    family: str  # TPM_PT_FAMILY_INDICATOR as text, "2.0"
    level: int
    revision: int  # e.g. 164 for 1.64 (libtpms 0.9)
    manufacturer: int  # TPM_PT_MANUFACTURER, 4 ASCII chars as u32
    firmware_version: int  # TPM_PT_FIRMWARE_VERSION_1
    vendor_string: str = ""  # TPM_PT_VENDOR_STRING_1..4, NULs dropped

    def certificate_attributes(self) -> tuple[str, str, str]:
        """The EK certificate's tcg-at-tpmManufacturer, tpmModel and tpmVersion, as this
        TPM reports itself (TCG EK Credential Profile 2.x, 3.2.9: the manufacturer is
        "id:" and TPM_PT_MANUFACTURER's 4 bytes in hex, e.g. id:49424D00 for "IBM";
        the version "id:" and TPM_PT_FIRMWARE_VERSION_1 in hex, as swtpm writes
        id:20191023). swtpm_setup takes these from libtpms' attributes instead, which
        say id:00001014 and "swtpm" while the TPM reports "IBM" and "SW   TPM"."""
        return (f"id:{self.manufacturer:08X}", self.vendor_string or "unknown",
                f"id:{self.firmware_version:08X}")


def read_tpm_spec(transact: Transact) -> TpmSpecInfo:
    """TPM_PT_FAMILY_INDICATOR, LEVEL, REVISION, MANUFACTURER, VENDOR_STRING_1..4,
    FIRMWARE_VERSION_1.

    swtpm_setup passes the first three as --tpm-spec-family/level/revision.
    """

    def prop(p: int) -> int:
        value = get_tpm_property(transact, p)
        if value is None:
            raise TpmProtocolError(f"TPM did not report property {p:#x}")
        return value

    family = (
        prop(TPM2_PT.FAMILY_INDICATOR).to_bytes(4, "big").rstrip(b"\0").decode("ascii", "replace")
    )
    return TpmSpecInfo(
        family=family,
        level=prop(TPM2_PT.LEVEL),
        revision=prop(TPM2_PT.REVISION),
        manufacturer=prop(TPM2_PT.MANUFACTURER),
        firmware_version=prop(TPM2_PT.FIRMWARE_VERSION_1),
        vendor_string=vendor_string(transact),
    )


def vendor_string(transact: Transact) -> str:
    """TPM_PT_VENDOR_STRING_1..4 (Part 2, 6.13: 4 ASCII bytes each, unused ones 0), NULs
    dropped, outer spaces stripped: "SW   TPM" for libtpms."""
    raw = b""
    for p in (TPM2_PT.VENDOR_STRING_1, TPM2_PT.VENDOR_STRING_2, TPM2_PT.VENDOR_STRING_3,
              TPM2_PT.VENDOR_STRING_4):
        value = get_tpm_property(transact, p)
        raw += (value or 0).to_bytes(4, "big")
    return raw.replace(b"\0", b"").decode("ascii", "replace").strip()


# ---------------------------------------------------------------- all at once


@dataclass(frozen=True)
class Manufactured:
    """What :func:`manufacture` made: the EKs and the DER certificates it stored."""

    eks: list[EkPublic]
    ek_certificates: dict[str, bytes]
    platform_certificate: bytes | None


def manufacture(
    transact: Transact,
    algs: Iterable[str],
    sign: Callable[[EkPublic], bytes],
    *,
    platform_cert: Callable[[EkPublic], bytes] | None = None,
    pcr_banks: Sequence[str] | None = None,
    lock: bool = True,
) -> Manufactured:
    """Create each EK, certify it with ``sign``, store the certificates, lock NV.

    ``sign(ek)`` returns the DER EK certificate (the manager CA issues it).
    ``platform_cert(first_ek)`` returns a DER platform certificate; like
    swtpm_setup, its subject key is the first EK. ``pcr_banks`` is passed to
    :func:`allocate_pcr_banks` (it needs a TPM reset afterwards, see there).
    A fresh TPM is assumed: an EK handle or index already in use raises
    TpmResponseError (TPM_RC_NV_DEFINED).
    """
    algs = list(dict.fromkeys(algs))
    for alg in algs:
        profile(alg)  # reject unknown names before touching the TPM
    if not algs:
        raise ValueError("manufacture at least one EK")
    eks = [create_ek(transact, alg) for alg in algs]
    certs = {}
    for ek in eks:
        certs[ek.alg] = sign(ek)
        write_ek_certificate(transact, ek.alg, certs[ek.alg], lock=lock)
    platform_der = None
    if platform_cert is not None:
        platform_der = platform_cert(eks[0])
        write_platform_certificate(transact, platform_der, lock=lock)
    if pcr_banks is not None:
        allocate_pcr_banks(transact, pcr_banks)
    return Manufactured(eks, certs, platform_der)
