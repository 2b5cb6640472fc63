"""TPM 2.0 constants with the TCG names.

Values come from TPM 2.0 Library Specification, Part 2 (Structures), rev 1.59;
each class names its table. Member names drop the ``TPM2_XX_`` prefix, as in
tpm2-pytss (``TPM2_CC.NV_Read`` is the spec's ``TPM_CC_NV_Read``).

The wire keeps raw integers: parsers return ``int`` so that a code this module
does not know still passes through. Use :func:`rc_name` (or the enums, when a
value is known) only for messages and logs.
"""

from __future__ import annotations

import enum
from typing import Self


class TPM2_ST(enum.IntEnum):
    """TPM_ST, structure tags (Part 2, Table 19)."""

    RSP_COMMAND = 0x00C4
    NULL = 0x8000
    NO_SESSIONS = 0x8001
    SESSIONS = 0x8002
    ATTEST_NV = 0x8014
    ATTEST_COMMAND_AUDIT = 0x8015
    ATTEST_SESSION_AUDIT = 0x8016
    ATTEST_CERTIFY = 0x8017
    ATTEST_QUOTE = 0x8018
    ATTEST_TIME = 0x8019
    ATTEST_CREATION = 0x801A
    ATTEST_NV_DIGEST = 0x801C
    CREATION = 0x8021
    VERIFIED = 0x8022
    AUTH_SECRET = 0x8023
    HASHCHECK = 0x8024
    AUTH_SIGNED = 0x8025
    FU_MANIFEST = 0x8029


class TPM2_CC(enum.IntEnum):
    """TPM_CC, command codes (Part 2, Table 12)."""

    NV_UndefineSpaceSpecial = 0x11F
    EvictControl = 0x120
    HierarchyControl = 0x121
    NV_UndefineSpace = 0x122
    ChangeEPS = 0x124
    ChangePPS = 0x125
    Clear = 0x126
    ClearControl = 0x127
    ClockSet = 0x128
    HierarchyChangeAuth = 0x129
    NV_DefineSpace = 0x12A
    PCR_Allocate = 0x12B
    PCR_SetAuthPolicy = 0x12C
    PP_Commands = 0x12D
    SetPrimaryPolicy = 0x12E
    FieldUpgradeStart = 0x12F
    ClockRateAdjust = 0x130
    CreatePrimary = 0x131
    NV_GlobalWriteLock = 0x132
    GetCommandAuditDigest = 0x133
    NV_Increment = 0x134
    NV_SetBits = 0x135
    NV_Extend = 0x136
    NV_Write = 0x137
    NV_WriteLock = 0x138
    DictionaryAttackLockReset = 0x139
    DictionaryAttackParameters = 0x13A
    NV_ChangeAuth = 0x13B
    PCR_Event = 0x13C
    PCR_Reset = 0x13D
    SequenceComplete = 0x13E
    SetAlgorithmSet = 0x13F
    SetCommandCodeAuditStatus = 0x140
    FieldUpgradeData = 0x141
    IncrementalSelfTest = 0x142
    SelfTest = 0x143
    Startup = 0x144
    Shutdown = 0x145
    StirRandom = 0x146
    ActivateCredential = 0x147
    Certify = 0x148
    PolicyNV = 0x149
    CertifyCreation = 0x14A
    Duplicate = 0x14B
    GetTime = 0x14C
    GetSessionAuditDigest = 0x14D
    NV_Read = 0x14E
    NV_ReadLock = 0x14F
    ObjectChangeAuth = 0x150
    PolicySecret = 0x151
    Rewrap = 0x152
    Create = 0x153
    ECDH_ZGen = 0x154
    HMAC = 0x155
    Import = 0x156
    Load = 0x157
    Quote = 0x158
    RSA_Decrypt = 0x159
    HMAC_Start = 0x15B
    SequenceUpdate = 0x15C
    Sign = 0x15D
    Unseal = 0x15E
    PolicySigned = 0x160
    ContextLoad = 0x161
    ContextSave = 0x162
    ECDH_KeyGen = 0x163
    EncryptDecrypt = 0x164
    FlushContext = 0x165
    LoadExternal = 0x167
    MakeCredential = 0x168
    NV_ReadPublic = 0x169
    PolicyAuthorize = 0x16A
    PolicyAuthValue = 0x16B
    PolicyCommandCode = 0x16C
    PolicyCounterTimer = 0x16D
    PolicyCpHash = 0x16E
    PolicyLocality = 0x16F
    PolicyNameHash = 0x170
    PolicyOR = 0x171
    PolicyTicket = 0x172
    ReadPublic = 0x173
    RSA_Encrypt = 0x174
    StartAuthSession = 0x176
    VerifySignature = 0x177
    ECC_Parameters = 0x178
    FirmwareRead = 0x179
    GetCapability = 0x17A
    GetRandom = 0x17B
    GetTestResult = 0x17C
    Hash = 0x17D
    PCR_Read = 0x17E
    PolicyPCR = 0x17F
    PolicyRestart = 0x180
    ReadClock = 0x181
    PCR_Extend = 0x182
    PCR_SetAuthValue = 0x183
    NV_Certify = 0x184
    EventSequenceComplete = 0x185
    HashSequenceStart = 0x186
    PolicyPhysicalPresence = 0x187
    PolicyDuplicationSelect = 0x188
    PolicyGetDigest = 0x189
    TestParms = 0x18A
    Commit = 0x18B
    PolicyPassword = 0x18C
    ZGen_2Phase = 0x18D
    EC_Ephemeral = 0x18E
    PolicyNvWritten = 0x18F
    PolicyTemplate = 0x190
    CreateLoaded = 0x191
    PolicyAuthorizeNV = 0x192
    EncryptDecrypt2 = 0x193
    AC_GetCapability = 0x194
    AC_Send = 0x195
    Policy_AC_SendSelect = 0x196


