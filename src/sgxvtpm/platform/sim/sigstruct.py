"""SIGSTRUCT: the enclave signer's signature over what it vouches for (SDM 38.13).

On hardware the enclave's vendor signs, at build time, a SIGSTRUCT holding
the expected MRENCLAVE, ATTRIBUTES, ISVPRODID and ISVSVN; EINIT refuses an
enclave whose measured identity differs from the signed one or whose
signature does not verify, and sets MRSIGNER to the hash of the key that
verified it. The simulation keeps those rules with ECDSA P-256 in place of
RSA-3072: MRSIGNER is SHA-256 of the signer's DER SubjectPublicKeyInfo
(see measure.mrsigner_of), and nothing else decides it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sgxvtpm.platform.base import EnclaveIdentity, PlatformError

_TAG = b"sgxvtpm-sim SIGSTRUCT v1\x00"


class SigStructError(PlatformError):
    """EINIT refused the enclave: its SIGSTRUCT is missing, malformed or does not match.

    Only the release installed with the platform is signed: run the enclave
    code installed there (restarting hostd as root signs what is installed).
    """


@dataclass(frozen=True)
class SigStruct:
    signer_public_key: bytes  # DER SubjectPublicKeyInfo
    mrenclave: bytes
    attributes: bytes
    isv_prod_id: int
    isv_svn: int
    signature: bytes  # DER ECDSA over signed_bytes()

    def signed_bytes(self) -> bytes:
        return _TAG + struct.pack(
            "<32s16sHH", self.mrenclave, self.attributes, self.isv_prod_id, self.isv_svn
        )

    def encode(self) -> bytes:
        return json.dumps(
            {
                "signer_public_key": self.signer_public_key.hex(),
                "mrenclave": self.mrenclave.hex(),
                "attributes": self.attributes.hex(),
                "isv_prod_id": self.isv_prod_id,
                "isv_svn": self.isv_svn,
                "signature": self.signature.hex(),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> SigStruct:
        try:
            raw = json.loads(data)
            sig = cls(
                bytes.fromhex(raw["signer_public_key"]),
                bytes.fromhex(raw["mrenclave"]),
                bytes.fromhex(raw["attributes"]),
                int(raw["isv_prod_id"]),
                int(raw["isv_svn"]),
                bytes.fromhex(raw["signature"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SigStructError("SIGSTRUCT is malformed") from exc
        if len(sig.mrenclave) != 32 or len(sig.attributes) != 16:
            raise SigStructError("SIGSTRUCT is malformed")
        if not (0 <= sig.isv_prod_id <= 0xFFFF and 0 <= sig.isv_svn <= 0xFFFF):
            raise SigStructError("SIGSTRUCT is malformed")
        return sig


def sign(
    key: ec.EllipticCurvePrivateKey,
    mrenclave: bytes,
    attributes: bytes,
    isv_prod_id: int,
    isv_svn: int,
) -> SigStruct:
    """The vendor's step: sign an enclave's expected identity."""
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = SigStruct(public, mrenclave, attributes, isv_prod_id, isv_svn, b"")
    signature = key.sign(unsigned.signed_bytes(), ec.ECDSA(hashes.SHA256()))
    return SigStruct(public, mrenclave, attributes, isv_prod_id, isv_svn, signature)


def einit_check(sigstruct: SigStruct, measured: EnclaveIdentity) -> None:
    """EINIT: the signature verifies and signs exactly the measured identity.

    ``measured.mrsigner`` must already be SHA-256 of ``sigstruct``'s key (the
    caller derives it from the verified key, never from anything else).
    """
    try:
        key = serialization.load_der_public_key(sigstruct.signer_public_key)
    except ValueError:
        raise SigStructError("SIGSTRUCT signer key is malformed") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SigStructError("SIGSTRUCT signer key must be ECDSA P-256")
    try:
        key.verify(sigstruct.signature, sigstruct.signed_bytes(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SigStructError("SIGSTRUCT signature does not verify") from None
    if (
        sigstruct.mrenclave != measured.mrenclave
        or sigstruct.attributes != measured.attributes
        or sigstruct.isv_prod_id != measured.isv_prod_id
        or sigstruct.isv_svn != measured.isv_svn
    ):
        raise SigStructError("SIGSTRUCT does not sign the measured enclave")
