"""sgxvtpm.tpm: libtpms as a TPM 2.0 engine, TPM wire helpers, TCG constants.

libtpms holds one TPM per process: run each :class:`LibtpmsEngine` in its own
process (an instance enclave).
"""

from sgxvtpm.tpm.engine import (
    EngineError,
    EngineMisuseError,
    LibtpmsEngine,
    MemoryStateStore,
    StateStore,
    StateType,
)
from sgxvtpm.tpm.wire import TpmProtocolError, TpmResponseError, error_response, validate_command

__all__ = [
    "EngineError",
    "EngineMisuseError",
    "LibtpmsEngine",
    "MemoryStateStore",
    "StateStore",
    "StateType",
    "TpmProtocolError",
    "TpmResponseError",
    "error_response",
    "validate_command",
]
