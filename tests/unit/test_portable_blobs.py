"""Portable state blobs (enclaves/portable.py) and which of them an instance takes
(enclaves/blobcipher.py): real sim platforms, sealed state stores, no libtpms."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgxvtpm.enclaves import portable
from sgxvtpm.enclaves.blobcipher import SealedBlobCipher
from sgxvtpm.enclaves.state import SealedStateStore
from sgxvtpm.enclaves.vtpm_core import BlobCipherError
from sgxvtpm.platform.base import EnclaveIdentity
from sgxvtpm.platform.sim import SimPlatformDir
from sgxvtpm.tpm.engine import StateType

KEY = bytes(range(32))
INSTANCE = EnclaveIdentity(b"\x51" * 32, b"\x52" * 32, isv_prod_id=2, isv_svn=1)


@settings(max_examples=30, deadline=None)
@given(payload=st.binary(max_size=200), vm=st.text(min_size=1, max_size=20),
       version=st.integers(0, 2**64 - 1))  # fmt: skip
def test_portable_blob_round_trip_and_binding(payload: bytes, vm: str, version: int) -> None:
    header = portable.PortableHeader(1, version, "ab" * 16, vm)
    blob = portable.seal(KEY, header, payload)
    assert portable.unseal(KEY, blob, kind=1, vm=vm) == (header, payload)
    with pytest.raises(portable.PortableBlobError, match="not of"):
        portable.unseal(KEY, blob, kind=1, vm=vm + "x")
    with pytest.raises(portable.PortableBlobError, match="type"):
        portable.unseal(KEY, blob, kind=2, vm=vm)
    with pytest.raises(portable.PortableBlobError, match="does not verify"):
        portable.unseal(bytes(32), blob, kind=1, vm=vm)
    # The version is in the authenticated header: raising it breaks the tag.
    bumped = portable.seal(KEY, header, payload)
    off = len(portable.MAGIC) + 1
    forged = bumped[:off] + (version ^ 1).to_bytes(8, "big") + bumped[off + 8 :]
    with pytest.raises(portable.PortableBlobError):
        portable.unseal(KEY, forged, kind=1, vm=vm)


@given(st.binary(max_size=64))
def test_any_bytes_are_a_portable_blob_or_refused(data: bytes) -> None:
    for blob in (data, portable.MAGIC + data):
        with pytest.raises(portable.PortableBlobError):
            portable.unseal(KEY, blob, kind=1, vm="vm")


def _store(platform: SimPlatformDir, path: Path, **provisioning: object) -> SealedStateStore:
    instance_id = os.urandom(16).hex()
    store = SealedStateStore(platform.enclave_platform(INSTANCE), instance_id, path)
    store.create({"instance_id": instance_id, "vm_id": "vm", **provisioning})
    return store


def _cipher(platform: SimPlatformDir, store: SealedStateStore) -> SealedBlobCipher:
    return SealedBlobCipher(
        platform.enclave_platform(INSTANCE), str(store.bundle.provisioning["instance_id"]),
        store,
    )


FLEET = {"key": KEY.hex(), "vm": "vm", "origin": "0a" * 16}


def test_incoming_takes_the_newest_export_once_and_never_an_older_one(
    sim_platform: SimPlatformDir, other_sim_platform: SimPlatformDir, tmp_path: Path
) -> None:
    src_store = _store(sim_platform, tmp_path / "src", fleet=FLEET)
    src = _cipher(sim_platform, src_store)
    old = src.encrypt(StateType.PERMANENT, b"old")
    src.state_changed()
    src_store.commit()  # the VM ran on: a newer export has a higher version
    new = src.encrypt(StateType.PERMANENT, b"new")
    assert portable.is_portable(new)
    v_old, v_new = (portable.parse_header(b)[0].version for b in (old, new))
    assert v_new > v_old

    dst_store = _store(other_sim_platform, tmp_path / "dst",
                       fleet={**FLEET, "origin": "0b" * 16}, incoming=True)  # fmt: skip
    dst = _cipher(other_sim_platform, dst_store)
    assert dst.decrypt(StateType.PERMANENT, new) == b"new"
    assert dst_store.bundle.provisioning["accepted"] == v_new
    with pytest.raises(BlobCipherError, match="below version"):
        dst.decrypt(StateType.PERMANENT, old)
    # Reloaded from disk: the floor is sealed, not in memory only.
    reopened = SealedStateStore(
        other_sim_platform.enclave_platform(INSTANCE),
        str(dst_store.bundle.provisioning["instance_id"]), tmp_path / "dst",
    )
    reopened.load()
    assert reopened.bundle.provisioning["accepted"] == v_new
    # The VM runs here: the import is over, the same blob is refused from now on.
    dst.state_changed()
    prov = dst_store.bundle.provisioning
    assert prov["incoming"] is False and prov["imported"]["version"] == v_new
    assert prov["imported"]["origin"] == "0a" * 16
    with pytest.raises(BlobCipherError, match="not waiting for a migration"):
        dst.decrypt(StateType.PERMANENT, new)
    # Its own exports are numbered above what it accepted.
    mine = dst.encrypt(StateType.PERMANENT, b"mine")
    assert portable.parse_header(mine)[0].version > v_new
    assert dst.decrypt(StateType.PERMANENT, mine) == b"mine"


def test_portable_blobs_need_the_fleet_key_and_the_old_format_stays_local(
    sim_platform: SimPlatformDir, other_sim_platform: SimPlatformDir, tmp_path: Path
) -> None:
    src_store = _store(sim_platform, tmp_path / "src", fleet=FLEET)
    blob = _cipher(sim_platform, src_store).encrypt(StateType.VOLATILE, b"v")
    bare = _cipher(other_sim_platform, _store(other_sim_platform, tmp_path / "bare",
                                              incoming=True))  # fmt: skip
    with pytest.raises(BlobCipherError, match="no fleet key"):
        bare.decrypt(StateType.VOLATILE, blob)
    other_key = {**FLEET, "key": bytes(32).hex()}
    wrong = _cipher(other_sim_platform, _store(other_sim_platform, tmp_path / "wrong",
                                               fleet=other_key, incoming=True))  # fmt: skip
    with pytest.raises(BlobCipherError, match="does not verify"):
        wrong.decrypt(StateType.VOLATILE, blob)
    # Without a fleet key an instance seals to its platform, as before.
    local = _cipher(sim_platform, _store(sim_platform, tmp_path / "local"))
    assert not portable.is_portable(local.encrypt(StateType.VOLATILE, b"v"))