# Response-code layout (Part 2, section 6.6, Figures 26-27).
RC_VER1 = 0x100  # format-zero, TPM 2.0 error
RC_FMT1 = 0x080  # format-one: error number in bits 0-5
RC_WARN = 0x900  # format-zero warning (VER1 | S bit 11)
RC_P = 0x040  # format-one: the number N names a parameter
RC_S = 0x800  # format-one without P: N (bits 8-10) names a session
RC_N_MASK = 0xF00  # format-one: N in bits 8-11
RC_FMT1_ERROR_MASK = 0x03F


class TPM2_RC(enum.IntEnum):
    """TPM_RC, response codes (Part 2, Table 16).

    Format-one codes are listed with N = 0; a real response may carry a
    parameter, handle or session number, see :func:`rc_base` and :func:`rc_name`.
    """

    SUCCESS = 0x000
    BAD_TAG = 0x01E
    # format-zero errors (RC_VER1 + n)
    INITIALIZE = 0x100
    FAILURE = 0x101
    SEQUENCE = 0x103
    PRIVATE = 0x10B
    HMAC = 0x119
    DISABLED = 0x120
    EXCLUSIVE = 0x121
    AUTH_TYPE = 0x124
    AUTH_MISSING = 0x125
    POLICY = 0x126
    PCR = 0x127
    PCR_CHANGED = 0x128
    UPGRADE = 0x12D
    TOO_MANY_CONTEXTS = 0x12E
    AUTH_UNAVAILABLE = 0x12F
    REBOOT = 0x130
    UNBALANCED = 0x131
    COMMAND_SIZE = 0x142
    COMMAND_CODE = 0x143
    AUTHSIZE = 0x144
    AUTH_CONTEXT = 0x145
    NV_RANGE = 0x146
    NV_SIZE = 0x147
    NV_LOCKED = 0x148
    NV_AUTHORIZATION = 0x149
    NV_UNINITIALIZED = 0x14A
    NV_SPACE = 0x14B
    NV_DEFINED = 0x14C
    BAD_CONTEXT = 0x150
    CPHASH = 0x151
    PARENT = 0x152
    NEEDS_TEST = 0x153
    NO_RESULT = 0x154
    SENSITIVE = 0x155
    # format-one errors (RC_FMT1 + n)
    ASYMMETRIC = 0x081
    ATTRIBUTES = 0x082
    HASH = 0x083
    VALUE = 0x084
    HIERARCHY = 0x085
    KEY_SIZE = 0x087
    MGF = 0x088
    MODE = 0x089
    TYPE = 0x08A
    HANDLE = 0x08B
    KDF = 0x08C
    RANGE = 0x08D
    AUTH_FAIL = 0x08E
    NONCE = 0x08F
    PP = 0x090
    SCHEME = 0x092
    SIZE = 0x095
    SYMMETRIC = 0x096
    TAG = 0x097
    SELECTOR = 0x098
    INSUFFICIENT = 0x09A
    SIGNATURE = 0x09B
    KEY = 0x09C
    POLICY_FAIL = 0x09D
    INTEGRITY = 0x09F
    TICKET = 0x0A0
    RESERVED_BITS = 0x0A1
    BAD_AUTH = 0x0A2
    EXPIRED = 0x0A3
    POLICY_CC = 0x0A4
    BINDING = 0x0A5
    CURVE = 0x0A6
    ECC_POINT = 0x0A7
    # warnings (RC_WARN + n)
    CONTEXT_GAP = 0x901
    OBJECT_MEMORY = 0x902
    SESSION_MEMORY = 0x903
    MEMORY = 0x904
    SESSION_HANDLES = 0x905
    OBJECT_HANDLES = 0x906
    LOCALITY = 0x907
    YIELDED = 0x908
    CANCELED = 0x909
    TESTING = 0x90A
    REFERENCE_H0 = 0x910
    REFERENCE_H1 = 0x911
    REFERENCE_H2 = 0x912
    REFERENCE_H3 = 0x913
    REFERENCE_H4 = 0x914
    REFERENCE_H5 = 0x915
    REFERENCE_H6 = 0x916
    REFERENCE_S0 = 0x918
    REFERENCE_S1 = 0x919
    REFERENCE_S2 = 0x91A
    REFERENCE_S3 = 0x91B
    REFERENCE_S4 = 0x91C
    REFERENCE_S5 = 0x91D
    REFERENCE_S6 = 0x91E
    NV_RATE = 0x920
    LOCKOUT = 0x921
    RETRY = 0x922
    NV_UNAVAILABLE = 0x923
    NOT_USED = 0x97F


