"""SIGSTRUCT as ``gramine-sgx-sign`` writes it (the ``.sig`` file): Intel's layout, read.

SGX's enclave signature structure (Intel SDM Vol. 3D, 38.13, "Enclave
Signature Structure"), 1808 bytes, integers little-endian:

=========  ======  ====  ===================================================
field      offset  size
=========  ======  ====  ===================================================
HEADER          0    16  06000000E10000000000010000000000
VENDOR         16     4  0, or 0x8086 for Intel's own enclaves
DATE           20     4  yyyymmdd, as BCD
HEADER2        24    16  01010000600000006000000001000000
SWDEFINED      40     4
(reserved)     44    84
MODULUS       128   384  the signer's RSA-3072 modulus
EXPONENT      512     4  3
SIGNATURE     516   384  RSA signature (PKCS#1 v1.5, SHA-256)
MISCSELECT    900     4
MISCMASK      904     4
CET attrs     908     2  CET_ATTRIBUTES, CET_ATTRIBUTES_MASK
(reserved)    910     2
ISVFAMILYID   912    16
ATTRIBUTES    928    16  flags (8), xfrm (8)
ATTRIBUTEMASK 944    16
ENCLAVEHASH   960    32  MRENCLAVE
(reserved)    992    16
ISVEXTPRODID 1008    16
ISVPRODID    1024     2
ISVSVN       1026     2
(reserved)   1028    12
Q1           1040   384  signature^2 / modulus, for EINIT's check
Q2           1424   384
=========  ======  ====  ===================================================

The signature covers HEADER..(reserved at 44) (bytes 0-127) followed by
MISCSELECT..(reserved at 1028) (bytes 900-1027). MRSIGNER is SHA-256 of the
MODULUS bytes as stored (little-endian).

:func:`parse` reads a ``.sig`` and checks it as EINIT would (headers,
exponent 3, the signature under its own modulus); the launcher takes
MRENCLAVE and MRSIGNER from it: on hardware they are what the quotes of the
enclave it starts will carry.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sgxvtpm.platform.base import PlatformError

SIZE = 1808
HEADER = bytes.fromhex("06000000E10000000000010000000000")
HEADER2 = bytes.fromhex("01010000600000006000000001000000")
KEY_SIZE = 384
EXPONENT = 3

OFF_HEADER, OFF_VENDOR, OFF_DATE, OFF_HEADER2, OFF_SWDEFINED = 0, 16, 20, 24, 40
OFF_MODULUS, OFF_EXPONENT, OFF_SIGNATURE = 128, 512, 516
OFF_MISC_SELECT, OFF_MISC_MASK = 900, 904
OFF_ATTRIBUTES, OFF_ATTRIBUTE_MASK, OFF_ENCLAVE_HASH = 928, 944, 960
OFF_ISV_PROD_ID, OFF_ISV_SVN = 1024, 1026
OFF_Q1, OFF_Q2 = 1040, 1424
#: The two signed ranges (SDM 38.13): the header part and the body.
SIGNED = ((0, 128), (900, 1028))


class SigStructError(PlatformError):
    """A .sig file is not a SIGSTRUCT EINIT would take (size, headers, key, signature).

    Sign the enclave again with gramine-sgx-sign (docs/REAL-SGX.md).
    """


@dataclass(frozen=True)
class GramineSigStruct:
    """What a SIGSTRUCT vouches for, read from its bytes."""

    mrenclave: bytes
    mrsigner: bytes
    attributes: bytes  # flags, xfrm (16 bytes, as in a REPORT)
    attribute_mask: bytes
    misc_select: int
    misc_mask: int
    isv_prod_id: int
    isv_svn: int
    vendor: int
    date: str  # yyyy-mm-dd from the BCD field


def signed_bytes(data: bytes) -> bytes:
    """The bytes the SIGSTRUCT's signature covers."""
    return b"".join(data[start:end] for start, end in SIGNED)


def parse(data: bytes) -> GramineSigStruct:
    """Read and check a SIGSTRUCT (a ``.sig`` file); SigStructError naming the problem."""
    if len(data) != SIZE:
        raise SigStructError(f"a SIGSTRUCT is {SIZE} bytes, not {len(data)}")
    if data[OFF_HEADER : OFF_HEADER + 16] != HEADER or data[OFF_HEADER2 : OFF_HEADER2 + 16] != (
        HEADER2
    ):
        raise SigStructError("SIGSTRUCT HEADER or HEADER2 is not Intel's constant")
    (exponent,) = struct.unpack_from("<I", data, OFF_EXPONENT)
    if exponent != EXPONENT:
        raise SigStructError(f"SIGSTRUCT exponent is {exponent}, SGX requires 3")
    modulus_le = data[OFF_MODULUS : OFF_MODULUS + KEY_SIZE]
    modulus = int.from_bytes(modulus_le, "little")
    signature = int.from_bytes(data[OFF_SIGNATURE : OFF_SIGNATURE + KEY_SIZE], "little")
    if modulus.bit_length() != KEY_SIZE * 8 or not 0 < signature < modulus:
        raise SigStructError("SIGSTRUCT modulus or signature is out of range")
    try:
        key = rsa.RSAPublicNumbers(EXPONENT, modulus).public_key()
        key.verify(
            signature.to_bytes(KEY_SIZE, "big"),
            signed_bytes(data),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except (InvalidSignature, ValueError):
        raise SigStructError("SIGSTRUCT signature does not verify under its modulus") from None
    q1 = int.from_bytes(data[OFF_Q1 : OFF_Q1 + KEY_SIZE], "little")
    q2 = int.from_bytes(data[OFF_Q2 : OFF_Q2 + KEY_SIZE], "little")
    if q1 != signature * signature // modulus or q2 != (
        (signature * signature % modulus) * signature // modulus
    ):
        raise SigStructError("SIGSTRUCT Q1/Q2 do not match its signature (EINIT would refuse)")
    vendor, date = struct.unpack_from("<II", data, OFF_VENDOR)
    misc_select, misc_mask = struct.unpack_from("<II", data, OFF_MISC_SELECT)
    prod_id, svn = struct.unpack_from("<HH", data, OFF_ISV_PROD_ID)
    digits = f"{date:08x}"
    return GramineSigStruct(
        mrenclave=data[OFF_ENCLAVE_HASH : OFF_ENCLAVE_HASH + 32],
        mrsigner=hashlib.sha256(modulus_le).digest(),
        attributes=data[OFF_ATTRIBUTES : OFF_ATTRIBUTES + 16],
        attribute_mask=data[OFF_ATTRIBUTE_MASK : OFF_ATTRIBUTE_MASK + 16],
        misc_select=misc_select,
        misc_mask=misc_mask,
        isv_prod_id=prod_id,
        isv_svn=svn,
        vendor=vendor,
        date=f"{digits[:4]}-{digits[4:6]}-{digits[6:]}",
    )
