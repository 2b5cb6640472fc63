"""A TCTI for tpm2-pytss that speaks K2 itself, in process, with no proxy.

    from tpm2_pytss import ESAPI
    from sgxvtpm.endpoint.tcti import K2Tcti
    with ESAPI(K2Tcti.open("vm1", state_dir)) as esapi:
        esapi.startup(TPM2_SU.CLEAR)
        esapi.get_random(16)

The TPM commands never exist outside this process in the clear: they leave
it as TLS records of an attested session to the VM's instance enclave.

The TCTI is the VM's endpoint while it is open: :meth:`K2Tcti.open` raises
:class:`~sgxvtpm.endpoint.k2.K2Busy` while another endpoint (``vm serve``,
``vm attach``, another TCTI) holds the VM, unless ``takeover=True``. It
starts a stopped TPM and never resets a running one, whose PCRs belong to
the VM's boot; TPM2_Startup then answers TPM_RC_INITIALIZE.
"""

from __future__ import annotations

from pathlib import Path

from tpm2_pytss.TCTI import PyTCTI

from sgxvtpm.endpoint.k2 import K2Busy, K2Client, VmBinding
from sgxvtpm.host.statedir import StateDir
from sgxvtpm.vmm.credentials import Credentials

MAX_RESPONSE = 4096


class K2Tcti(PyTCTI):  # type: ignore[misc]  # tpm2-pytss ships no type information
    """tpm2-pytss PyTCTI over a :class:`~sgxvtpm.endpoint.k2.K2Client`."""

    def __init__(self, client: K2Client, *, power_on: bool = True) -> None:
        super().__init__(max_size=MAX_RESPONSE, magic=b"SGXVTPM")
        self._client = client
        self._locality = 0
        self._response: bytes | None = None
        if power_on:
            client.power_on_if_stopped()

    @classmethod
    def open(
        cls,
        name: str,
        state_dir: Path | str | None = None,
        *,
        credentials: Path | str | None = None,
        power_on: bool = True,
        takeover: bool = False,
    ) -> K2Tcti:
        """The TCTI for VM ``name`` of the hostd at ``state_dir``.

        Its key and binding are in the credentials directory ``credentials``
        (default: this user's). ``power_on``: start the TPM if it is stopped.
        ``takeover``: end the session of the VM's current endpoint instead of
        raising K2Busy.
        """
        binding = VmBinding.load(
            StateDir.at(state_dir), name, credentials=Credentials.at(credentials)
        )
        client = K2Client(binding, takeover=takeover, label="K2Tcti")
        try:
            client.connect()
            return cls(client, power_on=power_on)
        except K2Busy as exc:
            raise exc.with_hint("pass takeover=True to replace it") from None
        except BaseException:
            client.close()
            raise

    def do_transmit(self, command: bytes) -> None:
        self._response = self._client.transact(bytes(command), self._locality)

    def do_receive(self, timeout: int) -> bytes:
        if self._response is None:
            raise RuntimeError("receive without a transmitted command")
        response, self._response = self._response, None
        return response

    def do_set_locality(self, locality: int) -> None:
        self._locality = locality

    def do_finalize(self) -> None:
        self._client.close()