def rc_is_format_one(rc: int) -> bool:
    """True for a format-one code (Part 2, 6.6.3: bit 7 set)."""
    return bool(rc & RC_FMT1)


def rc_base(rc: int) -> int:
    """The code without its parameter/handle/session number.

    For format-one codes this is ``RC_FMT1 + error number``; other codes are
    returned unchanged.
    """
    if rc_is_format_one(rc):
        return rc & (RC_FMT1 | RC_FMT1_ERROR_MASK)
    return rc


def rc_name(rc: int) -> str:
    """A readable name for a response code, e.g. ``TPM_RC_VALUE (parameter 1)``.

    Format-one codes carry a number N in bits 8-11 (Part 2, 6.6.3): with the
    P bit it is a parameter number (1-15); without it, N 1-7 is a handle and
    N 9-15 (bit 11 set) is session N-8. Unknown codes are shown in hex.
    """
    base = rc_base(rc)
    try:
        name = f"TPM_RC_{TPM2_RC(base).name}"
    except ValueError:
        return f"TPM_RC({rc:#x})"
    if not rc_is_format_one(rc):
        return name
    number = (rc & RC_N_MASK) >> 8
    if rc & RC_P:
        return f"{name} (parameter {number})"
    if number == 0:
        return name
    if rc & RC_S:
        return f"{name} (session {number - 8})"
    return f"{name} (handle {number})"


