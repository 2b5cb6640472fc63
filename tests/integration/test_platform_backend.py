"""open_platform("sim"): the backend hostd uses, through base.PlatformBackend only.

The loader starts the sim CPU, which signs the release from its own installed
code; the backend's measurement is the MRENCLAVE a launched enclave gets, and
its quote verifier accepts that enclave's quotes under the root it reports.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers.echo_client import call

from sgxvtpm.enclaves.specs import expected_policy, instance_spec, manager_spec
from sgxvtpm.platform import EnclaveSpec, PlatformBackend, PlatformError, open_platform
from sgxvtpm.platform.sim import SimPlatformDir

pytestmark = pytest.mark.integration

HELPER_SOURCE = Path(__file__).resolve().parent.parent / "helpers" / "sim_echo_enclave.py"
RELEASE = "sgxvtpm.enclaves.specs:release"


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sgx") / "platform"


@pytest.fixture(scope="module")
def backend(path: Path) -> Iterator[PlatformBackend]:
    opened = open_platform("sim", path, release=RELEASE)
    try:
        yield opened
    finally:
        opened.close()


def test_the_backend_reports_its_platforms_root(backend: PlatformBackend, path: Path) -> None:
    assert backend.name == "sim"
    assert backend.attestation_root_pem == SimPlatformDir(path).root_certificate_pem


def test_the_release_is_signed_and_nothing_else(backend: PlatformBackend) -> None:
    for spec in (manager_spec(backend), instance_spec(backend)):
        signed = backend.signed(spec)
        assert signed.sigstruct and dataclasses.replace(signed, sigstruct=b"") == spec
    with pytest.raises(PlatformError, match="signed no enclave named 'echo'"):
        backend.signed(dataclasses.replace(manager_spec(backend), name="echo"))
    # What a verifier expects is this backend's measurement of the release.
    assert expected_policy("manager", backend).mrenclaves == {
        backend.measure(manager_spec(backend))
    }


def test_a_launched_enclave_has_the_backends_measurement_and_verifies(
    backend: PlatformBackend, path: Path, tmp_path: Path
) -> None:
    code = tmp_path / "sim_echo_enclave.py"
    code.write_bytes(HELPER_SOURCE.read_bytes())
    unsigned = EnclaveSpec("echo", "sim_echo_enclave:main", [code], b"{}", 7, 3)
    spec = SimPlatformDir(path).sign(unsigned)  # the vendor's step, done by the test
    handle = backend.loader.launch(spec, {})
    try:
        assert handle.identity.mrenclave == backend.measure(unsigned)
        nonce = os.urandom(64)
        verifier = backend.quote_verifier(backend.attestation_root_pem)
        verified = verifier.verify(call(handle.stream, b"Q" + nonce))
        assert verified.identity == handle.identity and verified.report_data == nonce
    finally:
        handle.stop()

