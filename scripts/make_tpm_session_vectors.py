#!/usr/bin/env python3
"""Record known-answer exchanges of salted HMAC sessions with libtpms (swtpm).

    .venv/bin/python scripts/make_tpm_session_vectors.py   # rewrites tests/vectors/tpm_session.json

Starts Debian's swtpm, makes an RSA-2048 and an ECC P-256 primary under the
endorsement hierarchy, and runs HostTpmCounters (create, increment, read)
against each with a seeded ``rng``. Recorded: every command and response,
the salts with their encryptions (OAEP padding and the ECDH ephemeral key
are not from ``rng``), the key's public area and the counter secret. The
unit tests replay them: our command bytes must be the bytes libtpms
accepted, its responses must verify, and any changed byte must not.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.swtpm import Swtpm  # noqa: E402

from sgxvtpm.tpm import nvcounter, wire  # noqa: E402
from sgxvtpm.tpm.constants import TPM2_RH  # noqa: E402
from sgxvtpm.tpm.nv import execute  # noqa: E402
from sgxvtpm.tpm.nvcounter import HostTpmCounters, pin_key  # noqa: E402

OUT = ROOT / "tests" / "vectors" / "tpm_session.json"
SEED = 18


def record(tpm: Swtpm, template: bytes) -> dict[str, object]:
    created = wire.parse_create_primary(
        execute(tpm.transact, wire.create_primary(template, TPM2_RH.ENDORSEMENT))
    )
    exchanges: list[list[str]] = []
    salts: list[list[str]] = []

    def transact(command: bytes) -> bytes:
        response = tpm.transact(command)
        exchanges.append([command.hex(), response.hex()])
        return response

    real = nvcounter.encrypt_salt

    def salted(public: bytes, rng: nvcounter.Random) -> tuple[bytes, bytes]:
        salt, encrypted = real(public, rng)
        salts.append([salt.hex(), encrypted.hex()])
        return salt, encrypted

    nvcounter.encrypt_salt = salted  # type: ignore[assignment]
    try:
        rng = random.Random(SEED)
        secret = rng.randbytes(32)
        name = pin_key(tpm.transact, created.handle)
        counters = HostTpmCounters(transact, created.handle, name, secret, rng=rng.randbytes)
        values = [counters.create("c"), counters.increment("c"), counters.read("c")]
    finally:
        nvcounter.encrypt_salt = real  # type: ignore[assignment]
        execute(tpm.transact, wire.flush_context(created.handle))
    return {
        "key_handle": created.handle,
        "key_public": created.public.hex(),
        "key_name": name.hex(),
        "seed": SEED,
        "ops": ["create", "increment", "read"],
        "values": values,
        "salts": salts,
        "exchanges": exchanges,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, Swtpm(Path(tmp)) as tpm:
        vectors = {
            "source": "libtpms via Debian's swtpm 0.7.1, scripts/make_tpm_session_vectors.py",
            "rsa2048": record(tpm, wire.rsa2048_template()),
            "ecc_p256": record(tpm, wire.ecc_p256_template()),
        }
    OUT.write_text(json.dumps(vectors, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