class TPM2_ALG(enum.IntEnum):
    """TPM_ALG_ID (TCG Algorithm Registry, Table 3)."""

    ERROR = 0x0000
    RSA = 0x0001
    TDES = 0x0003
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    MGF1 = 0x0007
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    SM3_256 = 0x0012
    SM4 = 0x0013
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    SM2 = 0x001B
    ECSCHNORR = 0x001C
    ECMQV = 0x001D
    KDF1_SP800_56A = 0x0020
    KDF2 = 0x0021
    KDF1_SP800_108 = 0x0022
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CAMELLIA = 0x0026
    CTR = 0x0040
    OFB = 0x0041
    CBC = 0x0042
    CFB = 0x0043
    ECB = 0x0044


class TPM2_ECC_CURVE(enum.IntEnum):
    """TPM_ECC_CURVE (Part 2, Table 10)."""

    NONE = 0x0000
    NIST_P192 = 0x0001
    NIST_P224 = 0x0002
    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005
    BN_P256 = 0x0010
    BN_P638 = 0x0011
    SM2_P256 = 0x0020


class TPM2_SU(enum.IntEnum):
    """TPM_SU, Startup/Shutdown types (Part 2, Table 20)."""

    CLEAR = 0x0000
    STATE = 0x0001


class TPM2_RH(enum.IntEnum):
    """TPM_RH, permanent handles (Part 2, Table 28); PW is TPM_RS_PW."""

    SRK = 0x40000000
    OWNER = 0x40000001
    REVOKE = 0x40000002
    TRANSPORT = 0x40000003
    OPERATOR = 0x40000004
    ADMIN = 0x40000005
    EK = 0x40000006
    NULL = 0x40000007
    UNASSIGNED = 0x40000008
    PW = 0x40000009
    LOCKOUT = 0x4000000A
    ENDORSEMENT = 0x4000000B
    PLATFORM = 0x4000000C
    PLATFORM_NV = 0x4000000D


class TPM2_HT(enum.IntEnum):
    """TPM_HT, the handle type in a handle's top byte (Part 2, Table 27)."""

    PCR = 0x00
    NV_INDEX = 0x01
    HMAC_SESSION = 0x02
    POLICY_SESSION = 0x03
    PERMANENT = 0x40
    TRANSIENT = 0x80
    PERSISTENT = 0x81


class TPM2_CAP(enum.IntEnum):
    """TPM_CAP (Part 2, Table 22)."""

    ALGS = 0x00000000
    HANDLES = 0x00000001
    COMMANDS = 0x00000002
    PP_COMMANDS = 0x00000003
    AUDIT_COMMANDS = 0x00000004
    PCRS = 0x00000005
    TPM_PROPERTIES = 0x00000006
    PCR_PROPERTIES = 0x00000007
    ECC_CURVES = 0x00000008
    AUTH_POLICIES = 0x00000009
    ACT = 0x0000000A
    VENDOR_PROPERTY = 0x00000100


class TPM2_PT(enum.IntEnum):
    """TPM_PT, property tags (Part 2, Table 23); the ones sgxvtpm reads."""

    FAMILY_INDICATOR = 0x100
    LEVEL = 0x101
    REVISION = 0x102
    DAY_OF_YEAR = 0x103
    YEAR = 0x104
    MANUFACTURER = 0x105
    VENDOR_STRING_1 = 0x106
    VENDOR_STRING_2 = 0x107
    VENDOR_STRING_3 = 0x108
    VENDOR_STRING_4 = 0x109
    VENDOR_TPM_TYPE = 0x10A
    FIRMWARE_VERSION_1 = 0x10B
    FIRMWARE_VERSION_2 = 0x10C
    INPUT_BUFFER = 0x10D
    HR_TRANSIENT_MIN = 0x10E
    HR_PERSISTENT_MIN = 0x10F
    HR_LOADED_MIN = 0x110
    ACTIVE_SESSIONS_MAX = 0x111
    PCR_COUNT = 0x112
    PCR_SELECT_MIN = 0x113
    CONTEXT_GAP_MAX = 0x114
    NV_COUNTERS_MAX = 0x116
    NV_INDEX_MAX = 0x117
    MEMORY = 0x118
    CLOCK_UPDATE = 0x119
    CONTEXT_HASH = 0x11A
    CONTEXT_SYM = 0x11B
    CONTEXT_SYM_SIZE = 0x11C
    ORDERLY_COUNT = 0x11D
    MAX_COMMAND_SIZE = 0x11E
    MAX_RESPONSE_SIZE = 0x11F
    MAX_DIGEST = 0x120
    MAX_OBJECT_CONTEXT = 0x121
    MAX_SESSION_CONTEXT = 0x122
    PERMANENT = 0x200
    STARTUP_CLEAR = 0x201
    HR_NV_INDEX = 0x202
    HR_LOADED = 0x203
    HR_LOADED_AVAIL = 0x204
    HR_ACTIVE = 0x205
    HR_ACTIVE_AVAIL = 0x206
    HR_TRANSIENT_AVAIL = 0x207
    HR_PERSISTENT = 0x208
    HR_PERSISTENT_AVAIL = 0x209
    NV_COUNTERS = 0x20A
    NV_COUNTERS_AVAIL = 0x20B
    ALGORITHM_SET = 0x20C
    LOADED_CURVES = 0x20D
    LOCKOUT_COUNTER = 0x20E
    MAX_AUTH_FAIL = 0x20F
    LOCKOUT_INTERVAL = 0x210
    LOCKOUT_RECOVERY = 0x211
    NV_WRITE_RECOVERY = 0x212


