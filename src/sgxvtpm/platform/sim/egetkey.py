"""EGETKEY key derivation as SGX does it (SDM vol. 3D, EGETKEY, 38.18).

SGX derives every key with AES-CMAC, keyed by a 128-bit key from the fuses,
over a buffer of the key's dependencies; which fields enter depends on
KEYNAME and, for SEAL keys, on KEYPOLICY. Fields a key does not depend on are
zero. The simulation's buffer layout (little-endian, 240 bytes) is:

  KEYNAME u16 | KEYPOLICY u16 | ISVPRODID u16 | ISVSVN u16 | CONFIGSVN u16 |
  pad u16 | MISCSELECT&MISCMASK u32 | MISCMASK u32 | pad u32 | OWNEREPOCH 16 |
  ATTRIBUTES&ATTRIBUTEMASK 16 | ATTRIBUTEMASK 16 | MRENCLAVE 32 | MRSIGNER 32 |
  KEYID 32 | SEAL_KEY_FUSES 16 | CPUSVN 16 | padding to 240

Dependencies per KEYNAME (EGETKEY's "Key Derivation" tables):
- SEAL: policy-selected MRENCLAVE and/or MRSIGNER, ISVPRODID, ISVSVN,
  CONFIGSVN, masked ATTRIBUTES/MISCSELECT, OWNEREPOCH, KEYID, fuses, CPUSVN;
- REPORT: the target's MRENCLAVE, ATTRIBUTES, MISCSELECT, OWNEREPOCH, KEYID,
  CPUSVN (EREPORT derives the *target's* key; EGETKEY the caller's own);
- PROVISION / PROVISION_SEAL / EINITTOKEN: MRSIGNER, ISVPRODID, ISVSVN,
  masked ATTRIBUTES, CPUSVN (+ fuses, OWNEREPOCH where SGX has them); they
  require the PROVISIONKEY / EINITTOKENKEY attribute.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgxvtpm.platform.base import EnclaveIdentity, KeyName, KeyPolicy, KeyRequest, PlatformError
from sgxvtpm.platform.sim.measure import (
    SGX_FLAGS_DEBUG,
    SGX_FLAGS_EINITTOKENKEY,
    SGX_FLAGS_INITTED,
    SGX_FLAGS_MODE64BIT,
    SGX_FLAGS_PROVISIONKEY,
)

KEY_DEPENDENCIES_SIZE = 240
# Which ATTRIBUTES bits a derived key is bound to. KEYREQUEST.ATTRIBUTEMASK is
# not in base.KeyRequest, so the simulation fixes it: the flags that change
# what an enclave may do (INITTED, DEBUG, MODE64BIT, PROVISIONKEY,
# EINITTOKENKEY), and no XFRM bits (sealed data survives a CPU feature change).
ATTRIBUTE_MASK = struct.pack(
    "<QQ",
    SGX_FLAGS_INITTED
    | SGX_FLAGS_DEBUG
    | SGX_FLAGS_MODE64BIT
    | SGX_FLAGS_PROVISIONKEY
    | SGX_FLAGS_EINITTOKENKEY,
    0,
)
MISC_MASK = 0xFFFFFFFF
# OWNEREPOCH is set by the platform owner in BIOS; the simulation has one owner.
OWNER_EPOCH = bytes(16)
# The fuses are folded into the base key; this field stays zero.
SEAL_KEY_FUSES = bytes(16)


def derive_base_key(root_secret: bytes) -> bytes:
    """The 128-bit AES-CMAC key EGETKEY uses, from the 32-byte fuse key."""
    if len(root_secret) != 32:
        raise PlatformError("the platform root secret must be 32 bytes")
    return HKDF(
        algorithm=hashes.SHA256(), length=16, salt=None, info=b"sgxvtpm-sim EGETKEY base key"
    ).derive(root_secret)


def aes_cmac(key: bytes, data: bytes) -> bytes:
    c = CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


def _mask(a: bytes, b: bytes) -> bytes:
    return bytes(x & y for x, y in zip(a, b, strict=True))


def _svn_above(requested: bytes, current: bytes) -> bool:
    """CPUSVN is compared component by component (here: byte by byte)."""
    return any(r > c for r, c in zip(requested, current, strict=True))


def key_dependencies(
    *,
    key_name: KeyName,
    key_policy: int = 0,
    isv_prod_id: int = 0,
    isv_svn: int = 0,
    config_svn: int = 0,
    misc_select: int = 0,
    misc_mask: int = 0,
    owner_epoch: bytes = bytes(16),
    attributes: bytes = bytes(16),
    attribute_mask: bytes = bytes(16),
    mrenclave: bytes = bytes(32),
    mrsigner: bytes = bytes(32),
    key_id: bytes = bytes(32),
    seal_key_fuses: bytes = bytes(16),
    cpu_svn: bytes = bytes(16),
) -> bytes:
    """The derivation buffer (layout in the module docstring)."""
    buf = struct.pack(
        "<HHHHHHIII",
        key_name,
        key_policy,
        isv_prod_id,
        isv_svn,
        config_svn,
        0,
        misc_select & misc_mask,
        misc_mask,
        0,
    )
    buf += owner_epoch + _mask(attributes, attribute_mask) + attribute_mask
    buf += mrenclave + mrsigner + key_id + seal_key_fuses + cpu_svn
    for name, value, size in (("KEYID", key_id, 32), ("CPUSVN", cpu_svn, 16)):
        if len(value) != size:
            raise PlatformError(f"{name} must be {size} bytes")
    return buf.ljust(KEY_DEPENDENCIES_SIZE, b"\x00")


def report_key_dependencies(
    mrenclave: bytes, attributes: bytes, misc_select: int, key_id: bytes, cpu_svn: bytes
) -> bytes:
    """Dependencies of the REPORT key of the enclave ``mrenclave``."""
    return key_dependencies(
        key_name=KeyName.REPORT,
        misc_select=misc_select,
        misc_mask=MISC_MASK,
        owner_epoch=OWNER_EPOCH,
        attributes=attributes,
        attribute_mask=bytes([0xFF]) * 16,
        mrenclave=mrenclave,
        key_id=key_id,
        cpu_svn=cpu_svn,
    )


def report_key(
    base_key: bytes,
    mrenclave: bytes,
    attributes: bytes,
    misc_select: int,
    key_id: bytes,
    cpu_svn: bytes,
) -> bytes:
    """The REPORT key of an enclave (EREPORT uses the TARGETINFO's)."""
    deps = report_key_dependencies(mrenclave, attributes, misc_select, key_id, cpu_svn)
    return aes_cmac(base_key, deps)


def request_dependencies(
    identity: EnclaveIdentity, request: KeyRequest, platform_cpu_svn: bytes
) -> bytes:
    """Check a KEYREQUEST against the caller and build its derivation buffer.

    Raises PlatformError where EGETKEY fails: an ISVSVN, CPUSVN or CONFIGSVN
    above the enclave's/platform's (SGX_INVALID_SVN / SGX_INVALID_CPUSVN), or a
    key the enclave's ATTRIBUTES do not allow (SGX_INVALID_ATTRIBUTE).
    """
    if request.isv_svn > identity.isv_svn:
        raise PlatformError(
            f"EGETKEY: requested ISVSVN {request.isv_svn} is above the enclave's {identity.isv_svn}"
        )
    if request.config_svn > 0:
        raise PlatformError("EGETKEY: requested CONFIGSVN is above the enclave's (0)")
    if len(request.cpu_svn) != 16 or _svn_above(request.cpu_svn, platform_cpu_svn):
        raise PlatformError("EGETKEY: requested CPUSVN is above the platform's")
    (flags,) = struct.unpack_from("<Q", identity.attributes)
    name = KeyName(request.key_name)
    if name is KeyName.REPORT:
        return report_key_dependencies(
            identity.mrenclave,
            identity.attributes,
            identity.misc_select,
            request.key_id,
            platform_cpu_svn,
        )
    if name in (KeyName.PROVISION, KeyName.PROVISION_SEAL) and not (flags & SGX_FLAGS_PROVISIONKEY):
        raise PlatformError("EGETKEY: the enclave lacks the PROVISIONKEY attribute")
    if name is KeyName.EINITTOKEN and not flags & SGX_FLAGS_EINITTOKENKEY:
        raise PlatformError("EGETKEY: the enclave lacks the EINITTOKENKEY attribute")
    return _identity_key_dependencies(identity, request, name)


def _identity_key_dependencies(
    identity: EnclaveIdentity, request: KeyRequest, name: KeyName
) -> bytes:
    policy = KeyPolicy(request.key_policy) if name is KeyName.SEAL else KeyPolicy.MRSIGNER
    is_seal = name is KeyName.SEAL
    return key_dependencies(
        key_name=name,
        key_policy=int(policy) if is_seal else 0,
        isv_prod_id=identity.isv_prod_id,
        isv_svn=request.isv_svn,
        config_svn=request.config_svn if is_seal else 0,
        misc_select=identity.misc_select,
        misc_mask=MISC_MASK,
        owner_epoch=OWNER_EPOCH if name is not KeyName.PROVISION else bytes(16),
        attributes=identity.attributes,
        attribute_mask=ATTRIBUTE_MASK,
        mrenclave=identity.mrenclave if policy & KeyPolicy.MRENCLAVE else bytes(32),
        mrsigner=identity.mrsigner if policy & KeyPolicy.MRSIGNER else bytes(32),
        key_id=request.key_id if name in (KeyName.SEAL, KeyName.EINITTOKEN) else bytes(32),
        seal_key_fuses=SEAL_KEY_FUSES,
        cpu_svn=request.cpu_svn,
    )


def egetkey(
    base_key: bytes, identity: EnclaveIdentity, request: KeyRequest, platform_cpu_svn: bytes
) -> bytes:
    """EGETKEY: the 16-byte key ``identity`` gets for ``request``."""
    return aes_cmac(base_key, request_dependencies(identity, request, platform_cpu_svn))
