"""tpm2-pytss (ESAPI) through the in-process K2 TCTI, against a real instance enclave.

``K2Tcti.open(name, state_dir)`` opens K2 itself: TLS 1.3 through hostd's
relay to the VM's instance enclave, quote and measurement checked, VM key
presented. No endpoint process and no proxy in between; the same operations
as the tpm2-tools tests, through the ESAPI.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

tpm2_pytss = pytest.importorskip("tpm2_pytss")

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature  # noqa: E402
from tests.helpers.hostd import Hostd  # noqa: E402
from tests.helpers.vmtools import create_vm  # noqa: E402
from tpm2_pytss import (  # noqa: E402
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_RC,
    TPM2_SE,
    TPM2_SU,
    TPM2B_NV_PUBLIC,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPMA_NV,
    TPMA_OBJECT,
    TPML_DIGEST_VALUES,
    TPMS_NV_PUBLIC,
    TPMS_SENSITIVE_CREATE,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMU_HA,
    TSS2_Exception,
)

from sgxvtpm.endpoint.tcti import K2Tcti  # noqa: E402

pytestmark = pytest.mark.e2e
VM = "pytss-vm"
SIGNING_KEY = (
    TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
)


@pytest.fixture(scope="module")
def esapi(sgx_hostd: Hostd) -> Iterator[ESAPI]:
    create_vm(sgx_hostd, VM)
    tcti = K2Tcti.open(VM, sgx_hostd.state.root)
    ctx = ESAPI(tcti)
    ctx.startup(TPM2_SU.CLEAR)
    yield ctx
    ctx.close()
    tcti.finalize()  # ESAPI leaves a TCTI it did not load to its owner


def _pcr(esapi: ESAPI, index: int) -> bytes:
    _counter, _selection, digests = esapi.pcr_read(f"sha256:{index}")
    return bytes(digests[0])


def _sha256_values(digest: bytes) -> TPML_DIGEST_VALUES:
    return TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))])


def _primary(esapi: ESAPI) -> ESYS_TR:
    handle, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), "ecc256:aes128cfb")
    return handle


def _rc(exc: TSS2_Exception) -> int:
    # TPM_RC with the parameter/handle/session number bits cleared (Part 2, 6.6.3).
    return int(exc.rc) & (0xBF if int(exc.rc) & 0x80 else 0xFFF)


def test_get_random(esapi: ESAPI) -> None:
    a, b = bytes(esapi.get_random(16)), bytes(esapi.get_random(16))
    assert len(a) == len(b) == 16 and a != b


def test_pcr_extend_read(esapi: ESAPI) -> None:
    old = _pcr(esapi, 16)
    digest = hashlib.sha256(b"measured by pytss").digest()
    esapi.pcr_extend(ESYS_TR.PCR16, _sha256_values(digest))
    assert _pcr(esapi, 16) == hashlib.sha256(old + digest).digest()


def test_create_load_sign_verify(esapi: ESAPI) -> None:
    primary = _primary(esapi)
    priv, pub, *_ = esapi.create(
        primary, TPM2B_SENSITIVE_CREATE(),
        TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=SIGNING_KEY),
    )
    key = esapi.load(primary, priv, pub)
    digest = hashlib.sha256(b"sign me").digest()
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
    signature = esapi.sign(key, digest, scheme)
    esapi.verify_signature(key, digest, signature)
    with pytest.raises(TSS2_Exception) as bad:
        esapi.verify_signature(key, hashlib.sha256(b"sign me!").digest(), signature)
    assert _rc(bad.value) == TPM2_RC.SIGNATURE
    # And off-TPM: the signature verifies with the key's public part alone.
    public = serialization.load_pem_public_key(pub.to_pem())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    sig = encode_dss_signature(int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big"),
                               int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big"))
    public.verify(sig, b"sign me", ec.ECDSA(hashes.SHA256()))
    for handle in (key, primary):
        esapi.flush_context(handle)


def test_nv_define_write_read(esapi: ESAPI) -> None:
    data = bytes(range(32))
    public = TPM2B_NV_PUBLIC(TPMS_NV_PUBLIC(
        nvIndex=0x01500030, nameAlg=TPM2_ALG.SHA256,
        attributes=TPMA_NV.OWNERREAD | TPMA_NV.OWNERWRITE, dataSize=len(data),
    ))
    index = esapi.nv_define_space(b"", public)
    esapi.nv_write(index, data, auth_handle=ESYS_TR.OWNER)
    assert bytes(esapi.nv_read(index, len(data), auth_handle=ESYS_TR.OWNER)) == data


def _pcr_policy_session(esapi: ESAPI, session_type: TPM2_SE) -> ESYS_TR:
    session = esapi.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, session_type, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
        TPM2_ALG.SHA256,
    )
    esapi.policy_pcr(session, b"", "sha256:23")
    return session


def test_policy_pcr_sealed_object(esapi: ESAPI) -> None:
    secret = b"only while PCR 23 matches"
    trial = _pcr_policy_session(esapi, TPM2_SE.TRIAL)
    policy = esapi.policy_get_digest(trial)
    esapi.flush_context(trial)
    template = TPM2B_PUBLIC.parse("keyedhash", objectAttributes=(
        TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT))
    template.publicArea.authPolicy = policy
    sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(secret)))
    primary = _primary(esapi)
    priv, pub, *_ = esapi.create(primary, sensitive, template)
    sealed = esapi.load(primary, priv, pub)

    session = _pcr_policy_session(esapi, TPM2_SE.POLICY)
    assert bytes(esapi.unseal(sealed, session1=session)) == secret
    esapi.flush_context(session)

    esapi.pcr_extend(ESYS_TR.PCR23, _sha256_values(b"\xab" * 32))
    session = _pcr_policy_session(esapi, TPM2_SE.POLICY)
    with pytest.raises(TSS2_Exception) as denied:
        esapi.unseal(sealed, session1=session)
    assert _rc(denied.value) == TPM2_RC.POLICY_FAIL
    for handle in (session, sealed, primary):
        esapi.flush_context(handle)