class BitFlags(enum.IntFlag):
    """A flag table declared by bit number, as the specifications' tables list the bits:
    ``NAME = 3`` is the member ``1 << 3``; ``NAME = 4, 7`` sets bits 4 and 7."""

    def __new__(cls, *bits: int) -> Self:
        value = sum(1 << bit for bit in bits)
        member = int.__new__(cls, value)
        member._value_ = value
        return member


class TPMA_NV(BitFlags):
    """TPMA_NV bits (Part 2, Table 233); TPM_NT sits in bits 4-7 (its values 1, 2, 4, 8
    set one bit each; PIN_PASS, 9, two)."""

    PPWRITE = 0
    OWNERWRITE = 1
    AUTHWRITE = 2
    POLICYWRITE = 3
    TPM_NT_COUNTER = 4
    TPM_NT_BITS = 5
    TPM_NT_EXTEND = 6
    TPM_NT_PIN_FAIL = 7
    TPM_NT_PIN_PASS = 4, 7
    POLICY_DELETE = 10
    WRITELOCKED = 11
    WRITEALL = 12
    WRITEDEFINE = 13
    WRITE_STCLEAR = 14
    GLOBALLOCK = 15
    PPREAD = 16
    OWNERREAD = 17
    AUTHREAD = 18
    POLICYREAD = 19
    NO_DA = 25
    ORDERLY = 26
    CLEAR_STCLEAR = 27
    READLOCKED = 28
    WRITTEN = 29
    PLATFORMCREATE = 30
    READ_STCLEAR = 31


TPMA_NV_TPM_NT_MASK = 0xF0


class TPMA_OBJECT(BitFlags):
    """TPMA_OBJECT bits (Part 2, Table 31)."""

    FIXEDTPM = 1
    STCLEAR = 2
    FIXEDPARENT = 4
    SENSITIVEDATAORIGIN = 5
    USERWITHAUTH = 6
    ADMINWITHPOLICY = 7
    NODA = 10
    ENCRYPTEDDUPLICATION = 11
    RESTRICTED = 16
    DECRYPT = 17
    SIGN_ENCRYPT = 18
    X509SIGN = 19


class TPMA_SESSION(BitFlags):
    """TPMA_SESSION bits (Part 2, Table 39)."""

    CONTINUESESSION = 0
    AUDITEXCLUSIVE = 1
    AUDITRESET = 2
    DECRYPT = 5
    ENCRYPT = 6
    AUDIT = 7


#: Smallest command or response: tag (2) + size (4) + code (4), Part 1, 18.
HEADER_SIZE = 10
#: libtpms 0.9's default and largest I/O buffer (TPMLIB_SetBufferSize max).
LIBTPMS_MAX_BUFFER = 4096
