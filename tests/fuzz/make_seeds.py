"""Write the seed corpus and the fixtures of the quote/certificate targets.

``python -m tests.fuzz.make_seeds`` provisions a throw-away sim platform,
keeps its attestation root (tests/fuzz/fixtures/root_ca.pem) and writes a few
valid inputs per target to tests/fuzz/corpus/<target>/seed-*. Run it again
only to refresh the seeds (the old ones are replaced); the corpus is kept
small on purpose: atheris grows its own working corpus in a temp directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from tests.fuzz.targets import CORPUS, FIXTURES

from sgxvtpm.channel.evidence import EnclaveCredential
from sgxvtpm.enclaves.registry import InstanceRecord, Registry
from sgxvtpm.enclaves.sealing import Sealer, SealKind
from sgxvtpm.enclaves.state import Bundle
from sgxvtpm.platform.base import EnclaveIdentity
from sgxvtpm.platform.sim.platform_dir import SimPlatformDir
from sgxvtpm.tpm import wire as tpmwire
from sgxvtpm.tpm.constants import TPM2_CAP, TPM2_PT, TPM2_SU
from sgxvtpm.tpm.engine import LibtpmsEngine
from sgxvtpm.wire import mssim as ms
from sgxvtpm.wire import relay, vtpm
from sgxvtpm.wire import swtpm_ctrl as ctrl

IDENTITY = EnclaveIdentity(
    mrenclave=hashlib.sha256(b"fuzz mrenclave").digest(),
    mrsigner=hashlib.sha256(b"fuzz mrsigner").digest(),
    isv_prod_id=2,
    isv_svn=1,
)


def _tpm_traffic() -> list[bytes]:
    """Real commands and libtpms' real answers to them."""
    engine = LibtpmsEngine()
    engine.start()
    commands = [
        tpmwire.startup(TPM2_SU.CLEAR),
        tpmwire.get_random(16),
        tpmwire.pcr_read([0, 16]),
        tpmwire.read_clock(),
        tpmwire.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 4),
        tpmwire.create_primary(tpmwire.ecc_p256_template()),
    ]
    out: list[bytes] = []
    try:
        for command in commands:
            out += [command, engine.process(command)]
        handle = tpmwire.parse_create_primary(out[-1]).handle
        for command in (tpmwire.read_public(handle), tpmwire.shutdown(TPM2_SU.STATE)):
            out += [command, engine.process(command)]
    finally:
        engine.stop()
    return out


def seeds(platform: SimPlatformDir) -> dict[str, list[bytes]]:
    enclave = platform.enclave_platform(IDENTITY)
    traffic = _tpm_traffic()
    commands = traffic[0::2]
    frames = [
        relay.Frame.open(1, "manager"),
        relay.Frame.data(1, bytes(range(64))),
        relay.Frame.close(1, "bye"),
        relay.Frame.control({"op": "ping", "id": 1}),
    ]
    ctrl_requests = [
        ctrl.CtrlRequest(ctrl.CtrlCmd.GET_CAPABILITY),
        ctrl.CtrlRequest(ctrl.CtrlCmd.INIT, flags=1),
        ctrl.CtrlRequest(ctrl.CtrlCmd.SET_LOCALITY, locality=3),
        ctrl.CtrlRequest(ctrl.CtrlCmd.GET_STATEBLOB, blob_type=1),
        ctrl.CtrlRequest(ctrl.CtrlCmd.SET_STATEBLOB, blob_type=2, data=b"blob"),
        ctrl.CtrlRequest(ctrl.CtrlCmd.SET_BUFFERSIZE, size=4096),
        ctrl.CtrlRequest(ctrl.CtrlCmd.GET_INFO, flags=3),
        ctrl.CtrlRequest(ctrl.CtrlCmd.HASH_DATA, data=b"measure"),
    ]
    vtpm_requests = [
        vtpm.VtpmRequest.init(1),
        vtpm.VtpmRequest.tpm_command(commands[1], 0),
        vtpm.VtpmRequest.set_buffersize(4096),
        vtpm.VtpmRequest.get_stateblob(1),
        vtpm.VtpmRequest.set_stateblob(2, b"state"),
        vtpm.VtpmRequest.get_info(3),
        vtpm.VtpmRequest.reset_established(3),
    ]
    bundle = Bundle({"instance_id": "ab" * 16, "vm_id": "vm1"}, {"permall": b"p" * 40})
    registry = Registry(
        "-----BEGIN CERTIFICATE-----\n", "-----BEGIN PRIVATE KEY-----\n",
        {"vm1": InstanceRecord("vm1", "ab" * 16, "00" * 32, ["sha256"], ["ecc-p256"], 1.0)},
    )
    instance_sealer = Sealer(enclave, SealKind.INSTANCE_STATE, "ab" * 16)
    registry_sealer = Sealer(enclave, SealKind.MANAGER_REGISTRY, "manager")
    report_data = hashlib.sha256(b"fuzz").digest() + bytes(32)
    credential = EnclaveCredential.create(enclave, "fuzz-enclave")
    return {
        "relay": [b"\x00" + relay.encode(f) for f in frames]
        + [b"\x01" + b"".join(relay.encode(f) for f in frames)],
        "swtpm_ctrl": [b"\x01" + b"".join(ctrl.encode_request(r, 4) for r in ctrl_requests)]
        + [b"\x03" + ctrl.encode_request(r, 1) for r in ctrl_requests[:3]]
        + [bytes([c << 1]) + bytes(4 + 16) for c in (ctrl.CtrlCmd.GET_STATEBLOB,
                                                    ctrl.CtrlCmd.SET_BUFFERSIZE)],
        "swtpm_data": [b"\x00" + c for c in commands] + [b"\x03" + b"".join(commands)],
        "mssim": [
            b"\x03" + ms.encode_request(ms.MssimRequest(ms.MssimCmd.SEND_COMMAND, 0, commands[1])),
            b"\x02" + ms.encode_request(ms.MssimRequest(ms.MssimCmd.SIGNAL_POWER_ON)),
            b"\x01" + ms.encode_command_response(traffic[3]),
            b"\x00" + ms.encode_ack(0),
        ],
        "vtpm": [vtpm.encode_request(r) for r in vtpm_requests]
        + [vtpm.encode_response(vtpm.VtpmResponse.ok(traffic[3]))],
        "tpm_header": traffic,
        "sealed_blob": [
            instance_sealer.seal(bundle.encode(), 7, "vm1"),
            registry_sealer.seal(registry.encode(), 3, ""),
            bundle.encode(),
            registry.encode(),
        ],
        "quote": [enclave.quote(report_data)],
        "ra_tls_cert": [credential.cert_der],
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        platform = SimPlatformDir.open_or_create(Path(tmp) / "platform")
        FIXTURES.mkdir(parents=True, exist_ok=True)
        (FIXTURES / "root_ca.pem").write_bytes(platform.root_certificate_pem)
        (FIXTURES / "identity.json").write_text(
            json.dumps(
                {
                    "mrenclave": IDENTITY.mrenclave.hex(),
                    "mrsigner": IDENTITY.mrsigner.hex(),
                    "isv_prod_id": IDENTITY.isv_prod_id,
                },
                indent=2,
            )
            + "\n"
        )
        for name, inputs in seeds(platform).items():
            directory = CORPUS / name
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            for data in inputs:
                (directory / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
            print(f"{name}: {len(inputs)} seeds")


if __name__ == "__main__":
    main()
